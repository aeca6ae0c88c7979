"""Helpers for the index tests: seeded unit vectors, records, cards, tiny images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from models import ModelCard

DIM = 16


def unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    """(n, d) float32 unit vectors, uniformly random directions."""
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, d: int, clusters: int = 200, spread: float = 0.35) -> np.ndarray:
    """(n, d) float32 unit vectors drawn around ``clusters`` random centres (embedding-like)."""
    centres = unit(rng, clusters, d)
    v = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def records(n: int, start: int = 0, *, label: str | None = "x", source: str = "folder") -> list[dict]:
    return [{"path": f"{label or 'none'}/{i}.jpg", "label": label, "sha256": hashlib.sha256(f"img{i}".encode()).hexdigest(),
             "size": 100 + i, "mtime": 1.0 + i, "source": source} for i in range(start, start + n)]


def make_card(fp: str = "a", dim: int = DIM) -> ModelCard:
    return ModelCard(backbone="resnet18", embedding_dim=dim, image_size=64, resize_size=72, fingerprint=fp * 64)


def write_images(root: Path, classes: dict[str, int], *, seed: int = 0, size=(80, 96)) -> list[Path]:
    """Random-noise JPEG/PNG images in ``root/<class>/<i>.{jpg,png}``; every file's bytes differ."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for c, n in classes.items():
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = (rng.random((size[0], size[1], 3)) * 255).astype(np.uint8)
            p = d / (f"{i}.png" if i % 3 == 0 else f"{i}.jpg")
            Image.fromarray(a).save(p)
            out.append(p)
    return out


def save_tiny_model(directory: Path) -> Path:
    """Save a seeded, untrained resnet18 at 64 px with 32-d embeddings (with its card)."""
    from tests.helpers import save_seeded_model

    return save_seeded_model(directory)
