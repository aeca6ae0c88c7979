"""FAISS layer: exactness of Flat against a numpy oracle, IVF recall against its target."""

from __future__ import annotations


import numpy as np
import pytest

from index import IndexStore, ann
from tests.unit.index.helpers import DIM, clustered, make_card, records, unit


def numpy_topk(q: np.ndarray, base: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ base.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), ids[order]


def store_with_deletions(tmp_path, rng, n: int, every: int) -> tuple[IndexStore, np.ndarray, np.ndarray]:
    """A Flat store of ``n`` random unit vectors with every ``every``-th removed ->
    (store, remaining vectors (M, D), their ids (M,))."""
    store = IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path)
    v = unit(rng, n)
    ids = np.asarray(store.add(v, records(n)))
    gone = ids[::every]
    store.remove(gone.tolist())
    keep = ~np.isin(ids, gone)
    return store, v[keep], ids[keep]


def test_flat_search_equals_numpy_bruteforce(tmp_path, rng):
    store, base, base_ids = store_with_deletions(tmp_path, rng, 500, 7)
    q = unit(rng, 40)
    for k in (1, 10, 37):
        hits = store.search(q, k)
        scores, oracle = numpy_topk(q, base, base_ids, k)
        assert [[h.id for h in row] for row in hits] == oracle.tolist()
        np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, atol=2e-6)
    store.close()


def test_lone_and_batched_queries_rank_alike_on_every_exact_path(tmp_path, rng, monkeypatch):
    """1 query takes FAISS's sequential scan, 2-3 the blocked scan, larger batches FAISS's BLAS
    path: each query's hits are the brute-force ones whichever path its batch size sends it down."""
    monkeypatch.setattr(ann, "BLOCK_BYTES", 64 * 4 * DIM)  # 64-row blocks: 300 rows span five
    store = IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path)
    v = unit(rng, 300)
    ids = np.asarray(store.add(v, records(300)))
    q = unit(rng, 5)
    _, oracle = numpy_topk(q, v, ids, 10)
    one_at_a_time = [[h.id for h in store.search(q[i:i + 1], 10)[0]] for i in range(5)]
    pairs = [[h.id for h in row] for row in store.search(q[:2], 10)]
    triples = [[h.id for h in row] for row in store.search(q[2:], 10)]
    batched = [[h.id for h in row] for row in store.search(q, 10)]
    assert one_at_a_time == batched == oracle.tolist()
    assert pairs + triples == oracle.tolist()
    store.close()


def test_the_blocked_scan_finds_the_exact_top_k_across_block_edges(rng, monkeypatch):
    """Rows split into 64-row blocks (the last one short): every query of a small batch gets the
    brute-force top-k with its scores, mapped to the index's ids; k past the row count returns all."""
    monkeypatch.setattr(ann, "BLOCK_BYTES", 64 * 4 * DIM)
    rows = unit(rng, 200)
    ids = np.arange(1000, 1200, dtype=np.int64)[::-1].copy()
    for nq in (2, 3):
        q = unit(rng, nq)
        scores, found = ann.blocked_exact_search(rows, ids, q, 70)
        truth_scores, truth = numpy_topk(q, rows, ids, 70)
        assert found.tolist() == truth.tolist() and found.dtype == np.int64
        np.testing.assert_allclose(scores, truth_scores, atol=2e-6)
    scores, found = ann.blocked_exact_search(rows, ids, unit(rng, 2), 500)
    assert found.shape == (2, 200) and sorted(found[0].tolist()) == sorted(ids.tolist())
    assert (np.diff(scores, axis=1) <= 0).all()


def test_a_lone_query_on_two_threads_ranks_like_brute_force(tmp_path, rng):
    """threads=2 sends an unfiltered single query over a Flat index to one BLAS product on two
    cores (ann.lone_exact_search): same hits, order and scores as brute force, deletions and
    paging included; filtered or batched queries keep FAISS's path, with the same answers."""
    store, base, base_ids = store_with_deletions(tmp_path, rng, 400, 5)
    assert ann.flat_rows(store._index) is not None
    for i in range(6):
        q = unit(rng, 1)
        for k, offset in ((1, 0), (10, 0), (7, 5), (400, 0)):
            two = store.search(q, k, offset=offset, threads=2)[0]
            one = store.search(q, k, offset=offset)[0]
            scores, oracle = numpy_topk(q, base, base_ids, min(offset + k, len(base_ids)))
            assert [h.id for h in two] == [h.id for h in one] == oracle[0, offset:].tolist()
            np.testing.assert_allclose([h.score for h in two], scores[0, offset:], atol=2e-6)
    store.add(unit(rng, 3), records(3, 1000, label="y"))
    labelled = store.search(unit(rng, 1), 5, label="y", threads=2)[0]
    assert len(labelled) == 3 and all(h.label == "y" for h in labelled)
    store.close()


def test_a_querys_scores_do_not_depend_on_the_path_that_found_them(tmp_path, rng):
    """Alone (sequential scan), on two threads (one BLAS product), in a batch of 3 (the blocked
    scan) or of 8 (FAISS's BLAS path), one query gets bit-identical scores and order, so
    separately fetched pages concatenate to the top-k even across near-ties (FAISS's paths alone
    differed by ~6e-8)."""
    store, _, _ = store_with_deletions(tmp_path, rng, 600, 9)
    q = unit(rng, 8)
    q[3] = q[2]  # one query twice in a batch
    batched = store.search(q, 12)
    for i in range(8):
        alone = store.search(q[i:i + 1], 12)[0]
        two = store.search(q[i:i + 1], 12, threads=2)[0]
        in_three = store.search(np.roll(q, -i, axis=0)[:3], 12)[0]
        paged = store.search(q[i:i + 1], 5, threads=2)[0] + store.search(q[i:i + 1], 7, offset=5)[0]
        assert alone == two == in_three == batched[i] == paged
    assert batched[2] == batched[3]
    store.close()


def test_exact_ties_are_ranked_by_id(tmp_path, rng):
    store = IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path)
    v = unit(rng, 1)
    ids = store.add(np.repeat(v, 5, axis=0), records(5))  # five identical vectors: one score
    hits = store.search(v, 3)[0]
    assert [h.id for h in hits] == sorted(ids)[:3]
    assert [h.id for h in store.search(v, 2, offset=3)[0]] == sorted(ids)[3:]
    store.close()


def test_lone_exact_search_on_few_rows_and_other_indexes():
    rows = np.eye(3, 4, dtype=np.float32)
    ids = np.array([7, 8, 9], dtype=np.int64)
    scores, found = ann.lone_exact_search(rows, ids, np.array([[0.1, 0.9, 0.0, 0.0]], np.float32), 10, 2)
    assert found.tolist() == [[8, 7, 9]] and scores.shape == (1, 3) and scores.dtype == np.float32
    import faiss

    ivf = faiss.index_factory(4, "IVF1,Flat", faiss.METRIC_INNER_PRODUCT)
    assert ann.flat_rows(ivf) is None
    assert ann.flat_rows(ann.empty_index("Flat", 4)) is None  # empty: FAISS's own path


def test_exact_search_routing_sends_only_small_batches_to_the_sequential_scan():
    import faiss

    for dim in (DIM, 128, 1280):
        ann.route_exact_search(dim)
        threshold = faiss.cvar.distance_compute_blas_threshold  # FAISS: sequential while nq * D < it
        sequential = [nq for nq in range(1, 40) if nq * dim < threshold]
        assert sequential == list(range(1, ann.SEQUENTIAL_MAX_QUERIES + 1)), dim


def test_factory_validation():
    assert ann.normalize_factory(" auto ") == "auto"
    assert ann.normalize_factory("Flat") == "Flat"
    assert ann.normalize_factory("IVF64,Flat") == "IVF64,Flat"
    with pytest.raises(ValueError, match="HNSW indexes cannot delete"):
        ann.normalize_factory("HNSW32,Flat")
    with pytest.raises(ValueError, match="not supported"):
        ann.normalize_factory("LSH")
    with pytest.raises(ValueError, match="not a valid FAISS factory"):
        ann.normalize_factory("IVFxx,Flat")


def test_auto_is_flat_until_the_bound_then_ivf():
    d = 128
    n_bound = ann.FLAT_MAX_ELEMENTS // d
    assert ann.choose_factory("auto", n_bound, d) == "Flat"
    assert ann.choose_factory("auto", n_bound + 1, d).startswith("IVF")
    assert ann.choose_factory("auto", 100_000, d) == "Flat"
    assert ann.choose_factory("auto", 1_000_000, d) == "IVF1024,Flat"
    assert ann.choose_factory("IVF64,Flat", 10, d) == "IVF64,Flat"


@pytest.mark.parametrize("n,clusters", [(20_000, 2000), pytest.param(100_000, 1000, marks=pytest.mark.slow)])
def test_ivf_recall_at_10_meets_target_on_synthetic(n, clusters):
    """Tuned on a held-out sample; checked on fresh queries from the same distribution."""
    rng = np.random.default_rng(7)
    d, target = 64, 0.95
    data = clustered(rng, n + 500, d, clusters=clusters, spread=1.0)  # overlapping clusters: nprobe=1 is not enough
    base, fresh = data[:n], data[n:]
    ids = np.arange(10, 10 + n, dtype=np.int64) * 3  # non-contiguous stable ids
    index, tuning = ann.build(ann.ann_factory(n), base, ids, recall_target=target)
    assert tuning.recall_at_10 >= target and tuning.n_queries == 1000
    assert 1 < tuning.params["nprobe"] < ann.nlist_of(index)  # tuned, and still approximate
    _, found = index.search(fresh, 10)
    truth = ids[ann.exact_topk(fresh, base, 10)]
    assert ann.recall_at(found, truth) >= target


def test_auto_checkpoint_switches_to_ivf_and_persists_tuning(tmp_path, monkeypatch):
    monkeypatch.setattr(ann, "FLAT_MAX_ELEMENTS", 2000 * DIM)
    rng = np.random.default_rng(3)
    v = clustered(rng, 6000, DIM, clusters=50)
    store = IndexStore.create(tmp_path / "ix", card=make_card(), images_root=tmp_path, recall_target=0.9)
    ids = store.add(v, records(6000))
    store.checkpoint()
    info = store.info()
    assert info["factory"].startswith("IVF") and info["factory_requested"] == "auto"
    assert info["recall_at_10"] >= 0.9 and info["search_params"]["nprobe"] >= 1
    # deletes work on the IVF structure and are never served
    store.remove(ids[:100])
    assert all(h.id not in set(ids[:100]) for row in store.search(v[:100], 5) for h in row)
    store.close()
    reopened = IndexStore.open(tmp_path / "ix")
    assert reopened.info()["factory"] == info["factory"]
    assert reopened.info()["search_params"] == info["search_params"]
    assert len(reopened) == 5900
    assert reopened.search(v[200:201], 1)[0][0].id == ids[200]
    reopened.close()
