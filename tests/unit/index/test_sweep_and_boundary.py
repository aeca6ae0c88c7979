"""Start-up sweep of a killed writer's leftovers, and the images root as a boundary for the
batch job's walk (issue 12)."""

from __future__ import annotations

import logging

import numpy as np

from index import IndexStore
from index.ingest import walk_images
from tests.unit.index.helpers import unit


def test_writable_open_sweeps_temporaries_and_orphan_uploads(tmp_path, card, rng, caplog):
    d = tmp_path / "idx"
    store = IndexStore.create(d, card=card, images_root=tmp_path)
    kept = store.add_upload(b"\xff\xd8\xffkept", unit(rng, 1, card.embedding_dim)[0], label=None, ext="jpg")
    store.checkpoint()
    store.close()
    up = d / "uploads"
    debris = [up / f".{'a' * 64}.jpg.4242.tmp", d / ".store.json.77.tmp"]
    for p in debris:
        p.write_bytes(b"partial")
    (d / "generations" / ".tmp-000009-31337").mkdir()
    orphan = up / f"{'b' * 64}.png"
    orphan.write_bytes(b"\x89PNG never acknowledged")

    IndexStore.open(d, card=card).close()  # read-only: never sweeps
    assert orphan.exists() and all(p.exists() for p in debris)

    with caplog.at_level(logging.INFO, logger="index.store"):
        store = IndexStore.open(d, card=card, writable=True)
    try:
        assert not orphan.exists() and not any(p.exists() for p in debris)
        assert not (d / "generations" / ".tmp-000009-31337").exists()
        assert (up / kept.path).exists() and len(store) == 1
        assert store.sweep() == {"temporary": 0, "orphan_uploads": 0}
    finally:
        store.close()
    assert any("removed 3 temporary files and 1 orphan uploads" in r.getMessage() for r in caplog.records)


def test_walk_does_not_follow_symlinks_out_of_the_root(tmp_path, caplog):
    root = tmp_path / "images"
    (root / "birds").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    (outside / "more.jpg").write_bytes(b"x")
    (root / "birds" / "a.jpg").write_bytes(b"x")
    (root / "birds" / "inside_link.jpg").symlink_to(root / "birds" / "a.jpg")
    (root / "birds" / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="index.ingest"):
        files, ignored = walk_images(root)
    assert [p.relative_to(root).as_posix() for p in files] == ["birds/a.jpg", "birds/inside_link.jpg"]
    assert ignored == 1
    assert any("outside the images root" in r.getMessage() and "escape.jpg" in r.getMessage() for r in caplog.records)
    assert np.all([not p.resolve().is_relative_to(outside) for p in files])
