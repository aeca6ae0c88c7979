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


def test_batch_job_stops_cleanly_on_a_full_disk_and_a_rerun_resumes(tmp_path, tiny_model, monkeypatch):
    import errno

    import pytest

    from index import IndexFullError
    from index.ingest import Embedder, index_folder
    from tests.unit.index.helpers import write_images

    embedder = Embedder.load(tiny_model, bf16=False)
    root = tmp_path / "images"
    write_images(root, {"crow": 6, "finch": 6})
    store = IndexStore.create(tmp_path / "ix", card=embedder.card, images_root=root)
    real_add = IndexStore.add
    calls = {"n": 0}

    def add_until_full(self, vectors, records):
        calls["n"] += 1
        if calls["n"] > 1:  # the second batch finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, vectors, records)

    monkeypatch.setattr(IndexStore, "add", add_until_full)
    with pytest.raises(IndexFullError, match="re-run the same command"):
        index_folder(store, embedder, root, batch_size=4, workers=0, progress=False)
    assert len(store) == 4  # the first batch is durable
    monkeypatch.setattr(IndexStore, "add", real_add)
    rep = index_folder(store, embedder, root, batch_size=4, workers=0, progress=False)
    assert (rep.added, rep.unchanged) == (8, 4) and len(store) == 12  # each image indexed exactly once
    store.close()
