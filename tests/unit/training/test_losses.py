"""Losses and distances against brute-force loops over every pair / triplet, and against PML.

The oracles compute each distance and each per-tuple loss in float64 Python, straight from the
seed's formulas, so they share no code with the vectorised implementation.

PML settings used for the comparisons (pytorch-metric-learning 2.9):
- TripletMarginLoss(margin, swap=False, smooth_loss=False): distance LpDistance(p=2,
  normalize_embeddings=True), reducer AvgNonZeroReducer. Matches TripletLoss(margin,
  distance="euclidean", reduction="nonzero_mean") on L2-normalised inputs. smooth_loss=True with
  margin=0 is our soft=True.
- ContrastiveLoss(pos_margin, neg_margin): per pair relu(D - pos_margin) / relu(neg_margin - D)
  (no 1/2, no square), positives and negatives each averaged over their non-zero terms and the two
  added. That is our ContrastiveLoss(squared=False, balance=True, reduction="nonzero_mean"). The
  seed's squared form with the 1/2 has no PML counterpart, so it is checked against the oracle only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import losses as pml_losses  # the oracle: a hard test dependency

from training.distances import gather_pairs, paired_distances, pairwise_distances, safe_sqrt
from training.losses import ContrastiveLoss, TripletLoss, build_loss
from training.miners import BatchAllMiner, BatchHardMiner, SemiHardMiner, all_pairs

torch.set_num_threads(1)

DISTANCES = ["euclidean", "cosine"]
REDUCTIONS = ["mean", "nonzero_mean", "sum"]


# ---------------------------------------------------------------------------- helpers / oracles


def make_batch(n_per_class=(3, 3, 2, 4, 1), dim=6, seed=0, normalise=True, spread=1.0):
    """Seeded batch with uneven classes (a singleton included) and non-contiguous label values."""
    g = torch.Generator().manual_seed(seed)
    label_values = [7, 3, 100, 42, 5, 11, 13][: len(n_per_class)]
    labels = torch.tensor([v for v, k in zip(label_values, n_per_class) for _ in range(k)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    x = torch.randn(len(labels), dim, generator=g, dtype=torch.float64) * spread
    if normalise:
        x = F.normalize(x, dim=1)
    return x.float(), labels


def dist64(x: torch.Tensor, i: int, j: int, metric: str) -> float:
    a, b = x[i].double(), x[j].double()
    if metric == "euclidean":
        return math.sqrt(float(((a - b) ** 2).sum()))
    return 1.0 - float(a @ b) / (float(a.norm()) * float(b.norm()))


def reduce_oracle(losses: list[float], reduction: str) -> float:
    if not losses:
        return 0.0
    if reduction == "sum":
        return sum(losses)
    if reduction == "mean":
        return sum(losses) / len(losses)
    nonzero = [v for v in losses if v > 0]
    return sum(nonzero) / len(nonzero) if nonzero else 0.0


def contrastive_pair(d: float, y: int, margin: float, pos_margin: float, squared: bool) -> float:
    """The seed: (1 - Y) 1/2 max(0, D - pos_margin)^2 + Y 1/2 max(0, m - D)^2, Y = 1 dissimilar."""
    if squared:
        return (1 - y) * 0.5 * max(0.0, d - pos_margin) ** 2 + y * 0.5 * max(0.0, margin - d) ** 2
    return (1 - y) * max(0.0, d - pos_margin) + y * max(0.0, margin - d)


def contrastive_oracle(x, labels, pairs, *, margin, pos_margin, squared, balance, reduction, metric):
    """pairs: list of (i, j, y) with y = 0 similar, 1 dissimilar."""
    per = [(contrastive_pair(dist64(x, i, j, metric), y, margin, pos_margin, squared), y) for i, j, y in pairs]
    if balance:
        return reduce_oracle([v for v, y in per if y == 0], reduction) + reduce_oracle(
            [v for v, y in per if y == 1], reduction
        )
    return reduce_oracle([v for v, _ in per], reduction)


def every_unordered_pair(labels):
    n = len(labels)
    return [(i, j, int(labels[i] != labels[j])) for i in range(n) for j in range(i + 1, n)]


def every_triplet(labels):
    n = len(labels)
    return [
        (a, p, q)
        for a in range(n)
        for p in range(n)
        for q in range(n)
        if a != p and labels[a] == labels[p] and labels[a] != labels[q]
    ]


def triplet_oracle(x, triplets, *, margin, soft, reduction, metric):
    losses = []
    for a, p, n in triplets:
        v = dist64(x, a, p, metric) - dist64(x, a, n, metric)
        losses.append(math.log1p(math.exp(v)) if soft else max(0.0, margin + v))
    return reduce_oracle(losses, reduction)


def check_grad_finite(x: torch.Tensor) -> None:
    assert x.grad is not None
    assert torch.isfinite(x.grad).all(), x.grad


# ---------------------------------------------------------------------------- distances


@pytest.mark.parametrize("metric", DISTANCES)
@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_distances_match_bruteforce(metric, with_y):
    x, _ = make_batch(normalise=False, spread=2.0)
    y = make_batch(n_per_class=(4, 3), seed=1, normalise=False)[0] if with_y else None
    d = pairwise_distances(x, y, metric=metric)
    other = x if y is None else y
    both = torch.cat([x, other])
    expected = torch.tensor(
        [[dist64(both, i, len(x) + j, metric) for j in range(len(other))] for i in range(len(x))]
    )
    assert d.shape == (len(x), len(other))
    torch.testing.assert_close(d.double(), expected.double(), atol=2e-6 * 4, rtol=1e-5)
    if y is None:
        assert (d.diagonal() == 0).all()  # exactly
    if metric == "cosine":
        assert d.min() >= 0 and d.max() <= 2


@pytest.mark.parametrize("metric", DISTANCES)
def test_distance_gradients_finite_at_zero_distance(metric):
    x, _ = make_batch()
    x = torch.cat([x, x[:3]])  # exact duplicates: zero off-diagonal distances
    x.requires_grad_(True)
    pairwise_distances(x, metric=metric).sum().backward()
    check_grad_finite(x)
    x.grad = None
    rows = F.normalize(x, dim=1) if metric == "cosine" else x
    paired_distances(rows[:3], rows[-3:], metric=metric).sum().backward()
    check_grad_finite(x)
    if metric == "euclidean":
        assert (x.grad == 0).all()  # zero distance -> zero (sub)gradient, not NaN


def test_safe_sqrt_values_and_gradient():
    s = torch.tensor([0.0, -1e-9, 1e-12, 0.25, 4.0], requires_grad=True)
    out = safe_sqrt(s)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1e-6, 0.5, 2.0]))
    out.sum().backward()
    expected = torch.tensor([0.0, 0.0, 0.5e6, 1.0, 0.25])
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=0)


def test_gather_pairs_equals_advanced_indexing_with_gradient():
    m = torch.randn(5, 7, requires_grad=True)
    i, j = torch.tensor([0, 4, 4, 2]), torch.tensor([6, 0, 0, 3])
    gather_pairs(m, i, j).sum().backward()
    g1 = m.grad.clone()
    m.grad = None
    m[i, j].sum().backward()
    torch.testing.assert_close(g1, m.grad)
    torch.testing.assert_close(gather_pairs(m, i, j), m[i, j])


def test_pairwise_distances_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown distance"):
        pairwise_distances(torch.zeros(2, 3), metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expects x"):
        pairwise_distances(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------- contrastive vs oracle


def _pairs_tuple_and_list(labels, seed=0):
    """A random subset of every pair, as an index tuple and as the oracle's list."""
    g = torch.Generator().manual_seed(seed)
    a1, p, a2, n = all_pairs(labels)
    keep_p = torch.rand(len(a1), generator=g) < 0.7
    keep_n = torch.rand(len(a2), generator=g) < 0.4
    tup = (a1[keep_p], p[keep_p], a2[keep_n], n[keep_n])
    listed = [(int(i), int(j), 0) for i, j in zip(tup[0], tup[1])] + [(int(i), int(j), 1) for i, j in zip(tup[2], tup[3])]
    return tup, listed


@pytest.mark.parametrize("metric", DISTANCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("squared,balance,pos_margin", [(True, False, 0.0), (True, True, 0.1), (False, False, 0.1), (False, True, 0.0)])
@pytest.mark.parametrize("mode", ["all", "pairs", "triplets"])
def test_contrastive_matches_oracle(metric, reduction, squared, balance, pos_margin, mode):
    x, labels = make_batch(seed=3)
    margin = 1.3 if metric == "euclidean" else 0.9  # so that both hinge sides are active
    loss_fn = ContrastiveLoss(margin, pos_margin, squared=squared, balance=balance, distance=metric, reduction=reduction)
    if mode == "all":
        tup, pairs = None, every_unordered_pair(labels)
    elif mode == "pairs":
        tup, pairs = _pairs_tuple_and_list(labels)
    else:
        tup = BatchAllMiner(distance=metric)(x, labels)
        pos = {tuple(sorted((int(a), int(p)))) for a, p in zip(tup[0], tup[1])}
        neg = {tuple(sorted((int(a), int(n)))) for a, n in zip(tup[0], tup[2])}
        pairs = [(i, j, 0) for i, j in sorted(pos)] + [(i, j, 1) for i, j in sorted(neg)]
    expected = contrastive_oracle(
        x, labels, pairs, margin=margin, pos_margin=pos_margin, squared=squared, balance=balance,
        reduction=reduction, metric=metric,
    )
    xg = x.clone().requires_grad_(True)
    got = loss_fn(xg, labels, tup)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=2e-5, abs=1e-6)
    got.backward()
    check_grad_finite(xg)
    s = loss_fn.stats
    n_pos = sum(1 for *_, y in pairs if y == 0)
    assert s["num_tuples"] == len(pairs)
    assert s["num_pos_pairs"] == n_pos and s["num_neg_pairs"] == len(pairs) - n_pos
    active = sum(
        contrastive_pair(dist64(x, i, j, metric), y, margin, pos_margin, squared) > 0 for i, j, y in pairs
    )
    assert s["active_fraction"] == pytest.approx(active / len(pairs), abs=1e-6)
    pos_d = [dist64(x, i, j, metric) for i, j, y in pairs if y == 0]
    assert s["mean_pos_dist"] == pytest.approx(sum(pos_d) / len(pos_d), rel=1e-5)


def test_contrastive_default_is_the_seed_formula():
    """Defaults: squared, pos_margin 0, pooled mean over every pair: exactly the seed's Siamese loss."""
    x, labels = make_batch(seed=5)
    loss = ContrastiveLoss(margin=1.2)
    pairs = every_unordered_pair(labels)
    seed = [
        (1 - y) * 0.5 * dist64(x, i, j, "euclidean") ** 2 + y * 0.5 * max(0.0, 1.2 - dist64(x, i, j, "euclidean")) ** 2
        for i, j, y in pairs
    ]
    assert float(loss(x, labels)) == pytest.approx(sum(seed) / len(seed), rel=1e-5)


# ---------------------------------------------------------------------------- triplet vs oracle


@pytest.mark.parametrize("metric", DISTANCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("mode", ["all", "batch_hard", "semi_hard", "subset"])
def test_triplet_matches_oracle(metric, reduction, soft, mode):
    x, labels = make_batch(seed=4)
    margin = 0.3
    if mode == "all":
        tup, triplets = None, every_triplet(labels.tolist())
    else:
        if mode == "subset":
            a, p, n = (torch.tensor(c) for c in zip(*every_triplet(labels.tolist())))
            keep = torch.rand(len(a), generator=torch.Generator().manual_seed(0)) < 0.3
            tup = (a[keep], p[keep], n[keep])
        else:
            miner = BatchHardMiner(distance=metric) if mode == "batch_hard" else SemiHardMiner(0.5, distance=metric)
            tup = miner(x, labels)
        triplets = list(zip(*(t.tolist() for t in tup)))
    assert triplets
    loss_fn = TripletLoss(margin, soft=soft, distance=metric, reduction=reduction)
    xg = x.clone().requires_grad_(True)
    got = loss_fn(xg, labels, tup)
    expected = triplet_oracle(x, triplets, margin=margin, soft=soft, reduction=reduction, metric=metric)
    assert got.item() == pytest.approx(expected, rel=2e-5, abs=1e-6)
    got.backward()
    check_grad_finite(xg)
    s = loss_fn.stats
    assert s["num_tuples"] == len(triplets)
    v = [dist64(x, a, p, metric) - dist64(x, a, n, metric) for a, p, n in triplets]
    active = sum((vi > 0) if soft else (vi + margin > 0) for vi in v)
    assert s["active_fraction"] == pytest.approx(active / len(triplets), abs=1e-6)
    mean_ap = sum(dist64(x, a, p, metric) for a, p, _ in triplets) / len(triplets)
    mean_an = sum(dist64(x, a, n, metric) for a, _, n in triplets) / len(triplets)
    assert s["mean_pos_dist"] == pytest.approx(mean_ap, rel=1e-5)
    assert s["mean_neg_dist"] == pytest.approx(mean_an, rel=1e-5)


@pytest.mark.parametrize("metric", DISTANCES)
def test_triplet_gather_and_matrix_paths_agree(metric, monkeypatch):
    """Mined triplets use exact row gathers when few, the (N, N) matrix otherwise: same loss, same grad."""
    import training.losses as losses_mod

    x, labels = make_batch(n_per_class=(5, 5, 5, 5), dim=8, seed=9)
    tup = BatchAllMiner(distance=metric)(x, labels)
    results = []
    for factor in (1, 10**9):  # force gather, then force matrix
        monkeypatch.setattr(losses_mod, "_GATHER_FACTOR", factor)
        xg = x.clone().requires_grad_(True)
        loss = TripletLoss(0.2, distance=metric)(xg, labels, tup)
        loss.backward()
        results.append((loss.detach(), xg.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- empty / degenerate


def _losses():
    return [
        ContrastiveLoss(),
        ContrastiveLoss(balance=True, reduction="nonzero_mean"),
        TripletLoss(),
        TripletLoss(soft=True, distance="cosine"),
        TripletLoss(reduction="nonzero_mean"),
    ]


def _no_tuple_cases():
    """(loss, labels) with no valid tuple: triplets need a positive AND a negative, pairs need 2 items."""
    cases = []
    for fn in _losses():
        if isinstance(fn, TripletLoss):
            cases += [(fn, [1, 1, 1, 1]), (fn, [1, 2, 3, 4]), (fn, [5])]
        else:
            cases += [(fn, [5])]
    return cases


@pytest.mark.parametrize("loss_fn,labels", _no_tuple_cases(), ids=lambda v: repr(v))
def test_no_valid_tuple_gives_zero_with_gradient(loss_fn, labels):
    labels = torch.tensor(labels)
    x = torch.randn(len(labels), 4, requires_grad=True)
    loss = loss_fn(x, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert loss_fn.stats["num_tuples"] == 0 and loss_fn.stats["active_fraction"] == 0.0


@pytest.mark.parametrize("loss_fn", _losses(), ids=repr)
def test_empty_index_tuple_gives_zero_with_gradient(loss_fn):
    x, labels = make_batch()
    x.requires_grad_(True)
    empty = torch.empty(0, dtype=torch.long)
    tup = (empty, empty, empty) if isinstance(loss_fn, TripletLoss) else (empty,) * 4
    loss = loss_fn(x, labels, tup)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert math.isnan(loss_fn.stats["mean_pos_dist"])


def test_contrastive_with_only_positive_or_only_negative_pairs():
    x = torch.randn(4, 3, requires_grad=True)
    one_class = ContrastiveLoss(margin=0.5)
    loss = one_class(x, torch.tensor([2, 2, 2, 2]))
    assert loss.item() > 0 and one_class.stats["num_neg_pairs"] == 0
    loss.backward()
    check_grad_finite(x)


@pytest.mark.parametrize("metric", DISTANCES)
@pytest.mark.parametrize("loss_fn", ["contrastive", "triplet", "triplet_soft"])
def test_collapsed_embeddings_have_finite_gradients_and_show_collapse(metric, loss_fn):
    """Every embedding identical (a collapsed network): all distances 0, gradients finite."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.ones(6, 4).requires_grad_(True)
    fn = {
        "contrastive": ContrastiveLoss(0.5, distance=metric),
        "triplet": TripletLoss(0.2, distance=metric),
        "triplet_soft": TripletLoss(soft=True, distance=metric),
    }[loss_fn]
    loss = fn(x, labels)
    loss.backward()
    check_grad_finite(x)
    assert fn.stats["mean_pos_dist"] == pytest.approx(0.0, abs=1e-6)
    assert fn.stats["mean_neg_dist"] == pytest.approx(0.0, abs=1e-3)
    if loss_fn == "triplet":
        assert loss.item() == pytest.approx(0.2, abs=1e-3)  # stuck at the margin
        assert fn.stats["active_fraction"] == 1.0
    # mined tuples on the collapsed batch too
    xg = x.detach().clone().requires_grad_(True)
    fn(xg, labels, BatchHardMiner(distance=metric)(xg, labels)).backward()
    check_grad_finite(xg)


# ---------------------------------------------------------------------------- against PML


@pytest.mark.parametrize("margin", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("mined", ["none", "batch_hard", "semi_hard"])
def test_triplet_loss_equals_pml_triplet_margin_loss(margin, mined):
    raw, labels = make_batch(n_per_class=(4, 4, 4, 4, 3), dim=8, seed=11, normalise=False, spread=3.0)
    emb = F.normalize(raw, dim=1)
    tup = {
        "none": None,
        "batch_hard": BatchHardMiner()(emb, labels),
        "semi_hard": SemiHardMiner(0.3)(emb, labels),
    }[mined]
    ours_x = raw.clone().requires_grad_(True)
    ours = TripletLoss(margin, reduction="nonzero_mean")(F.normalize(ours_x, dim=1), labels, tup)
    pml_x = raw.clone().requires_grad_(True)
    pml = pml_losses.TripletMarginLoss(margin=margin, swap=False, smooth_loss=False)(pml_x, labels, tup)
    assert ours.item() > 0
    torch.testing.assert_close(ours, pml, rtol=1e-5, atol=1e-6)
    ours.backward()
    pml.backward()
    torch.testing.assert_close(ours_x.grad, pml_x.grad, rtol=1e-4, atol=1e-6)


def test_soft_triplet_equals_pml_smooth_loss_with_zero_margin():
    raw, labels = make_batch(n_per_class=(4, 4, 4), dim=8, seed=12, normalise=False)
    emb = F.normalize(raw, dim=1)
    pml = pml_losses.TripletMarginLoss(margin=0.0, smooth_loss=True)(raw, labels)
    for reduction in ("mean", "nonzero_mean"):
        ours = TripletLoss(soft=True, reduction=reduction)(emb, labels)
        torch.testing.assert_close(ours, pml, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pos_margin,neg_margin", [(0.0, 0.5), (0.0, 1.2), (0.3, 1.0)])
@pytest.mark.parametrize("mined", ["none", "pairs", "batch_hard"])
def test_contrastive_pml_form_equals_pml_contrastive_loss(pos_margin, neg_margin, mined):
    """ContrastiveLoss(squared=False, balance=True, reduction="nonzero_mean") is PML's definition.

    PML enumerates ordered pairs (i, j) and (j, i) where we take each unordered pair once; both
    are averaged over non-zero terms, so the values coincide. Mined triplets: PML pairs each
    triplet's (a, p) and (a, n) as given (duplicates kept), we deduplicate -- so for that case we
    hand both the same explicit pair tuple.
    """
    raw, labels = make_batch(n_per_class=(4, 4, 3, 4), dim=8, seed=13, normalise=False)
    emb = F.normalize(raw, dim=1)
    if mined == "none":
        tup = None
    elif mined == "pairs":
        tup = _pairs_tuple_and_list(labels, seed=2)[0]
    else:
        from training.miners import triplets_to_pairs

        tup = triplets_to_pairs(*BatchHardMiner()(emb, labels))
    ours_fn = ContrastiveLoss(neg_margin, pos_margin, squared=False, balance=True, reduction="nonzero_mean")
    ours = ours_fn(emb, labels, tup)
    pml = pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin)(raw, labels, tup)
    assert ours.item() > 0
    torch.testing.assert_close(ours, pml, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- API, validation, dtype


def test_build_loss_names_and_errors():
    assert isinstance(build_loss("contrastive", margin=0.7), ContrastiveLoss)
    t = build_loss("triplet", margin=0.1, soft=True, distance="cosine", reduction="sum")
    assert isinstance(t, TripletLoss) and t.soft and t.distance == "cosine" and t.reduction == "sum"
    with pytest.raises(ValueError, match="allowed: contrastive, triplet"):
        build_loss("arcface")
    with pytest.raises(ValueError, match="bad arguments"):
        build_loss("triplet", pos_margin=0.1)
    with pytest.raises(ValueError, match="unknown reduction"):
        build_loss("triplet", reduction="median")
    with pytest.raises(ValueError, match="unknown distance"):
        build_loss("contrastive", distance="l1")
    with pytest.raises(ValueError, match="margin"):
        ContrastiveLoss(margin=0.2, pos_margin=0.3)
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=-0.1)


@pytest.mark.parametrize(
    "emb,labels,match",
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "embeddings must be a floating"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), "embeddings must be a floating"),
        (torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), "labels must be a 1-D"),
        (torch.zeros(4, 3), torch.zeros(4), "labels must be an integer"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), "4 embeddings but 5 labels"),
    ],
)
def test_bad_batches_are_rejected(emb, labels, match):
    for fn in (ContrastiveLoss(), TripletLoss()):
        with pytest.raises(ValueError, match=match):
            fn(emb, labels)


def test_bad_index_tuples_are_rejected():
    x, labels = make_batch()
    a, p, n = BatchAllMiner()(x, labels)
    fn = TripletLoss()
    with pytest.raises(ValueError, match="differ in length"):
        fn(x, labels, (a, p[:-1], n))
    with pytest.raises(ValueError, match="must lie in"):
        fn(x, labels, (a, p, n + 100))
    with pytest.raises(ValueError, match="positive pairs do not match"):
        fn(x, labels, (a, n, n))
    with pytest.raises(ValueError, match="negative pairs do not match"):
        fn(x, labels, (a, p, p))
    with pytest.raises(ValueError, match="not pairs"):
        fn(x, labels, all_pairs(labels))
    with pytest.raises(ValueError, match="1-D integer"):
        fn(x, labels, (a.float(), p, n))
    with pytest.raises(ValueError, match="triplets .* or pairs"):
        fn(x, labels, (a, p))
    with pytest.raises(ValueError, match="pair tensors differ"):
        ContrastiveLoss()(x, labels, (a, p, a, n[:-1]))


def test_bf16_and_autocast_are_computed_in_float32():
    x, labels = make_batch(n_per_class=(4, 4, 4), dim=8, seed=21)
    xb = x.bfloat16().requires_grad_(True)
    ref = TripletLoss(0.2)(xb.detach().float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = TripletLoss(0.2)(xb, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)
    got.backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def test_stats_keys_after_each_call():
    x, labels = make_batch()
    for fn in (ContrastiveLoss(), TripletLoss()):
        fn(x, labels)
        assert {"num_tuples", "active_fraction", "mean_pos_dist", "mean_neg_dist"} <= set(fn.stats)
        assert all(isinstance(v, float) for v in fn.stats.values())


# ---------------------------------------------------------------------------- property test


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=2, max_size=9),
    seed=st.integers(0, 2**16),
    metric=st.sampled_from(DISTANCES),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_property_all_tuple_losses_match_oracles(labels, seed, metric, reduction):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(len(labels), 5, generator=g), dim=1)
    y = torch.tensor(labels)
    trip = TripletLoss(0.4, distance=metric, reduction=reduction)(x, y)
    expected = triplet_oracle(x, every_triplet(labels), margin=0.4, soft=False, reduction=reduction, metric=metric)
    assert float(trip) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    con = ContrastiveLoss(1.0, distance=metric, reduction=reduction)(x, y)
    expected = contrastive_oracle(
        x, y, every_unordered_pair(labels), margin=1.0, pos_margin=0.0, squared=True, balance=False,
        reduction=reduction, metric=metric,
    )
    assert float(con) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert np.isfinite(float(trip)) and np.isfinite(float(con))
