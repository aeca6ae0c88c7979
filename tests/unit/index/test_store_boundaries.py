"""IndexStore behaviour at its edges: FAISS and SQLite out of step, the IVF floor and re-tuning,
the unit-norm tolerance, duplicate uploads, the recall target's range and the root-path guard."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from index import IndexStore
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

