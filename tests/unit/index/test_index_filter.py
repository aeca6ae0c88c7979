"""Filtered and paged search against a numpy brute-force ranking (Flat and IVF)."""

from __future__ import annotations

import numpy as np
import pytest

from index import IndexStore, ann
from tests.unit.index.helpers import DIM, clustered, make_card, records, unit

LABELS = ("crow", "finch", "gull", None)


def _labelled_store(tmp_path, vectors: np.ndarray, labels: list[str | None], factory: str = "Flat") -> tuple:
    """A store holding ``vectors`` with ``labels``; returns (store, (N,) int64 ids)."""
    store = IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path, factory=factory)
    recs = []
    for i, lab in enumerate(labels):
        (r,) = records(1, i, label=lab)
        recs.append(r)
    ids = np.asarray(store.add(vectors, recs), dtype=np.int64)
    return store, ids


def _oracle(q: np.ndarray, base: np.ndarray, ids: np.ndarray, mask: np.ndarray, k: int,
            offset: int = 0) -> list[list[int]]:
    """Brute force: ids of ranks offset..offset+k-1 among ``base[mask]`` by inner product, per query."""
    s = q @ base[mask].T
    order = np.argsort(-s, axis=1, kind="stable")[:, offset: offset + k]
    return ids[mask][order].tolist()


@pytest.fixture
def labelled(tmp_path, rng):
    n = 400
    v = unit(rng, n)
    labels = [LABELS[i % len(LABELS)] if i % 11 else "rare" for i in range(n)]  # "rare": 37 images
    store, ids = _labelled_store(tmp_path, v, labels)
    yield store, v, ids, np.asarray(labels, dtype=object)
    store.close()


@pytest.mark.parametrize("label", ["crow", "finch", "rare"])
@pytest.mark.parametrize("k", [1, 10, 30])
def test_label_filter_keeps_exactly_k_of_that_label_and_matches_bruteforce(labelled, rng, label, k):
    store, v, ids, labels = labelled
    q = unit(rng, 8)
    hits = store.search(q, k, label=label)
    assert [len(row) for row in hits] == [k] * len(q)
    assert all(h.label == label for row in hits for h in row)
    assert [[h.id for h in row] for row in hits] == _oracle(q, v, ids, labels == label, k)


def test_exclude_label_matches_bruteforce_and_keeps_unlabelled(labelled, rng):
    store, v, ids, labels = labelled
    q = unit(rng, 8)
    hits = store.search(q, 50, exclude_label="crow")
    assert [len(row) for row in hits] == [50] * len(q)
    assert all(h.label != "crow" for row in hits for h in row)
    assert any(h.label is None for row in hits for h in row)
    assert [[h.id for h in row] for row in hits] == _oracle(q, v, ids, labels != "crow", 50)


def test_filter_with_fewer_matches_than_k_returns_all_of_them(labelled, rng):
    store, v, ids, labels = labelled
    (row,) = store.search(unit(rng, 1), 100, label="rare")
    assert len(row) == int((labels == "rare").sum()) == 37
    assert store.search(unit(rng, 2), 5, label="no such label") == [[], []]
    assert store.search(unit(rng, 1), 5, label="crow", exclude_label="crow") == [[]]


def test_label_and_excluded_ids_combine(labelled, rng):
    store, v, ids, labels = labelled
    crows = ids[labels == "crow"]
    q = v[np.flatnonzero(labels == "crow")[:1]]
    (row,) = store.search(q, 5, label="crow", exclude_ids=crows[:3].tolist())
    mask = (labels == "crow") & ~np.isin(ids, crows[:3])
    assert [h.id for h in row] == _oracle(q, v, ids, mask, 5)[0]
    (row,) = store.search(q, 5, exclude_ids=crows[:3].tolist())
    assert [h.id for h in row] == _oracle(q, v, ids, ~np.isin(ids, crows[:3]), 5)[0]


@pytest.mark.parametrize("filters", [{}, {"label": "gull"}, {"exclude_label": "finch"}])
def test_pages_concatenate_to_the_top_k(labelled, rng, filters):
    store, v, ids, labels = labelled
    q = unit(rng, 4)
    top = store.search(q, 60, **filters)
    pages = [store.search(q, 15, offset=off, **filters) for off in range(0, 60, 15)]
    for i in range(len(q)):
        assert [h.id for p in pages for h in p[i]] == [h.id for h in top[i]]
        assert [h.score for p in pages for h in p[i]] == [h.score for h in top[i]]


def test_offset_past_the_end_is_empty_and_bad_windows_are_refused(labelled, rng):
    store, *_ = labelled
    q = unit(rng, 1)
    assert store.search(q, 10, offset=395) != [[]] and len(store.search(q, 10, offset=395)[0]) == 5
    assert store.search(q, 10, offset=400) == [[]]
    with pytest.raises(ValueError, match="offset must be"):
        store.search(q, 10, offset=-1)
    with pytest.raises(ValueError, match="k must be"):
        store.search(q, 0, label="crow")


def test_search_by_id_filters_pages_and_excludes_itself(labelled):
    store, v, ids, labels = labelled
    i = int(np.flatnonzero(labels == "gull")[0])
    me = int(ids[i])
    mask = (labels == "gull") & (ids != me)
    got = store.search_by_id(me, 10, label="gull")
    assert [h.id for h in got] == _oracle(v[i: i + 1], v, ids, mask, 10)[0]
    page2 = store.search_by_id(me, 5, offset=5, label="gull")
    assert [h.id for h in page2] == [h.id for h in got[5:]]
    unf = store.search_by_id(me, 12)
    assert [h.id for h in unf] == _oracle(v[i: i + 1], v, ids, ids != me, 12)[0]
    assert [h.id for h in store.search_by_id(me, 4, offset=8)] == [h.id for h in unf[8:12]]
    other = store.search_by_id(me, 10, exclude_label="gull")
    assert all(h.label != "gull" for h in other) and len(other) == 10


def test_deleted_ids_never_pass_the_filter(labelled, rng):
    store, v, ids, labels = labelled
    crows = ids[labels == "crow"]
    store.remove(crows[:50].tolist())
    q = unit(rng, 3)
    hits = store.search(q, 200, label="crow")
    assert [len(r) for r in hits] == [len(crows) - 50] * 3
    assert not {h.id for r in hits for h in r} & set(crows[:50].tolist())


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,SQ8"])
def test_ivf_filter_raises_nprobe_until_k_matches_are_found(tmp_path, rng, factory):
    """At nprobe=1 a query's one probed list holds ~1 of 20 "rare" images, so without raising
    nprobe the filter would return ~1 hit; it must return exactly k, the brute-force top-k."""
    n = 16 * 40
    v = clustered(rng, n, DIM, clusters=16, spread=0.3)
    labels = np.asarray(["common"] * n, dtype=object)
    labels[rng.choice(n, 20, replace=False)] = "rare"
    store, ids = _labelled_store(tmp_path, v, labels.tolist(), factory=factory)
    store.checkpoint()  # restructures to the IVF factory (enough vectors to train it)
    assert store.info()["factory"] == factory
    ann.set_params(store._index, {"nprobe": 1})
    q = unit(rng, 6)
    hits = store.search(q, 10, label="rare")
    assert [len(r) for r in hits] == [10] * len(q)
    assert all(h.label == "rare" for r in hits for h in r)
    if factory == "IVF16,Flat":  # exact distances: once every list is scanned, this is brute force
        assert [[h.id for h in r] for r in hits] == _oracle(q, v, ids, labels == "rare", 10)
    assert len(store.search(q[:1], 10, exclude_label="rare")[0]) == 10
    store.close()
