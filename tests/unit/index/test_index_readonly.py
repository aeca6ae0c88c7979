"""A reader (writes disabled) never modifies the index, also on a read-only mount."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from index import IndexStore

from .helpers import make_card, records, unit


def _digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _build(tmp_path, card, rng):
    d = tmp_path / "idx"
    store = IndexStore.create(d, card=card, images_root=None)
    vecs = unit(rng, 50)
    store.add(vecs, records(50))
    store.checkpoint()
    store.close()
    return d, vecs


def test_readonly_open_does_not_write(tmp_path, card, rng):
    d, vecs = _build(tmp_path, card, rng)
    before = _digest(d / "meta.sqlite")
    store = IndexStore.open(d, card=card, writable=False)
    hits = store.search(vecs[:3], 1)
    assert all(h[0].score > 0.999 for h in hits)
    store.close()
    assert _digest(d / "meta.sqlite") == before


def test_readonly_mount_opens_immutable(tmp_path, card, rng, monkeypatch):
    """Root ignores file modes, so the read-only location is simulated through os.access."""
    d, vecs = _build(tmp_path, card, rng)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode == os.W_OK else real_access(p, mode, **kw))
    store = IndexStore.open(d, card=card, writable=False)
    assert len(store) == 50
    ids = [h[0].id for h in store.search(vecs[:5], 1)]
    assert len(set(ids)) == 5
    # immutable, not merely mode=ro: a frozen view that does not read another process's later
    # commits (they sit in the WAL, which an immutable open ignores)
    monkeypatch.setattr(os, "access", real_access)
    with IndexStore.open(d, card=card, writable=True) as writer:
        writer.add(unit(rng, 10), records(10, 50))
        assert writer.db.count() == 60
    assert store.db.count() == 50
    store.close()
