"""Boundaries of the losses and miners that the oracle tests pass through without pinning:
exact ties, zero margins, duplicate images, and mining precision under bf16.

Distances here are exact in float32 (points on a line at multiples of 1/4 from the origin, or
orthonormal vectors), so a boundary case is a real tie and not a rounding accident.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners as pml_miners  # the oracle: a hard test dependency

from training.distances import pairwise_distances
from training.losses import ContrastiveLoss, TripletLoss
from training.miners import BatchAllMiner, BatchHardMiner, HardMiner, SemiHardMiner, build_miner

torch.set_num_threads(1)


def _line(*xs: float) -> torch.Tensor:
    """Points on the first axis of R^2: (N, 2) float32, pairwise euclidean distances exact."""
    return torch.tensor([[x, 0.0] for x in xs])


def _triplets(t) -> set[tuple[int, int, int]]:
    return set(zip(*(v.tolist() for v in t)))


# ---------------------------------------------------------------------------- miners


def test_batch_hard_keeps_an_anchor_whose_only_positive_is_a_duplicate():
    """Two byte-identical images (d(a, p) = 0) are still a positive pair: the anchor is mined,
    like PML's BatchHardMiner does."""
    x = _line(0.0, 0.0, 1.0, 2.0)
    labels = torch.tensor([0, 0, 1, 1])
    a, p, n = BatchHardMiner()(x, labels)
    assert a.tolist() == [0, 1, 2, 3]
    assert p.tolist() == [1, 0, 3, 2]
    d = pairwise_distances(x)
    assert d[a, n].tolist() == [1.0, 1.0, 1.0, 2.0]
    theirs = pml_miners.BatchHardMiner(distance=_pml_euclid())(x, labels)
    assert theirs[0].tolist() == a.tolist() and theirs[1].tolist() == p.tolist()


def _pml_euclid():
    from pytorch_metric_learning.distances import LpDistance

    return LpDistance(normalize_embeddings=False, p=2)


def test_batch_hard_drops_anchors_without_a_positive_or_a_negative():
    x = _line(0.0, 0.25, 1.0)
    assert BatchHardMiner()(x, torch.tensor([0, 0, 1]))[0].tolist() == [0, 1]  # 2 has no positive
    assert BatchHardMiner()(x, torch.tensor([5, 5, 5]))[0].numel() == 0  # no negatives at all


def test_batch_hard_picks_the_farthest_positive_and_the_nearest_negative():
    x = _line(0.0, 0.25, 0.75, 1.0, 2.0)
    labels = torch.tensor([0, 0, 0, 1, 1])
    a, p, n = BatchHardMiner()(x, labels)
    assert dict(zip(a.tolist(), zip(p.tolist(), n.tolist()))) == {
        0: (2, 3), 1: (2, 3), 2: (0, 3), 3: (4, 2), 4: (3, 2)}


def test_semi_hard_excludes_both_boundaries():
    """d(a, p) < d(a, n) < d(a, p) + margin, strictly: anchor 0, positive at 0.25, negatives at
    0.25 (tie: not harder), 0.5 (inside) and 0.75 (exactly at d(a, p) + margin = 0.75: out)."""
    x = _line(0.0, 0.25, -0.25, 0.5, 0.75)
    labels = torch.tensor([0, 0, 1, 1, 1])
    got = {t for t in _triplets(SemiHardMiner(0.5)(x, labels)) if t[:2] == (0, 1)}
    assert got == {(0, 1, 3)}
    wider = {t for t in _triplets(SemiHardMiner(0.5 + 1e-3)(x, labels)) if t[:2] == (0, 1)}
    assert wider == {(0, 1, 3), (0, 1, 4)}


def test_hard_and_batch_all_boundaries_on_a_line():
    x = _line(0.0, 0.5, 0.25, 0.5001, 2.0)
    labels = torch.tensor([0, 0, 1, 1, 1])
    hard = {t for t in _triplets(HardMiner()(x, labels)) if t[:2] == (0, 1)}
    assert hard == {(0, 1, 2)}  # 0.25 < 0.5; 0.5001 is not closer than the positive
    ball = {t for t in _triplets(BatchAllMiner(0.25)(x, labels)) if t[:2] == (0, 1)}
    assert ball == {(0, 1, 2), (0, 1, 3)}  # d_ap - d_an + 0.25 > 0; at 0.75 it is exactly 0: out
    assert len(BatchAllMiner(None)(x, labels)[0]) == len(BatchAllMiner(100.0)(x, labels)[0])


def test_miner_margins_are_validated():
    with pytest.raises(ValueError, match="margin must be > 0"):
        SemiHardMiner(0.0)
    assert SemiHardMiner(1e-6).margin == pytest.approx(1e-6)
    assert BatchAllMiner(0.0).margin == 0.0
    with pytest.raises(ValueError, match="margin must be >= 0"):
        BatchAllMiner(-1e-6)
    assert build_miner("none") is None and build_miner(None, margin=0.3) is None


def _near_ties(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """64-d unit vectors: distances cluster near sqrt(2) closer than bf16 can resolve."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(32, 64, generator=g), dim=1)
    return x, torch.arange(32) % 4


@pytest.mark.parametrize("miner", [lambda: SemiHardMiner(0.02), lambda: BatchAllMiner(0.01), lambda: HardMiner()],
                         ids=["semi_hard", "batch_all", "hard"])
def test_mining_under_bf16_autocast_selects_as_in_float32(miner):
    """Under bf16 autocast the miner still measures distances in float32: the selection equals
    the float32 one, where bf16 distances would select differently."""
    x, labels = _near_ties()
    in_bf16 = pairwise_distances(x.bfloat16()).float()
    in_f32 = pairwise_distances(x)
    assert not torch.equal(in_bf16, in_f32)  # the batch can tell the two precisions apart
    want = _triplets(miner()(x, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _triplets(miner()(x, labels))
    assert got == want


def test_mining_bf16_embeddings_upcasts_them_first():
    x, labels = _near_ties(1)
    xb = x.bfloat16()
    assert _triplets(SemiHardMiner(0.02)(xb, labels)) == _triplets(SemiHardMiner(0.02)(xb.float(), labels))


# ---------------------------------------------------------------------------- losses


def test_triplet_loss_with_margin_zero_is_the_plain_violation():
    x = _line(0.0, 0.5, 0.25, 1.0)
    labels = torch.tensor([0, 0, 1, 1])
    trip = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2, 3]))
    loss = TripletLoss(margin=0.0)(x, labels, trip)
    assert loss.item() == pytest.approx((0.5 - 0.25 + 0.0) / 2)  # the second triplet is satisfied
    with pytest.raises(ValueError, match="margin must be >= 0"):
        TripletLoss(margin=-1e-6)


def test_triplet_active_fraction_counts_violated_triplets():
    x = _line(0.0, 0.5, 0.25, 1.0, 0.75)
    labels = torch.tensor([0, 0, 1, 1, 1])
    trip = (torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1]), torch.tensor([2, 3, 4]))
    hard = TripletLoss(margin=0.1)
    hard(x, labels, trip)
    assert hard.stats["active_fraction"] == pytest.approx(1 / 3)  # only d_an = 0.25 is inside
    soft = TripletLoss(soft=True)
    soft(x, labels, trip)
    assert soft.stats["active_fraction"] == pytest.approx(1 / 3)


def test_contrastive_margin_must_exceed_pos_margin():
    with pytest.raises(ValueError, match="margin > pos_margin"):
        ContrastiveLoss(margin=0.3, pos_margin=0.3)
    with pytest.raises(ValueError, match="pos_margin >= 0"):
        ContrastiveLoss(margin=0.3, pos_margin=-0.1)
    assert ContrastiveLoss(margin=0.3, pos_margin=0.0).pos_margin == 0.0


@pytest.mark.parametrize("mode", ["all", "pairs"])
def test_contrastive_active_fractions_per_kind(mode):
    """pos_active_fraction: positives farther than pos_margin; neg_active_fraction: negatives
    closer than margin. Positives at 0.25 and 1.0 (pos_margin 0.5: one active); negatives at
    0.25, 0.75, 2.0 from anchor 0 and more (margin 1.0)."""
    x = _line(0.0, 0.25, 1.0, 0.75, 2.0)
    labels = torch.tensor([0, 0, 0, 1, 1])
    fn = ContrastiveLoss(margin=1.0, pos_margin=0.5, squared=False)
    if mode == "all":
        fn(x, labels)
    else:
        i, j = torch.triu_indices(5, 5, offset=1)
        same = labels[i] == labels[j]
        fn(x, labels, (i[same], j[same], i[~same], j[~same]))
    # positive pairs (0,1)=0.25 (0,2)=1.0 (1,2)=0.75 (3,4)=1.25 -> active: 1.0, 0.75, 1.25
    assert fn.stats["num_pos_pairs"] == 4
    assert fn.stats["pos_active_fraction"] == pytest.approx(3 / 4)
    # negative pairs: (0,3)=.75 (0,4)=2 (1,3)=.5 (1,4)=1.75 (2,3)=.25 (2,4)=1 -> active: .75 .5 .25
    assert fn.stats["num_neg_pairs"] == 6
    assert fn.stats["neg_active_fraction"] == pytest.approx(3 / 6)
    assert fn.stats["active_fraction"] == pytest.approx(6 / 10)
    assert fn.stats["mean_pos_dist"] == pytest.approx((0.25 + 1.0 + 0.75 + 1.25) / 4)
    assert fn.stats["mean_neg_dist"] == pytest.approx((0.75 + 2.0 + 0.5 + 1.75 + 0.25 + 1.0) / 6)


def test_hard_fraction_does_not_count_ties_as_hard():
    """Orthonormal embeddings: every distance is exactly sqrt(2), so no negative is closer than
    the positive; with one negative pulled in, exactly that anchor's triplet is hard."""
    x = torch.eye(4)
    labels = torch.tensor([0, 0, 1, 1])
    m = BatchHardMiner()
    m(x, labels)
    assert m.stats["num_triplets"] == 4 and m.stats["hard_fraction"] == 0.0
    x2 = x.clone()
    x2[2] = F.normalize(x[0] + 0.2 * x[2], dim=0)  # 2 is now closer to 0 than 1 is
    m(x2, labels)
    assert m.stats["hard_fraction"] == pytest.approx(0.5)  # anchors 0 and 2
