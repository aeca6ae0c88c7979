"""Miners against brute-force loops over every triplet, and against PML's miners.

The oracles loop over all (a, p, n) in Python and decide with the same float32 distance matrix
(``pairwise_distances``, itself tested against float64 in test_losses.py), so they check the
selection logic exactly, boundaries included.

PML settings (pytorch-metric-learning 2.9): default distance LpDistance(p=2,
normalize_embeddings=True), so our miners get L2-normalised embeddings with
distance="euclidean". Triplet sets are compared as sets; batch-hard is compared on the selected
d(a, p) and d(a, n) values per anchor, since equal distances may pick different indices.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import miners as pml_miners  # the oracle: a hard test dependency

import training.miners as miners_mod
from training.distances import pairwise_distances
from training.miners import (
    BatchAllMiner,
    BatchHardMiner,
    HardMiner,
    SemiHardMiner,
    all_pairs,
    build_miner,
    label_ids,
    positive_pairs,
    triplets_to_pairs,
)

torch.set_num_threads(1)

DISTANCES = ["euclidean", "cosine"]


def make_batch(n_per_class=(4, 3, 4, 2, 1, 3), dim=5, seed=0, normalise=True):
    g = torch.Generator().manual_seed(seed)
    values = [9, 2, 77, 4, 31, 6, 8][: len(n_per_class)]
    labels = torch.tensor([v for v, k in zip(values, n_per_class) for _ in range(k)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    x = torch.randn(len(labels), dim, generator=g)
    return (F.normalize(x, dim=1) if normalise else x), labels


def triplet_set(t):
    return set(zip(*(v.tolist() for v in t)))


def oracle_triplets(dist, labels, keep):
    """Every valid triplet for which keep(d_ap, d_an) holds, by a loop."""
    n = len(labels)
    out = set()
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for q in range(n):
                if labels[q] != labels[a] and keep(float(dist[a, p]), float(dist[a, q])):
                    out.add((a, p, q))
    return out


def check_contract(t, n):
    a, p, q = t
    assert a.dtype == p.dtype == q.dtype == torch.long
    assert a.shape == p.shape == q.shape and a.ndim == 1
    if a.numel():
        assert int(torch.stack([a, p, q]).min()) >= 0 and int(torch.stack([a, p, q]).max()) < n


# ---------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("metric", DISTANCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_matches_bruteforce(metric, seed):
    x, labels = make_batch(seed=seed)
    dist = pairwise_distances(x, metric=metric)
    lab = labels.tolist()
    n = len(lab)
    miner = BatchHardMiner(distance=metric)
    a, p, q = miner(x, labels)
    check_contract((a, p, q), n)
    expected = {}
    for i in range(n):
        pos = [j for j in range(n) if j != i and lab[j] == lab[i]]
        neg = [j for j in range(n) if lab[j] != lab[i]]
        if pos and neg:
            expected[i] = (max(float(dist[i, j]) for j in pos), min(float(dist[i, j]) for j in neg))
    assert a.tolist() == sorted(expected)
    for i, j, k in zip(a.tolist(), p.tolist(), q.tolist()):
        assert lab[j] == lab[i] and j != i and lab[k] != lab[i]
        assert (float(dist[i, j]), float(dist[i, k])) == expected[i]
    assert miner.stats["num_triplets"] == len(expected)


@pytest.mark.parametrize("metric", DISTANCES)
@pytest.mark.parametrize(
    "miner,keep",
    [
        (lambda m: SemiHardMiner(0.3, distance=m), lambda ap, an: ap < an < ap + 0.3),
        (lambda m: SemiHardMiner(0.05, distance=m), lambda ap, an: ap < an < ap + 0.05),
        (lambda m: HardMiner(distance=m), lambda ap, an: an < ap),
        (lambda m: BatchAllMiner(distance=m), lambda ap, an: True),
        (lambda m: BatchAllMiner(0.2, distance=m), lambda ap, an: ap - an + 0.2 > 0),
        (lambda m: BatchAllMiner(0.0, distance=m), lambda ap, an: ap - an > 0),
    ],
    ids=["semi_hard_0.3", "semi_hard_0.05", "hard", "batch_all", "batch_all_0.2", "batch_all_0"],
)
def test_margin_miners_match_bruteforce(metric, miner, keep):
    x, labels = make_batch(seed=3)
    dist = pairwise_distances(x, metric=metric)
    m = miner(metric)
    got = m(x, labels)
    check_contract(got, len(labels))
    expected = oracle_triplets(dist, labels.tolist(), keep)
    assert len(got[0]) == len(expected)  # no duplicates
    assert triplet_set(got) == expected
    candidates = len(oracle_triplets(dist, labels.tolist(), lambda ap, an: True))
    assert m.stats["num_triplets"] == len(expected)
    assert m.stats["num_candidates"] == candidates
    assert m.stats["kept_fraction"] == pytest.approx(len(expected) / candidates)


def test_margin_miner_chunks_give_the_same_triplets(monkeypatch):
    x, labels = make_batch(n_per_class=(6, 6, 5, 6), dim=4, seed=5)
    whole = BatchAllMiner(0.3)(x, labels)
    monkeypatch.setattr(miners_mod, "_CHUNK_ELEMENTS", 3 * len(labels))  # 3 positive pairs per chunk
    chunked = BatchAllMiner(0.3)(x, labels)
    assert triplet_set(whole) == triplet_set(chunked) and len(whole[0]) == len(chunked[0])


def test_miner_stats_describe_the_selection():
    x, labels = make_batch(seed=6)
    dist = pairwise_distances(x)
    m = HardMiner()
    a, p, q = m(x, labels)
    assert m.stats["hard_fraction"] == 1.0
    assert m.stats["mean_pos_dist"] == pytest.approx(float(dist[a, p].mean()), rel=1e-6)
    assert m.stats["mean_neg_dist"] == pytest.approx(float(dist[a, q].mean()), rel=1e-6)
    s = SemiHardMiner(0.5)
    s(x, labels)
    assert s.stats["hard_fraction"] == 0.0


# ---------------------------------------------------------------------------- pair helpers


def test_positive_pairs_are_every_ordered_same_label_pair():
    _, labels = make_batch(seed=7)
    ids, counts = label_ids(labels)
    a, p = positive_pairs(ids, counts)
    lab = labels.tolist()
    expected = {(i, j) for i in range(len(lab)) for j in range(len(lab)) if i != j and lab[i] == lab[j]}
    assert set(zip(a.tolist(), p.tolist())) == expected and len(a) == len(expected)


def test_all_pairs_is_every_unordered_pair_once():
    _, labels = make_batch(seed=8)
    a1, p, a2, n = all_pairs(labels)
    lab = labels.tolist()
    pairs = [(i, j) for i in range(len(lab)) for j in range(i + 1, len(lab))]
    assert list(zip(a1.tolist(), p.tolist())) == [(i, j) for i, j in pairs if lab[i] == lab[j]]
    assert list(zip(a2.tolist(), n.tolist())) == [(i, j) for i, j in pairs if lab[i] != lab[j]]


def test_triplets_to_pairs_deduplicates_unordered_pairs():
    a = torch.tensor([0, 0, 1, 2, 1])
    p = torch.tensor([1, 1, 0, 3, 0])
    n = torch.tensor([5, 4, 5, 0, 4])
    a1, pp, a2, nn = triplets_to_pairs(a, p, n)
    assert list(zip(a1.tolist(), pp.tolist())) == [(0, 1), (2, 3)]
    assert list(zip(a2.tolist(), nn.tolist())) == [(0, 2), (0, 4), (0, 5), (1, 4), (1, 5)]
    empty = torch.empty(0, dtype=torch.long)
    assert all(t.numel() == 0 for t in triplets_to_pairs(empty, empty, empty))
    with pytest.raises(ValueError, match="equal length"):
        triplets_to_pairs(a, p[:2], n)


# ---------------------------------------------------------------------------- empty / errors / registry


@pytest.mark.parametrize("miner", [BatchHardMiner(), SemiHardMiner(), HardMiner(), BatchAllMiner(), BatchAllMiner(0.1)], ids=repr)
@pytest.mark.parametrize("labels", [[3, 3, 3, 3], [1, 2, 3, 4], [5], []], ids=["one-class", "no-positive", "single", "empty"])
def test_no_valid_triplet(miner, labels):
    labels = torch.tensor(labels, dtype=torch.long)
    t = miner(torch.randn(len(labels), 4), labels)
    check_contract(t, len(labels))
    assert t[0].numel() == 0 and miner.stats["num_triplets"] == 0


@pytest.mark.parametrize(
    "emb,labels,match",
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "floating"),
        (torch.zeros(4, 3), torch.zeros(4), "integer"),
        (torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.long), "1-D"),
        (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), "4 embeddings but 3 labels"),
    ],
)
def test_bad_batches_are_rejected(emb, labels, match):
    with pytest.raises(ValueError, match=match):
        BatchHardMiner()(emb, labels)


def test_build_miner_registry():
    assert build_miner(None) is None and build_miner("none") is None
    assert isinstance(build_miner("batch_hard", distance="cosine"), BatchHardMiner)
    semi = build_miner("semi_hard", margin=0.1)
    assert isinstance(semi, SemiHardMiner) and semi.margin == 0.1
    assert isinstance(build_miner("hard"), HardMiner)
    assert build_miner("batch_all", margin=0.2).margin == 0.2
    with pytest.raises(ValueError, match="allowed: none, batch_hard, semi_hard, hard, batch_all"):
        build_miner("hardest")
    with pytest.raises(ValueError, match="bad arguments"):
        build_miner("batch_hard", margin=0.2)
    with pytest.raises(ValueError, match="unknown distance"):
        build_miner("batch_hard", distance="dot")
    with pytest.raises(ValueError, match="margin"):
        SemiHardMiner(0.0)


def test_miner_runs_without_grad_and_in_float32_under_autocast():
    x, labels = make_batch(seed=9)
    xg = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = BatchAllMiner(0.2)(xg, labels)
    assert not any(v.requires_grad for v in t)
    assert triplet_set(t) == triplet_set(BatchAllMiner(0.2)(xg.detach().float(), labels))


# ---------------------------------------------------------------------------- against PML


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batch_hard_equals_pml_batch_hard_miner(seed):
    raw, labels = make_batch(n_per_class=(4, 4, 4, 4, 1), dim=8, seed=seed, normalise=False)
    emb = F.normalize(raw, dim=1)
    ours = BatchHardMiner()(emb, labels)
    theirs = pml_miners.BatchHardMiner()(raw, labels)
    assert ours[0].tolist() == theirs[0].tolist()  # same anchors (the singleton is dropped by both)
    d = pairwise_distances(emb)
    torch.testing.assert_close(d[ours[0], ours[1]], d[theirs[0], theirs[1]])
    torch.testing.assert_close(d[ours[0], ours[2]], d[theirs[0], theirs[2]])


@pytest.mark.parametrize("margin", [0.1, 0.3, 0.8])
@pytest.mark.parametrize("kind", ["semihard", "hard", "all"])
def test_margin_miners_equal_pml_triplet_margin_miner(margin, kind):
    raw, labels = make_batch(n_per_class=(5, 5, 4, 5), dim=6, seed=4, normalise=False)
    emb = F.normalize(raw, dim=1)
    ours = {"semihard": SemiHardMiner(margin), "hard": HardMiner(), "all": BatchAllMiner(margin)}[kind](emb, labels)
    theirs = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind)(raw, labels)
    assert len(ours[0]) > 0
    assert triplet_set(ours) == triplet_set(theirs)


# ---------------------------------------------------------------------------- property test


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    seed=st.integers(0, 2**16),
    margin=st.floats(0.01, 1.0),
)
def test_property_semi_hard_and_batch_all_match_oracle(labels, seed, margin):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(len(labels), 4, generator=g), dim=1)
    y = torch.tensor(labels)
    dist = pairwise_distances(x)
    assert triplet_set(SemiHardMiner(margin)(x, y)) == oracle_triplets(dist, labels, lambda ap, an: ap < an < ap + margin)
    assert triplet_set(BatchAllMiner(margin)(x, y)) == oracle_triplets(dist, labels, lambda ap, an: ap - an + margin > 0)
    bh = BatchHardMiner()(x, y)
    for a, p, n in zip(*(t.tolist() for t in bh)):
        assert labels[a] == labels[p] and a != p and labels[a] != labels[n]


def test_boundaries_with_exactly_equal_distances():
    """Orthonormal embeddings: every distance is exactly sqrt(2), so d(a, p) == d(a, n) everywhere.

    Semi-hard wants d(a, p) < d(a, n) strictly and hard wants d(a, n) < d(a, p) strictly: neither
    keeps a tie. Batch-all with a margin keeps it (its loss, margin + 0, is positive); with
    margin 0 it does not.
    """
    x = torch.eye(4)
    labels = torch.tensor([0, 0, 1, 1])
    assert SemiHardMiner(0.5)(x, labels)[0].numel() == 0
    assert HardMiner()(x, labels)[0].numel() == 0
    assert len(BatchAllMiner(0.5)(x, labels)[0]) == 8
    assert BatchAllMiner(0.0)(x, labels)[0].numel() == 0
