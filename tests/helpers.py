"""Tiny generated datasets for unit tests (no real data, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, *, n_classes: int = 6, per_class: int = 8, size: int = 40, seed: int = 0,
                      kind: str = "colour") -> Path:
    """An ImageFolder of small JPEG/PNG images.

    ``kind="colour"``: class c has its own colour (separable even by an untrained network).
    ``kind="pattern"``: class c has its own stripe orientation and frequency; every image gets a
    random colour, phase and noise, so an untrained network separates classes poorly.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for c in range(n_classes):
        colour = rng.integers(0, 255, 3)
        angle = np.pi * c / n_classes
        freq = 0.25 + 0.35 * (c % 3) / 2
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if kind == "pattern":
                phase = rng.uniform(0, 2 * np.pi)
                wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)[..., None]
                tint = rng.integers(30, 225, 3)
                arr = tint + 90 * wave + rng.normal(0, 20, (size, size, 3))
            else:
                arr = colour + rng.normal(0, 25, (size, size + 4 * (i % 3), 3))
            arr = np.clip(arr, 0, 255).astype(np.uint8)
            fmt = "PNG" if i % 4 == 0 else "JPEG"
            Image.fromarray(arr).save(d / f"{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}", format=fmt)
    return root


def save_seeded_model(directory: Path, *, embedding_dim: int = 32, image_size: int = 64, resize_size: int = 72,
                      seed: int = 0) -> Path:
    """Save a seeded, untrained resnet18 EmbeddingNet (weights + card) into ``directory``."""
    import torch

    from models import ModelCard, save_model
    from models.net import EmbeddingNet

    torch.manual_seed(seed)
    card = ModelCard(backbone="resnet18", embedding_dim=embedding_dim, image_size=image_size, resize_size=resize_size)
    save_model(EmbeddingNet(card), directory)
    return Path(directory)


def make_feedback_index(tmp_path: Path, data: Path) -> Path:
    """A zero-shot efficientnet_lite0 (32 px) index of ``data`` (``--labels-from-folders``) in
    ``tmp_path/idx`` with two marks on a class_00 query: a class_01 result wrong, a class_00
    result right. Returns the index directory."""
    from index import IndexStore
    from index.feedback import add_feedback
    from lookalike.cli import main

    assert main(["export", "--pretrained", "efficientnet_lite0", "--image-size", "32", "--out", str(tmp_path / "zs")]) == 0
    assert main(["index", "build", "--model", str(tmp_path / "zs"), "--images", str(data), "--out",
                 str(tmp_path / "idx"), "--labels-from-folders", "--no-progress", "--workers", "0"]) == 0
    store = IndexStore.open(tmp_path / "idx", writable=True)
    try:
        by_label: dict[str, list[int]] = {}
        for rec in store.db.get_many(range(1, len(store) + 1)).values():
            by_label.setdefault(rec.label, []).append(rec.id)
        a, b = by_label["class_00"], by_label["class_01"]
        add_feedback(store, verdict="wrong", result_id=b[0], query_id=a[0])
        add_feedback(store, verdict="right", result_id=a[1], query_id=a[0])
    finally:
        store.close()
    return tmp_path / "idx"
