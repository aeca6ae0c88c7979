"""retrieval_metrics against PML's AccuracyCalculator and a numpy brute-force oracle.

PML settings (pytorch-metric-learning 2.9): AccuracyCalculator(include=("precision_at_1",
"r_precision", "mean_average_precision_at_r"), k="max_bin_count", device=cpu). With
reference=None PML uses the query set as reference with ref_includes_query=True (each query
removed from its own neighbours, the last neighbour dropped when the query is not among them);
with a separate reference, ref_includes_query=False. PML's default kNN is faiss IndexFlatL2,
which on unit vectors ranks like our IndexFlatIP; we also run it with IndexFlatIP so that exact
ties (duplicates) are broken identically. Queries whose label has no reference ("lone") are left
out by both.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_metric_learning  # noqa: F401 - the oracle: a hard test dependency (a missing PML fails here)
from hypothesis import given, settings
from hypothesis import strategies as st

from training.metrics import retrieval_metrics

KEYS = {"recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "r_precision", "map@r", "num_queries"}


def make_data(n=240, dim=12, classes=15, seed=0, spread=1.5):
    """Clustered unit vectors, so the metrics are far from both 0 and 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim))
    x = centres[labels] + spread * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def brute_force(query, q_labels, reference=None, r_labels=None, ks=(1, 2, 4, 8)):
    """numpy oracle: full similarity matrix, stable argsort, per-query loops."""
    loo = reference is None
    ref, rl = (query, q_labels) if loo else (reference, r_labels)
    sim = query.astype(np.float64) @ ref.astype(np.float64).T
    out = {f"recall@{k}": [] for k in ks} | {"precision@1": [], "r_precision": [], "map@r": []}
    for i in range(len(query)):
        order = np.argsort(-sim[i], kind="stable")
        if loo:
            order = order[order != i]
        same = rl[order] == q_labels[i]
        r = int(same.sum())
        if r == 0:
            continue
        for k in ks:
            out[f"recall@{k}"].append(bool(same[:k].any()))
        out["precision@1"].append(bool(same[0]))
        out["r_precision"].append(same[:r].sum() / r)
        hits = np.cumsum(same[:r])
        out["map@r"].append(float(np.sum(same[:r] * hits / np.arange(1, r + 1)) / r))
    return {k: float(np.mean(v)) for k, v in out.items()} | {"num_queries": float(len(out["r_precision"]))}


def pml_metrics(query, q_labels, reference=None, r_labels=None, *, flat_ip=True):
    # Imported here, not at collection: PML's inference module imports faiss.contrib.torch_utils,
    # which patches every faiss index class process-wide (the index tests would then run on it).
    import faiss
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    knn = FaissKNN(index_init_fn=faiss.IndexFlatIP) if flat_ip else None
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=knn,
    )
    if reference is None:
        return calc.get_accuracy(query, q_labels)
    return calc.get_accuracy(query, q_labels, reference, r_labels, ref_includes_query=False)


def assert_equals_pml(ours, theirs):
    assert ours["precision@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


# ---------------------------------------------------------------------------- PML


@pytest.mark.parametrize("block_size", [4096, 37, 1])
@pytest.mark.parametrize("flat_ip", [True, False], ids=["pml-IP", "pml-default-L2"])
def test_leave_one_out_equals_pml(block_size, flat_ip):
    x, y = make_data(seed=1)
    ours = retrieval_metrics(x, y, block_size=block_size)
    assert set(ours) == KEYS
    assert 0.05 < ours["map@r"] < ours["recall@8"] < 1.0  # informative data, not a degenerate case
    assert_equals_pml(ours, pml_metrics(x, y, flat_ip=flat_ip))


@pytest.mark.parametrize("block_size", [4096, 23])
def test_separate_reference_equals_pml(block_size):
    x, y = make_data(n=300, seed=2)
    q, qy, r, ry = x[:90], y[:90], x[90:], y[90:]
    ours = retrieval_metrics(q, qy, r, ry, block_size=block_size)
    assert_equals_pml(ours, pml_metrics(q, qy, r, ry))
    assert ours == pytest.approx(brute_force(q, qy, r, ry))


def test_queries_whose_label_is_not_in_a_separate_reference_are_skipped():
    x, y = make_data(n=120, seed=4)
    query, q_labels = x[:30], y[:30].copy()
    q_labels[:2] = [1000, 1001]  # no reference has these labels
    ours = retrieval_metrics(query, q_labels, x[30:], y[30:])
    assert ours["num_queries"] == 28
    assert ours == pytest.approx(retrieval_metrics(query[2:], q_labels[2:], x[30:], y[30:]))


def test_lone_queries_are_skipped_like_pml():
    x, y = make_data(n=120, seed=3)
    y = y.copy()
    y[:3] = [1000, 1001, 1002]  # singleton classes: no other item shares the label
    ours = retrieval_metrics(x, y)
    assert ours["num_queries"] == 117
    assert_equals_pml(ours, pml_metrics(x, y))
    assert ours == pytest.approx(brute_force(x, y))


def test_exact_duplicates_drop_self_like_pml():
    """With duplicated vectors the query may not come first among its neighbours."""
    x, y = make_data(n=80, seed=4)
    x = np.concatenate([x, x[:20]])
    y = np.concatenate([y, y[:20]])
    assert_equals_pml(retrieval_metrics(x, y, block_size=16), pml_metrics(x, y))


def test_query_outranked_by_its_duplicates_drops_the_last_neighbour_like_pml():
    """More exact copies of a vector than k + 1: some queries are not among their own k + 1
    neighbours at all, and then (as in PML) the last neighbour is dropped instead of the query."""
    rng = np.random.default_rng(9)
    other = rng.normal(size=(30, 6)).astype(np.float32)
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    x = np.concatenate([np.tile(other[:1], (14, 1)), other[1:]])
    y = np.concatenate([np.repeat([0, 1], 7), rng.integers(2, 6, 29)])
    ours = retrieval_metrics(x, y, ks=(1, 2))
    assert_equals_pml(ours, pml_metrics(x, y))


# ---------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("seed", [0, 5, 6])
def test_leave_one_out_matches_bruteforce(seed):
    x, y = make_data(seed=seed)
    ours = retrieval_metrics(x, y, ks=(1, 2, 4, 8), block_size=50)
    expected = brute_force(x, y)
    assert ours == pytest.approx(expected, abs=1e-9)
    assert ours["precision@1"] == ours["recall@1"]


def test_ks_without_one_and_beyond_the_gallery():
    x, y = make_data(n=30, classes=3, seed=7)
    ours = retrieval_metrics(x, y, ks=(5, 100))
    expected = brute_force(x, y, ks=(5, 100))
    assert set(ours) == {"recall@5", "recall@100", "precision@1", "r_precision", "map@r", "num_queries"}
    assert ours["recall@5"] == pytest.approx(expected["recall@5"])
    assert ours["recall@100"] == 1.0  # the whole gallery always holds a same-label item
    assert ours["precision@1"] == pytest.approx(expected["precision@1"])


def test_string_labels_and_unnormalised_input():
    x, y = make_data(n=60, seed=8)
    names = np.array([f"class_{v}" for v in y])
    a = retrieval_metrics(3.0 * x, names)
    b = retrieval_metrics(x, y)
    assert a == pytest.approx(b)


def test_perfect_and_values_are_plain_floats():
    y = np.repeat(np.arange(4), 5)
    x = np.eye(8, dtype=np.float32)[y] + 0.01 * np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    m = retrieval_metrics(x, y)
    assert all(type(v) is float for v in m.values())
    assert m["recall@1"] == m["r_precision"] == m["map@r"] == 1.0


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"query": np.zeros((4,)), "query_labels": np.zeros(4)}, "non-empty \\(N, D\\)"),
        ({"query": np.ones((4, 3)), "query_labels": np.zeros(5)}, "query_labels must have shape"),
        ({"query": np.ones((4, 3)), "query_labels": np.arange(4)}, "no query has a reference"),
        ({"query": np.ones((4, 3)), "query_labels": np.zeros(4), "reference": np.ones((4, 3))}, "without reference_labels"),
        ({"query": np.ones((4, 3)), "query_labels": np.zeros(4), "reference_labels": np.zeros(4)}, "without reference"),
        ({"query": np.ones((4, 3)), "query_labels": np.zeros(4), "reference": np.ones((4, 2)), "reference_labels": np.zeros(4)}, "dimension"),
        ({"query": np.full((4, 3), np.nan), "query_labels": np.zeros(4)}, "NaN"),
        ({"query": np.zeros((4, 3)), "query_labels": np.zeros(4)}, "all-zero rows"),
        ({"query": np.ones((4, 3)), "query_labels": np.zeros(4), "ks": (0, 1)}, "ks must be positive"),
        ({"query": np.ones((4, 3)), "query_labels": np.zeros(4), "block_size": 0}, "block_size"),
        ({"query": np.array([["a", "b"]] * 4), "query_labels": np.zeros(4)}, "must be numeric"),
    ],
)
def test_bad_input_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**kwargs)


# ---------------------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=40),
    seed=st.integers(0, 2**16),
    block=st.integers(1, 50),
)
def test_property_matches_bruteforce_and_is_monotone(labels, seed, block):
    y = np.array(labels)
    if np.bincount(y).max() < 2:
        return  # nothing to score; covered by test_bad_input_is_rejected
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(y), 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ours = retrieval_metrics(x, y, block_size=block)
    assert ours == pytest.approx(brute_force(x, y), abs=1e-9)
    recalls = [ours[f"recall@{k}"] for k in (1, 2, 4, 8)]
    assert recalls == sorted(recalls)
