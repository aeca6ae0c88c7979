"""IndexStore behaviour at its edges: FAISS and SQLite out of step, the IVF floor and re-tuning,
the unit-norm tolerance, duplicate uploads, the recall target's range and the root-path guard."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from index import IndexStore, IndexStoreError
from index.metadata import MetadataDB
from tests.unit.index.helpers import DIM, records, unit


@pytest.fixture
def store(tmp_path, card):
    s = IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path / "images")
    yield s
    s.close()


def test_a_replay_that_leaves_faiss_short_of_the_metadata_rebuilds_from_the_stored_vectors(
        tmp_path, card, rng, monkeypatch):
    """If the change log cannot bring the generation up to the metadata (FAISS holds fewer
    vectors than SQLite has rows), the store rebuilds from the stored vectors: every row is
    searchable again."""
    v = unit(rng, 30)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path) as s:
        s.add(v[:20], records(20))
        s.checkpoint()
        s.add(v[20:], records(10, 20))
    empty = (lambda con, seq, dim: ([], np.zeros(0, np.int64), np.zeros((0, dim), np.float32), seq))
    monkeypatch.setattr(MetadataDB, "changes_since", staticmethod(empty))  # the log "lost"
    with IndexStore.open(tmp_path / "ix", card=card) as s:
        assert len(s) == 30
        hits = s.search(v[25:26], 1)[0]
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_an_explicit_ivf_stays_exact_below_39_vectors_per_list(tmp_path, card, rng):
    """faiss wants ~39 training vectors per centroid: IVF4 needs 156 vectors, else Flat."""
    v = unit(rng, 156)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path, factory="IVF4,Flat") as s:
        s.add(v[:155], records(155))
        s.checkpoint()
        assert s.info()["factory"] == "Flat"
        s.add(v[155:], records(1, 155))
        s.checkpoint()
        assert s.info()["factory"] == "IVF4,Flat"


def test_an_ivf_index_is_retuned_when_the_collection_grows_past_the_drift(tmp_path, card, rng):
    v = unit(rng, 400)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path, factory="IVF4,Flat") as s:
        s.add(v[:200], records(200))
        s.checkpoint()
        assert s.info()["recall_measured_on"]["ntotal"] == 200
        s.add(v[200:240], records(40, 200))  # +20%: not past the drift
        s.checkpoint()
        assert s.info()["recall_measured_on"]["ntotal"] == 200
        s.add(v[240:], records(160, 240))  # +100%
        s.checkpoint()
        info = s.info()
        assert info["factory"] == "IVF4,Flat"
        assert info["recall_measured_on"]["ntotal"] == 400
        assert info["recall_at_10"] >= info["recall_target"]


@pytest.mark.parametrize("norm,ok", [(1.0, True), (1.0 + 9e-4, True), (1.0 - 9e-4, True),
                                     (1.0 + 1.5e-3, False), (1.0 - 1.5e-3, False), (2.0, False)])
def test_vectors_must_be_unit_norm_within_a_thousandth(store, rng, norm, ok):
    v = unit(rng, 2) * np.float32(norm)
    if ok:
        store.add(v, records(2))
        np.testing.assert_allclose(np.linalg.norm(store.vector(1)), 1.0, atol=1e-6)  # stored normalised
    else:
        with pytest.raises(ValueError, match="unit norm"):
            store.add(v, records(2))
        assert len(store) == 0


def test_a_zero_query_is_refused_and_any_other_is_normalised(store, rng):
    v = unit(rng, 5)
    store.add(v, records(5))
    with pytest.raises(ValueError):
        store.search(np.zeros((1, DIM), np.float32), 1)
    hits = store.search(v[2:3] * 7.0, 1)[0]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_the_same_bytes_uploaded_twice_write_one_file(store, rng):
    data = b"\xff\xd8\xff" + bytes(range(200))
    first = store.add_upload(data, unit(rng, 1)[0], label=None, ext="jpg")
    again = store.add_upload(data, unit(rng, 1)[0], label="other", ext="png")
    assert again.id == first.id and len(store) == 1
    assert sorted(p.name for p in (store.directory / "uploads").iterdir() if p.is_file()) == \
        [f"{hashlib.sha256(data).hexdigest()}.jpg"]


def test_an_upload_that_fails_to_index_leaves_no_file(store, rng, monkeypatch):
    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.db, "add", full)
    with pytest.raises(OSError):
        store.add_upload(b"\x89PNG\r\n\x1a\n" + b"x" * 50, unit(rng, 1)[0], label=None, ext="png")
    up = store.directory / "uploads"
    assert not up.exists() or not [p for p in up.iterdir() if p.is_file()]


@pytest.mark.parametrize("target,ok", [(1.0, True), (0.5, True), (1.0001, False), (0.0, False), (-0.1, False)])
def test_recall_target_is_in_zero_one_inclusive_of_one(tmp_path, card, target, ok):
    if ok:
        with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path, recall_target=target) as s:
            assert s.info()["recall_target"] == target
    else:
        with pytest.raises(ValueError, match="recall_target"):
            IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path, recall_target=target)


@pytest.mark.parametrize("path", [".", "a/..", "./."])
def test_a_record_that_names_the_root_itself_has_no_image_path(tmp_path, card, rng, path):
    (tmp_path / "images").mkdir()
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path / "images") as s:
        rec = {"path": path, "label": None, "sha256": "ab" * 32, "size": 1, "mtime": 1.0, "source": "folder"}
        try:
            (i,) = s.add(unit(rng, 1), [rec])
        except ValueError:
            return  # refused at the door is as good
        assert s.image_path(i) is None


def test_an_image_path_resolves_inside_its_root(tmp_path, card, rng):
    root = tmp_path / "images"
    (root / "x").mkdir(parents=True)
    (root / "x" / "0.jpg").write_bytes(b"j")
    with IndexStore.create(tmp_path / "ix", card=card, images_root=root) as s:
        (i,) = s.add(unit(rng, 1), records(1))
        assert s.image_path(i) == (root / "x" / "0.jpg").resolve()
        assert s.image_path(i + 100) is None



# ---------------------------------------------------------------------------- lifecycle


def test_a_read_only_store_refuses_every_write(tmp_path, card, rng):
    d = tmp_path / "ix"
    with IndexStore.create(d, card=card, images_root=tmp_path) as s:
        s.add(unit(rng, 3), records(3))
    with IndexStore.open(d, card=card) as ro:
        for write in (lambda: ro.add(unit(rng, 1), records(1, 3)),
                      lambda: ro.add_upload(b"\xff\xd8\xff" + b"x" * 20, unit(rng, 1)[0], label=None, ext="jpg"),
                      lambda: ro.remove([1]), ro.checkpoint, ro.sweep):
            with pytest.raises(IndexStoreError, match="read-only"):
                write()
        assert len(ro) == 3


def test_a_closed_store_refuses_writes_and_closes_once(store, rng):
    store.add(unit(rng, 2), records(2))
    store.close()
    with pytest.raises(IndexStoreError, match="the index is closed"):
        store.add(unit(rng, 1), records(1, 2))
    store.close()  # idempotent


def test_a_failed_writable_open_releases_the_writer_lock(tmp_path, card, monkeypatch):
    d = tmp_path / "ix"
    IndexStore.create(d, card=card, images_root=tmp_path).close()

    def broken(self):
        raise RuntimeError("load failed")

    with monkeypatch.context() as m:
        m.setattr(IndexStore, "_load", broken)
        with pytest.raises(RuntimeError, match="load failed"):
            IndexStore.open(d, card=card, writable=True)
    IndexStore.open(d, card=card, writable=True).close()  # not IndexLockedError


def test_open_with_another_images_root_resolves_paths_there(tmp_path, card, rng):
    d = tmp_path / "ix"
    with IndexStore.create(d, card=card, images_root=tmp_path / "old") as s:
        (i,) = s.add(unit(rng, 1), records(1))
    moved = tmp_path / "new"
    (moved / "x").mkdir(parents=True)
    (moved / "x" / "0.jpg").write_bytes(b"j")
    with IndexStore.open(d, card=card, images_root=moved) as s:
        assert s.image_path(i) == (moved / "x" / "0.jpg").resolve()


def test_vectors_of_the_wrong_width_are_refused_by_name(store, rng):
    with pytest.raises(ValueError, match=rf"\(N, {DIM}\)"):
        store.add(unit(rng, 2, DIM + 1), records(2))


def test_the_start_up_sweep_keeps_hidden_entries_of_uploads(tmp_path, card, rng):
    d = tmp_path / "ix"
    with IndexStore.create(d, card=card, images_root=tmp_path) as s:
        rec = s.add_upload(b"\xff\xd8\xff" + b"y" * 40, unit(rng, 1)[0], label=None, ext="jpg")
        s.remove([rec.id])  # its bytes wait in uploads/.deleted/
    trash = d / "uploads" / ".deleted"
    assert [p.name for p in trash.iterdir()] == [rec.path]
    with IndexStore.open(d, card=card, writable=True) as s:
        assert s.sweep() == {"temporary": 0, "orphan_uploads": 0}
    assert [p.name for p in trash.iterdir()] == [rec.path]


def test_a_removed_upload_is_deleted_when_it_cannot_be_moved_to_the_trash(store, rng, monkeypatch):
    import os

    rec = store.add_upload(b"\xff\xd8\xff" + b"z" * 40, unit(rng, 1)[0], label=None, ext="jpg")
    src = store.directory / "uploads" / rec.path

    def cross_device(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", cross_device)
    assert store.remove([rec.id]) == 1
    assert not src.exists()


def test_a_checkpoint_purges_trash_older_than_the_grace_period(store, rng, monkeypatch):
    import time

    rec = store.add_upload(b"\xff\xd8\xff" + b"w" * 40, unit(rng, 1)[0], label=None, ext="jpg")
    store.remove([rec.id])
    trash = store.directory / "uploads" / ".deleted"
    store.checkpoint()
    assert [p.name for p in trash.iterdir()] == [rec.path]  # within the grace period
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    store.checkpoint()
    assert list(trash.iterdir()) == []


def test_a_search_skips_a_hit_deleted_after_its_snapshot(store, rng, monkeypatch):
    v = unit(rng, 5)
    ids = store.add(v, records(5))
    real = store.db.get_many
    monkeypatch.setattr(store.db, "get_many", lambda wanted: {i: r for i, r in real(wanted).items() if i != ids[0]})
    hits = store.search(v[:1], 3)[0]
    assert [h.id for h in hits] and ids[0] not in [h.id for h in hits]


def test_refresh_after_the_writer_pruned_the_log_reloads_and_says_so(tmp_path, card, rng, caplog):
    d = tmp_path / "ix"
    v = unit(rng, 18)
    with IndexStore.create(d, card=card, images_root=tmp_path) as w:
        w.add(v[:3], records(3))
        w.checkpoint()
        with IndexStore.open(d, card=card) as reader:
            w.add(v[3:6], records(3, 3))
            assert reader.refresh() == 3  # replayed from the log
            assert len(reader) == 6 and "rebuilding" not in caplog.text  # applied, not rebuilt
            for start in range(6, 18, 3):  # generations pile up; the log before the oldest kept is pruned
                w.add(v[start:start + 3], records(3, start))
                w.checkpoint()
            assert reader.refresh() == -1  # reloaded from a generation
            assert len(reader) == 18


def test_auto_keeps_its_ivf_until_the_list_count_is_4x_off(tmp_path, card, monkeypatch):
    """Hysteresis: growing from nlist 32 to a wanted 64 keeps the trained index."""
    from index import ann
    from tests.unit.index.helpers import clustered

    monkeypatch.setattr(ann, "FLAT_MAX_ELEMENTS", 1000 * DIM)
    v = clustered(np.random.default_rng(5), 8000, DIM, clusters=64)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path) as s:
        s.add(v[:2000], records(2000))
        s.checkpoint()
        assert s.info()["factory"] == "IVF32,Flat"
        s.add(v[2000:], records(6000, 2000))
        s.checkpoint()
        info = s.info()
        assert info["factory"] == "IVF32,Flat"  # nlist_for(8000) = 64: 2x, kept
        assert info["recall_measured_on"] == {"queries": 800, "ntotal": 8000}  # re-tuned on a tenth


def test_create_over_a_crashed_create_starts_clean(tmp_path, card, rng):
    d = tmp_path / "ix"
    (d / "generations" / "000009").mkdir(parents=True)  # debris of a create killed before store.json
    (d / "generations" / "000009" / "manifest.json").write_text("{}")
    with IndexStore.create(d, card=card, images_root=tmp_path) as s:
        assert sorted(p.name for p in (d / "generations").iterdir()) == ["000001"]
        s.add(unit(rng, 2), records(2))
        assert len(s) == 2


def test_a_failed_create_releases_the_writer_lock(tmp_path, card, monkeypatch):
    import index.store as store_mod

    def broken(*a, **kw):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(store_mod, "MetadataDB", broken)
        with pytest.raises(OSError):
            IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path)
    IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path).close()  # not IndexLockedError


@pytest.mark.parametrize("change", [{"version": 999}, {"format": "other"}])
def test_an_index_of_another_format_or_version_is_refused(tmp_path, card, change):
    import json

    from index import CorruptIndexError

    d = tmp_path / "ix"
    IndexStore.create(d, card=card, images_root=tmp_path).close()
    cfg = json.loads((d / "store.json").read_text())
    (d / "store.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CorruptIndexError, match="lookalike index"):
        IndexStore.open(d, card=card)


def test_a_single_query_vector_and_scores_are_cosines(store, rng):
    v = unit(rng, 6)
    store.add(v, records(6))
    one = store.search(v[2] * 7.0, 3)  # (D,) and not unit norm
    assert [h.id for h in one[0]] == [h.id for h in store.search(v[2:3], 3)[0]]
    scores = [h.score for h in one[0]]
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(scores[1:], [float(v[2] @ store.vector(h.id)) for h in one[0][1:]], atol=1e-5)


def test_each_removed_upload_waits_in_the_trash(store, rng):
    recs = [store.add_upload(b"\xff\xd8\xff" + bytes([i]) * 30, unit(rng, 1)[0], label=None, ext="jpg")
            for i in range(2)]
    for r in recs:
        store.remove([r.id])
    assert sorted(p.name for p in (store.directory / "uploads" / ".deleted").iterdir()) == sorted(r.path for r in recs)


def test_auto_keeps_its_ivf_when_the_collection_halves(tmp_path, card, monkeypatch):
    from index import ann
    from tests.unit.index.helpers import clustered

    monkeypatch.setattr(ann, "FLAT_MAX_ELEMENTS", 1000 * DIM)
    v = clustered(np.random.default_rng(6), 8000, DIM, clusters=64)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path) as s:
        ids = s.add(v, records(8000))
        s.checkpoint()
        assert s.info()["factory"] == "IVF64,Flat"
        s.remove(ids[:6000])
        s.checkpoint()
        assert s.info()["factory"] == "IVF64,Flat"  # nlist_for(2000) = 32: 2x off, kept


def test_the_sweep_leaves_a_directory_that_looks_like_a_temporary_file(tmp_path, card):
    d = tmp_path / "ix"
    IndexStore.create(d, card=card, images_root=tmp_path).close()
    (d / ".odd.tmp").mkdir()
    with IndexStore.open(d, card=card, writable=True) as s:
        assert s.sweep()["temporary"] == 0
    assert (d / ".odd.tmp").is_dir()


def test_a_filtered_ivf_search_with_fewer_matches_than_k_returns_them_all(tmp_path, card, rng):
    v = unit(rng, 200)
    recs = records(198) + records(2, 198, label="rare")
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path, factory="IVF4,Flat") as s:
        s.add(v, recs)
        s.checkpoint()
        assert s.info()["factory"] == "IVF4,Flat"
        hits = s.search(v[:1], 5, label="rare")[0]
        assert sorted(h.path for h in hits) == sorted(r["path"] for r in recs[198:])


def test_a_store_without_a_usable_generation_rebuilds_and_reports_none(tmp_path, card, rng):
    import shutil

    d = tmp_path / "ix"
    v = unit(rng, 4)
    with IndexStore.create(d, card=card, images_root=tmp_path) as s:
        s.add(v, records(4))
    shutil.rmtree(d / "generations")
    with IndexStore.open(d, card=card) as s:
        assert len(s) == 4 and s.info()["generation"] == 0
        assert s.info()["pending_changes"] == 4  # the four adds, none published
        assert s.search(v[1:2], 1)[0][0].score == pytest.approx(1.0, abs=1e-5)


def test_an_explicit_two_list_ivf_replaces_flat_once_it_has_enough_vectors(tmp_path, card, rng):
    v = unit(rng, 78)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path, factory="IVF2,Flat") as s:
        s.add(v, records(78))
        s.checkpoint()
        assert s.info()["factory"] == "IVF2,Flat"
