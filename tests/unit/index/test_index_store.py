"""IndexStore: round trips, duplicates, uploads, persistence, replay, corruption, locks, snapshots."""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import pytest

from index import (CorruptIndexError, ImageRecord, IndexLockedError, IndexStore, IndexStoreError,
                   ModelMismatchError, SearchHit)
from index import generations as gens
from tests.unit.index.helpers import DIM, make_card, records, unit


@pytest.fixture
def store(tmp_path, card):
    s = IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path / "images")
    yield s
    s.close()


def test_add_search_remove_round_trip(store, rng):
    v = unit(rng, 50)
    ids = store.add(v, records(50))
    assert len(set(ids)) == 50 and len(store) == 50
    hits = store.search(v[:3], 5)
    assert [row[0].id for row in hits] == ids[:3]
    for row in hits:
        assert isinstance(row[0], SearchHit) and row[0].score == pytest.approx(1.0, abs=1e-5)
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert hits[0][0].path == "x/0.jpg" and hits[0][0].label == "x"
    assert store.remove([ids[0], ids[1], 999_999]) == 2
    assert len(store) == 48
    assert all(h.id not in (ids[0], ids[1]) for row in store.search(v[:2], 48) for h in row)
    assert store.get(ids[0]) is None
    rec = store.get(ids[5])
    assert isinstance(rec, ImageRecord) and rec.sha256 == records(50)[5]["sha256"] and rec.source == "folder"


def test_search_never_returns_minus_one_and_caps_k(store, rng):
    assert store.search(unit(rng, 2), 10) == [[], []]
    v = unit(rng, 3)
    store.add(v, records(3))
    hits = store.search(v, 10)
    assert [len(r) for r in hits] == [3, 3, 3] and all(h.id >= 0 for r in hits for h in r)
    with pytest.raises(ValueError, match="k must be"):
        store.search(v, 0)
    with pytest.raises(ValueError, match=r"\(Q, 16\)"):
        store.search(np.ones((2, 5), np.float32), 3)
    with pytest.raises(ValueError, match="zero"):
        store.search(np.zeros((1, DIM), np.float32), 3)


def test_search_by_id_excludes_itself(store, rng):
    v = unit(rng, 20)
    ids = store.add(v, records(20))
    hits = store.search_by_id(ids[4], 5)
    assert len(hits) == 5 and ids[4] not in [h.id for h in hits]
    oracle = np.argsort(-(v @ v[4]))[1:6]
    assert [h.id for h in hits] == [ids[i] for i in oracle]
    with pytest.raises(KeyError):
        store.search_by_id(123456, 5)


def test_duplicates_by_sha256_are_not_added_twice(store, rng):
    v = unit(rng, 10)
    ids = store.add(v, records(10))
    again = store.add(unit(rng, 10), records(10))  # same sha256s, other paths' vectors
    assert again == ids and len(store) == 10
    recs = records(2, 100)
    recs[1]["sha256"] = recs[0]["sha256"]
    recs[1]["path"] = "x/copy.jpg"
    two = store.add(unit(rng, 2), recs)
    assert two[0] == two[1] and len(store) == 11


def test_add_validates_vectors_and_records(store, rng):
    with pytest.raises(ValueError, match="unit norm"):
        store.add(unit(rng, 2) * 2, records(2))
    with pytest.raises(ValueError, match="NaN"):
        store.add(np.full((1, DIM), np.nan, np.float32), records(1))
    bad = records(1)
    bad[0]["path"] = "../etc/passwd"
    with pytest.raises(ValueError, match="must not contain"):
        store.add(unit(rng, 1), bad)
    bad = records(1)
    bad[0]["source"] = "web"
    with pytest.raises(ValueError, match="allowed"):
        store.add(unit(rng, 1), bad)
    with pytest.raises(ValueError, match="2 vectors but 1 records"):
        store.add(unit(rng, 2), records(1))
    assert len(store) == 0


def test_add_upload_stores_bytes_once_and_resolves_paths(store, rng, tmp_path):
    data = b"\xff\xd8\xff" + bytes(range(256)) * 4
    v = unit(rng, 1)[0]
    rec = store.add_upload(data, v, label="gull", ext=".JPG")
    sha = hashlib.sha256(data).hexdigest()
    assert rec.source == "upload" and rec.sha256 == sha and rec.path == f"{sha}.jpg" and rec.label == "gull"
    p = store.image_path(rec.id)
    assert p == (tmp_path / "ix" / "uploads" / f"{sha}.jpg").resolve() and p.read_bytes() == data
    assert store.add_upload(data, v, label="other", ext="png").id == rec.id and len(store) == 1
    with pytest.raises(ValueError, match="extension"):
        store.add_upload(b"x", v, label=None, ext="../sh")
    assert store.remove([rec.id]) == 1
    assert not p.exists() and store.image_path(rec.id) is None


def test_image_path_never_escapes_its_root(store, rng, tmp_path):
    images = tmp_path / "images"
    (images / "x").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"s")
    (images / "x" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (images / "x" / "ok.jpg").write_bytes(b"o")
    recs = records(2)
    recs[0]["path"], recs[1]["path"] = "x/link.jpg", "x/ok.jpg"
    a, b = store.add(unit(rng, 2), recs)
    assert store.image_path(a) is None  # resolves outside images_root
    assert store.image_path(b) == (images / "x" / "ok.jpg").resolve()
    assert store.image_path(424242) is None


def test_state_survives_reopen_without_checkpoint(tmp_path, card, rng):
    """Acknowledged adds/deletes are in SQLite; reopening replays them past the last generation."""
    s = IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path)
    v = unit(rng, 30)
    ids = s.add(v, records(30))
    s.checkpoint()
    more = s.add(unit(rng, 5), records(5, 30))
    s.remove(ids[:4] + more[:1])
    # simulate a crash: no checkpoint, no close, only the lock goes away as with a dead process
    s._lock.release()
    r = IndexStore.open(tmp_path / "ix", card=card, writable=True)
    expected = set(ids[4:]) | set(more[1:])
    assert len(r) == len(expected)
    got = {h.id for row in r.search(np.vstack([v, unit(rng, 5)]), 40) for h in row}
    assert got == expected
    assert r.info()["pending_changes"] > 0
    r.checkpoint()
    assert r.info()["pending_changes"] == 0
    r.close()
    s.db.close()


def test_generations_are_versioned_and_keep_the_previous(tmp_path, card, rng):
    s = IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path)
    s.add(unit(rng, 5), records(5))
    g2 = s.checkpoint()
    s.add(unit(rng, 5), records(5, 5))
    g3 = s.checkpoint()
    s.close()
    assert gens.list_generations(tmp_path / "ix") == [g3, g2]
    m = json.loads((gens.gen_path(tmp_path / "ix", g3) / "manifest.json").read_text())
    assert m["ntotal"] == 10 and m["dim"] == DIM and m["metric"] == "inner_product"
    assert m["fingerprint"] == card.fingerprint and m["faiss_version"] and m["factory"] == "Flat"
    assert set(m["files"]) == {"index.faiss", "records.sqlite"}
    for name, f in m["files"].items():
        assert gens.sha256_file(gens.gen_path(tmp_path / "ix", g3) / name) == f["sha256"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_corrupt_generation_is_refused_and_previous_used(tmp_path, card, rng, damage, caplog):
    s = IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path)
    v = unit(rng, 40)
    ids = s.add(v[:20], records(20))
    g_prev = s.checkpoint()
    ids += s.add(v[20:], records(20, 20))
    s.remove(ids[:3])
    g_new = s.checkpoint()
    s.close()
    f = gens.gen_path(tmp_path / "ix", g_new) / "index.faiss"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage == "delete":
        f.unlink()
    else:
        (f.parent / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match=str(g_new)):
        gens.verify(tmp_path / "ix", g_new, dim=DIM, fingerprint=card.fingerprint)
    r = IndexStore.open(tmp_path / "ix", card=card)
    assert r.generation == g_prev
    assert len(r.refused) == 1 and f"{g_new:06d}" in r.refused[0]
    assert "refusing index generation" in caplog.text
    # the previous generation plus the replayed log gives the full acknowledged state
    assert len(r) == 37
    assert {h.id for row in r.search(v, 40) for h in row} == set(ids[3:])
    assert r.info()["refused_generations"] == r.refused
    r.close()


def test_all_generations_corrupt_rebuilds_from_stored_vectors(tmp_path, card, rng):
    s = IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path)
    v = unit(rng, 12)
    ids = s.add(v, records(12))
    s.checkpoint()
    s.close()
    for g in gens.list_generations(tmp_path / "ix"):
        (gens.gen_path(tmp_path / "ix", g) / "index.faiss").write_bytes(b"garbage")
    r = IndexStore.open(tmp_path / "ix", card=card)
    assert len(r.refused) == 2 and len(r) == 12
    assert [row[0].id for row in r.search(v, 1)] == ids
    r.close()


def test_fingerprint_mismatch_is_refused_naming_both(tmp_path, card):
    IndexStore.create(tmp_path / "ix", card=card, images_root=None).close()
    other = make_card("b")
    with pytest.raises(ModelMismatchError) as exc:
        IndexStore.open(tmp_path / "ix", card=other)
    assert card.fingerprint in str(exc.value) and other.fingerprint in str(exc.value)
    assert isinstance(exc.value, IndexStoreError) and isinstance(exc.value, RuntimeError)


def test_second_writer_is_refused_and_readers_are_not(tmp_path, card, rng):
    w = IndexStore.create(tmp_path / "ix", card=card, images_root=None)
    with pytest.raises(IndexLockedError, match="holds the index lock"):
        IndexStore.open(tmp_path / "ix", writable=True)
    reader = IndexStore.open(tmp_path / "ix")
    with pytest.raises(IndexStoreError, match="read-only"):
        reader.add(unit(rng, 1), records(1))
    w.add(unit(rng, 3), records(3))
    assert len(reader) == 0 and reader.refresh() == 3 and len(reader) == 3  # catches up from the log
    w.close()
    IndexStore.open(tmp_path / "ix", writable=True).close()  # free again after close
    reader.close()


def test_create_refuses_existing_index(tmp_path, card):
    IndexStore.create(tmp_path / "ix", card=card, images_root=None).close()
    with pytest.raises(FileExistsError, match="already exists"):
        IndexStore.create(tmp_path / "ix", card=card, images_root=None)
    with pytest.raises(FileNotFoundError, match="not a lookalike index"):
        IndexStore.open(tmp_path / "nothing")


def test_searches_see_whole_batches_while_writes_run(tmp_path, card):
    """Each add of a batch is atomic for searches: a query sees all 8 copies of a batch or none."""
    s = IndexStore.create(tmp_path / "ix", card=card, images_root=None)
    rng = np.random.default_rng(5)
    dirs = unit(rng, 40)
    errors: list[str] = []
    stop = threading.Event()

    def writer():
        for b in range(40):
            recs = records(8, b * 8)
            ids = s.add(np.repeat(dirs[b: b + 1], 8, axis=0), recs)
            if b % 3 == 0:
                s.remove(ids)
        stop.set()

    def reader():
        while not stop.is_set():
            for b in range(40):
                row = s.search(dirs[b: b + 1], 8)[0]
                n_same = sum(1 for h in row if h.score > 0.9999)
                if n_same not in (0, 8):
                    errors.append(f"batch {b}: saw {n_same} of 8")
                if any(h.id < 0 for h in row):
                    errors.append("negative id")

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:5]
    assert len(s) == 8 * (40 - 14)
    s.close()


def test_closed_store_refuses_writes(tmp_path, card, rng):
    s = IndexStore.create(tmp_path / "ix", card=card, images_root=None)
    s.close()
    with pytest.raises(IndexStoreError, match="closed"):
        s.add(unit(rng, 1), records(1))
