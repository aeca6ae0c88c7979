"""Fixtures for the index tests (helpers live in tests/unit/index/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import ModelCard
from tests.unit.index.helpers import make_card, save_tiny_model


@pytest.fixture
def card() -> ModelCard:
    return make_card()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A seeded, untrained resnet18 at 64 px with 32-d embeddings (saved with its card)."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m")
