"""Snapshot and restore: consistent under concurrent writes, verified on restore."""

from __future__ import annotations

import io
import tarfile
import threading
import time

import numpy as np
import pytest

from index import CorruptIndexError, IndexStore
from index.snapshot import restore, snapshot
from tests.unit.index.helpers import make_card, records, unit


def _write_forever(store: IndexStore, stop: threading.Event, acked: list, rng: np.random.Generator) -> None:
    """Add (folder records and uploads) and delete, appending each op to ``acked`` once it returned."""
    i = 0
    live: list[int] = []
    while not stop.is_set():
        v = unit(rng, 1)
        if i % 3 == 2:
            rec = store.add_upload(f"upload {i}".encode(), v[0], label="up", ext="jpg")
            rid = rec.id
        else:
            (rid,) = store.add(v, records(1, 10_000 + i, label="x"))
        acked.append(("add", rid, v[0]))
        live.append(rid)
        if i % 5 == 4:
            victim = live.pop(0)
            store.remove([victim])
            acked.append(("del", victim, None))
        if i % 40 == 39:
            store.checkpoint()
        i += 1


def test_snapshot_under_writes_restores_every_write_acknowledged_before_it(tmp_path, rng):
    store = IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path)
    stop, acked = threading.Event(), []
    writer = threading.Thread(target=_write_forever, args=(store, stop, acked, np.random.default_rng(7)))
    writer.start()
    try:
        while len(acked) < 120:
            time.sleep(0.01)
        before = list(acked)  # every write acknowledged before the snapshot began
        report = snapshot(tmp_path / "ix", tmp_path / "snap.tar")
        n_during = len(acked) - len(before)
        time.sleep(0.2)
    finally:
        stop.set()
        writer.join()
        store.close()
    assert n_during >= 0 and report.images > 0
    info = restore(tmp_path / "snap.tar", tmp_path / "restored")
    assert info["ntotal"] == report.images

    deleted = {rid for op, rid, _ in before if op == "del"}
    # a delete acknowledged while the snapshot ran may or may not be in it (both are states the
    # index went through), so only adds never deleted are required
    deleted_any_time = {rid for op, rid, _ in acked if op == "del"}
    must_have = {rid: v for op, rid, v in before if op == "add" and rid not in deleted_any_time}
    with IndexStore.open(tmp_path / "restored") as r:
        for rid, v in must_have.items():
            got = r.vector(rid)
            assert got is not None, f"acknowledged add {rid} missing from the snapshot"
            np.testing.assert_allclose(got, v / np.linalg.norm(v), atol=1e-6)
        for rid in deleted:
            assert r.get(rid) is None, f"acknowledged delete {rid} present in the snapshot"
        # the snapshot is a state the writer went through: nothing it never acknowledged or started
        all_adds = {rid for op, rid, _ in acked if op == "add"}
        restored_ids = {int(h.id) for row in r.search(unit(rng, 4), 10_000) for h in row}
        assert set(must_have) <= restored_ids <= all_adds
        for rid in restored_ids:
            rec = r.get(rid)
            if rec.source == "upload":
                assert r.image_path(rid).is_file()
        ids = list(must_have)[:5]
        assert [row[0].id for row in r.search(np.stack([must_have[i] for i in ids]), 1)] == ids


def test_snapshot_includes_a_generation_and_restore_replays_from_it(tmp_path, rng):
    with IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path) as s:
        v = unit(rng, 30)
        ids = s.add(v, records(30))
        s.checkpoint()
        s.remove(ids[:4])  # after the generation: replayed on restore
        s.add(unit(rng, 2), records(2, 100))
        report = snapshot(tmp_path / "ix", tmp_path / "a.tar")
        want = sorted(h.id for h in s.search(v[:1], 100)[0])
    assert report.generation is not None and report.images == 28
    info = restore(tmp_path / "a.tar", tmp_path / "r")
    assert info["ntotal"] == 28 and info["pending_changes"] == 0
    with IndexStore.open(tmp_path / "r") as r:
        assert sorted(h.id for h in r.search(v[:1], 100)[0]) == want
        assert not set(ids[:4]) & {h.id for h in r.search(v[:4], 100)[0]}


def test_a_vanished_upload_is_left_out_with_its_record(tmp_path, rng):
    with IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path) as s:
        a = s.add_upload(b"aaa", unit(rng, 1)[0], label="a", ext="jpg")
        b = s.add_upload(b"bbb", unit(rng, 1)[0], label="b", ext="jpg")
    (tmp_path / "ix" / "uploads" / a.path).unlink()  # as if deleted between the two copy steps
    report = snapshot(tmp_path / "ix", tmp_path / "s.tar")
    assert report.dropped == [a.id] and report.images == 1 and report.uploads == 1
    restore(tmp_path / "s.tar", tmp_path / "r")
    with IndexStore.open(tmp_path / "r") as r:
        assert r.get(a.id) is None and r.get(b.id) is not None and len(r) == 1
        assert r.image_path(b.id).read_bytes() == b"bbb"


def _rewrite_tar(src, dst, change):
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            m2, data = change(m, data)
            if m2 is not None:
                tout.addfile(m2, io.BytesIO(data) if data is not None else None)


def test_restore_refuses_damaged_or_foreign_tars_and_non_empty_targets(tmp_path, rng):
    with IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path) as s:
        s.add(unit(rng, 5), records(5))
    snapshot(tmp_path / "ix", tmp_path / "ok.tar")
    with pytest.raises(FileExistsError):
        snapshot(tmp_path / "ix", tmp_path / "ok.tar")

    def flip(m, data):
        if m.name == "meta.sqlite":
            data = data[:-1] + bytes([data[-1] ^ 1])
        return m, data

    _rewrite_tar(tmp_path / "ok.tar", tmp_path / "flipped.tar", flip)
    with pytest.raises(CorruptIndexError, match="meta.sqlite is corrupt"):
        restore(tmp_path / "flipped.tar", tmp_path / "r1")
    assert not (tmp_path / "r1").exists()

    _rewrite_tar(tmp_path / "ok.tar", tmp_path / "short.tar", lambda m, d: (None, None) if m.name == "store.json" else (m, d))
    with pytest.raises(CorruptIndexError, match="missing"):
        restore(tmp_path / "short.tar", tmp_path / "r2")

    def escape(m, data):
        if m.name == "store.json":
            m.name = "../evil.json"
        return m, data

    _rewrite_tar(tmp_path / "ok.tar", tmp_path / "evil.tar", escape)
    with pytest.raises((CorruptIndexError, tarfile.TarError)):
        restore(tmp_path / "evil.tar", tmp_path / "r3")
    assert not (tmp_path / "evil.json").exists()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        restore(tmp_path / "ok.tar", tmp_path / "busy")
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(CorruptIndexError):
        restore(tmp_path / "junk.tar", tmp_path / "r4")
    assert restore(tmp_path / "ok.tar", tmp_path / "empty_ok")["ntotal"] == 5


def test_cli_snapshot_and_restore(tmp_path, rng, capsys):
    from lookalike.cli import main

    with IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path) as s:
        s.add(unit(rng, 7), records(7))
    assert main(["index", "snapshot", str(tmp_path / "ix"), str(tmp_path / "b.tar")]) == 0
    assert "7 images" in capsys.readouterr().out
    assert main(["index", "restore", str(tmp_path / "b.tar"), str(tmp_path / "r")]) == 0
    assert "restored" in capsys.readouterr().out
    assert main(["index", "restore", str(tmp_path / "b.tar"), str(tmp_path / "r")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_deleted_upload_waits_for_snapshots_then_is_purged(tmp_path, rng):
    """A snapshot that began before a delete still finds the bytes (uploads/.deleted/); a purge
    after the grace period removes them."""
    from index.store import DELETED_DIR, UPLOADS_DIR

    with IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path) as s:
        rec = s.add_upload(b"bytes of an upload", unit(rng, 1)[0], label="a", ext="jpg")
        live = tmp_path / "ix" / UPLOADS_DIR / rec.path
        assert live.is_file()
        s.remove([rec.id])
        assert not live.exists() and s.get(rec.id) is None
        kept = tmp_path / "ix" / UPLOADS_DIR / DELETED_DIR / rec.path
        assert kept.read_bytes() == b"bytes of an upload"
        assert s.purge_deleted(grace_s=3600) == 0 and kept.exists()
        assert s.purge_deleted(grace_s=0) == 1 and not kept.exists()
