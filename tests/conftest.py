"""Shared fixtures. The real dataset is read from ../shared (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cub100_path() -> Path:
    return Path(os.environ.get("LOOKALIKE_CUB100", REPO.parent / "shared" / "data" / "cub100"))


@pytest.fixture(scope="session")
def cub100() -> Path:
    """Path of the cub100 dataset (ImageFolder in images/, class lists in splits/); skips if absent."""
    p = cub100_path()
    if not (p / "images").is_dir() or not (p / "splits" / "cub_test_classes.txt").is_file():
        pytest.skip(f"cub100 dataset not found at {p} (set LOOKALIKE_CUB100 to its path)")
    return p


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    p = Path(os.environ.get("LOOKALIKE_ARTIFACTS", REPO / "artifacts"))
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """torch's intra-op thread count is process-wide and some code sets it on purpose (the
    service's thread policy, backend timing): each test starts from the count the session
    started with, so one test's setting cannot halve a later training test's speed."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
