"""Fixtures for the index tests (helpers live in tests/unit/index/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import ModelCard
from tests.unit.index.helpers import make_card


@pytest.fixture
def card() -> ModelCard:
    return make_card()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A seeded, untrained resnet18 at 64 px with 32-d embeddings (saved with its card)."""
    import torch

    from models import save_model
    from models.net import EmbeddingNet

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model") / "m"
    save_model(EmbeddingNet(ModelCard(backbone="resnet18", embedding_dim=32, image_size=64, resize_size=72)), d)
    return d
