"""Metric-learning losses from the seed: contrastive (Siamese) and triplet.

Both take ``(embeddings (N, D), labels (N,), indices_tuple=None)`` and return a scalar. The index
tuple comes from a miner (:mod:`training.miners`): triplets ``(a, p, n)`` or pairs
``(a1, p, a2, n)``; ``None`` means every valid pair / triplet of the batch.

Conventions shared by every loss (see :class:`BaseMetricLoss`):

- distances are ``"euclidean"`` (``||x - y||``) or ``"cosine"`` (``1 - cos``), computed in float32
  even under autocast (margins of 0.2 do not survive bf16 rounding);
- ``reduction``: ``"mean"`` over all tuples, ``"nonzero_mean"`` over tuples with a positive loss
  (PML's ``AvgNonZeroReducer``), or ``"sum"``;
- a batch with no valid tuple gives ``embeddings.sum() * 0``: zero, on the graph, never NaN;
- gradients are finite at zero distance;
- ``self.stats`` after each call: ``num_tuples``, ``active_fraction`` (tuples with positive loss),
  ``mean_pos_dist``, ``mean_neg_dist`` (NaN when there is nothing to average), plus loss-specific
  counters. These are the collapse signals: a collapsed network has ``mean_pos_dist ~
  mean_neg_dist ~ 0`` and every triplet active at exactly the margin.

Speed: when a loss needs few distances (mined triplets, e.g. batch-hard's N) it computes exactly
those rows, ``O(T D)``; otherwise it builds one (N, N) distance matrix and gathers from it.
Nothing is ever N x N x N: "all triplets" is a (positive pairs, N) table.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .distances import Metric, check_metric, gather_pairs, paired_distances, pairwise_distances
from .registry import LOSSES, REDUCTIONS
from .miners import check_batch, label_ids, positive_pairs, same_label_matrix, triplets_to_pairs

Reduction = Literal[REDUCTIONS]  # type: ignore[valid-type]

IndicesTuple = tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]

# Gather rows (exact, O(T D)) instead of building the (N, N) matrix when the number of distances
# needed is at most N^2 / _GATHER_FACTOR. Both paths give the same values; the factor only moves
# time (the crossover measurement: docs/design.md, "Losses: gather rows or build the matrix").
_GATHER_FACTOR = 32


class BaseMetricLoss(torch.nn.Module):
    """Validates the batch and the index tuple, then calls the hook :meth:`compute_loss`.

    Args:
        distance: ``"euclidean"`` or ``"cosine"``.
        reduction: ``"mean"`` (over all tuples), ``"nonzero_mean"`` (over tuples whose loss is > 0;
            0 when none is), ``"sum"``.
    """

    def __init__(self, *, distance: Metric = "euclidean", reduction: Reduction = "mean") -> None:
        super().__init__()
        self.distance: Metric = check_metric(distance)
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
        self.reduction: Reduction = reduction
        self.stats: dict[str, float] = {}

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, reduction={self.reduction!r}"

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: IndicesTuple | None = None) -> Tensor:
        """Loss of a batch.

        Args:
            embeddings: (N, D) float (any float dtype; computed in float32).
            labels: (N,) integer class ids.
            indices_tuple: None (all valid tuples), triplets ``(a, p, n)`` or pairs
                ``(a1, p, a2, n)``: 1-D int64 tensors of indices into the batch, consistent with
                the labels.

        Returns:
            0-dim float32 tensor, differentiable w.r.t. ``embeddings``.
        """
        name = type(self).__name__
        labels = check_batch(embeddings, labels, who=name)
        if indices_tuple is not None:
            indices_tuple = _check_indices(indices_tuple, labels, who=name)
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.compute_loss(embeddings.float(), labels, indices_tuple)

    def compute_loss(self, embeddings: Tensor, labels: Tensor, indices_tuple: IndicesTuple | None) -> Tensor:
        """The hook: embeddings (N, D) float32, labels (N,) int64, validated tuple -> scalar.

        Must set ``self.stats`` (use :meth:`_finish`).
        """
        raise NotImplementedError

    # -- helpers for subclasses ------------------------------------------------------------

    def _prepare(self, embeddings: Tensor) -> Tensor:
        """Rows ready for :func:`paired_distances` (normalised for cosine)."""
        return F.normalize(embeddings, dim=1) if self.distance == "cosine" else embeddings

    def _distances(self, embeddings: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Distances of several lists of index pairs, each ``(i (T,), j (T,)) -> (T,)``.

        Gathers rows when few distances are needed, else gathers from one (N, N) matrix.
        """
        n = embeddings.shape[0]
        needed = sum(i.numel() for i, _ in pairs)
        if needed * _GATHER_FACTOR <= n * n:
            rows = self._prepare(embeddings)
            return [
                paired_distances(rows.index_select(0, i), rows.index_select(0, j), metric=self.distance)
                for i, j in pairs
            ]
        mat = pairwise_distances(embeddings, metric=self.distance)
        return [gather_pairs(mat, i, j) for i, j in pairs]

    def _finish(
        self,
        embeddings: Tensor,
        pools: list[Pool],
        *,
        active: Tensor,
        pos_dist: tuple[Tensor, Tensor],
        neg_dist: tuple[Tensor, Tensor],
        **extra: Tensor,
    ) -> Tensor:
        """Reduce and record ``self.stats`` with a single device sync.

        Args:
            pools: one :class:`Pool` per group of tuples reduced on its own; the reduced values are
                added (one pool = the usual case; two = contrastive with ``balance=True``).
            active: number of tuples counted as active in the stats.
            pos_dist, neg_dist: ``(sum, count)`` of the positive / negative distances, for stats.
            extra: further 0-dim tensors to record under their names.
        """
        loss = embeddings.sum() * 0.0  # keeps the graph connected; exactly 0 when there is no tuple
        for pool in pools:
            if self.reduction == "sum":
                loss = loss + pool.total
            elif self.reduction == "mean":
                loss = loss + pool.total / pool.count.clamp_min(1)
            else:
                loss = loss + pool.total / pool.nonzero.clamp_min(1)
        with torch.no_grad():
            count = sum(pool.count for pool in pools).float()
            values = [
                count,
                active.float() / count.clamp_min(1),
                pos_dist[0].float() / pos_dist[1].float(),  # 0 / 0 = NaN when there is none
                neg_dist[0].float() / neg_dist[1].float(),
                *(v.float() for v in extra.values()),
            ]
            names = ["num_tuples", "active_fraction", "mean_pos_dist", "mean_neg_dist", *extra]
            self.stats = dict(zip(names, torch.stack(values).tolist()))
        return loss


class Pool(NamedTuple):
    """A group of per-tuple losses, summarised for reduction (all 0-dim tensors)."""

    total: Tensor  # sum of the losses (differentiable)
    count: Tensor  # number of tuples
    nonzero: Tensor  # number of tuples with loss > 0

    @staticmethod
    def of(losses: Tensor, weight: Tensor | None = None) -> Pool:
        """Pool of ``losses`` (any shape, >= 0); ``weight`` (same shape, 0/1 float) marks the
        real tuples (None = every entry is one)."""
        if weight is not None:
            losses = losses * weight
            count = weight.sum()
        else:
            count = torch.tensor(losses.numel(), device=losses.device)
        return Pool(losses.sum(), count, torch.count_nonzero(losses))


def _sum_count(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach()
    return x.sum(), torch.tensor(x.numel(), device=x.device)


def _softplus(x: Tensor) -> Tensor:
    """softplus, as relu(x) + log(1 + exp(-|x|)): same value to float precision, ~4x faster than
    F.softplus on CPU (whose log1p is not vectorised), which matters on all-triplet tables."""
    return F.relu(x) + torch.log(1.0 + torch.exp(-x.abs()))


def _check_indices(indices_tuple: Any, labels: Tensor, *, who: str) -> IndicesTuple:
    """Validate a miner's output against the batch; return it as int64 tensors on labels' device."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        length = len(indices_tuple) if hasattr(indices_tuple, "__len__") else "?"
        raise ValueError(
            f"{who}: indices_tuple must be triplets (a, p, n) or pairs (a1, p, a2, n); "
            f"got {type(indices_tuple).__name__} of length {length}"
        )
    out = []
    for t in indices_tuple:
        if not isinstance(t, Tensor) or t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            shown = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{who}: every index tensor must be a 1-D integer tensor; got {shown}")
        out.append(t.to(device=labels.device, dtype=torch.long))
    if len(out) == 3:
        a, p, neg = out
        if not a.shape == p.shape == neg.shape:
            raise ValueError(f"{who}: triplet tensors differ in length: {len(a)}, {len(p)}, {len(neg)}")
        groups = [(a, p, "positive"), (a, neg, "negative")]
    else:
        a1, p, a2, neg = out
        if a1.shape != p.shape or a2.shape != neg.shape:
            raise ValueError(
                f"{who}: pair tensors differ in length: a1 {len(a1)} vs p {len(p)}, a2 {len(a2)} vs n {len(neg)}"
            )
        groups = [(a1, p, "positive"), (a2, neg, "negative")]
    n = labels.shape[0]
    for t in out:
        if t.numel():
            lo, hi = torch.aminmax(t)
            if int(lo) < 0 or int(hi) >= n:
                raise ValueError(f"{who}: indices must lie in [0, {n}); got range [{int(lo)}, {int(hi)}]")
    for i, j, kind in groups:
        li, lj = labels.index_select(0, i), labels.index_select(0, j)
        wrong = li != lj if kind == "positive" else li == lj
        if i.numel() and int(torch.count_nonzero(wrong)):
            raise ValueError(f"{who}: some {kind} pairs do not match the labels (miner and labels out of sync?)")
    return tuple(out)  # type: ignore[return-value]


class ContrastiveLoss(BaseMetricLoss):
    """Contrastive (Siamese) loss of the seed, per pair with distance D and Y = 0 similar, 1 not:

        ``(1 - Y) · ½ · max(0, D - pos_margin)²  +  Y · ½ · max(0, margin - D)²``

    ``pos_margin = 0`` is exactly the seed's ``(1 - Y) · ½ · D² + Y · ½ · max(0, m - D)²``.
    ``squared=False`` drops the ½ and the square (``max(0, D - pos_margin)``, ``max(0, margin - D)``,
    the form PML uses).

    Pairs: ``indices_tuple`` None -> every pair of the batch, each unordered pair once (``i < j``);
    a 4-tuple of pairs as given; a 3-tuple of triplets -> its unique pairs (:func:`triplets_to_pairs`).

    Averaging: with ``balance=False`` (default, the seed's) every pair is one term and the
    reduction runs over positive and negative pairs *together* (``"mean"`` = sum over all pairs /
    number of pairs). With ``balance=True`` positives and negatives are reduced separately and the
    two results are added (``reduce(pos) + reduce(neg)``), which weights the two kinds equally
    whatever their counts; ``balance=True, squared=False, reduction="nonzero_mean"`` is exactly PML
    ``ContrastiveLoss(pos_margin, neg_margin=margin)``.

    Extra stats: ``num_pos_pairs``, ``num_neg_pairs``, ``pos_active_fraction``, ``neg_active_fraction``.
    """

    def __init__(
        self,
        margin: float = 0.5,
        pos_margin: float = 0.0,
        *,
        squared: bool = True,
        balance: bool = False,
        distance: Metric = "euclidean",
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(distance=distance, reduction=reduction)
        if not margin > pos_margin >= 0:
            raise ValueError(
                f"ContrastiveLoss: need margin > pos_margin >= 0; got margin={margin}, pos_margin={pos_margin}"
            )
        self.margin = float(margin)
        self.pos_margin = float(pos_margin)
        self.squared = bool(squared)
        self.balance = bool(balance)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, pos_margin={self.pos_margin}, squared={self.squared}, "
            f"balance={self.balance}, {super().extra_repr()}"
        )

    def _shape(self, hinge: Tensor) -> Tensor:
        return 0.5 * hinge * hinge if self.squared else hinge

    def compute_loss(self, embeddings: Tensor, labels: Tensor, indices_tuple: IndicesTuple | None) -> Tensor:
        if indices_tuple is None:
            return self._all_pairs_loss(embeddings, labels)
        if len(indices_tuple) == 3:
            indices_tuple = triplets_to_pairs(*indices_tuple, num_items=embeddings.shape[0])
        a1, p, a2, n = indices_tuple
        d_pos, d_neg = self._distances(embeddings, [(a1, p), (a2, n)])
        l_pos = self._shape(F.relu(d_pos - self.pos_margin))
        l_neg = self._shape(F.relu(self.margin - d_neg))
        pos, neg = Pool.of(l_pos), Pool.of(l_neg)
        if self.balance:
            pools = [pos, neg]
        else:
            pools = [Pool(pos.total + neg.total, pos.count + neg.count, pos.nonzero + neg.nonzero)]
        return self._finish(
            embeddings,
            pools,
            active=pos.nonzero + neg.nonzero,
            pos_dist=_sum_count(d_pos),
            neg_dist=_sum_count(d_neg),
            **_pair_stats(pos.count, pos.nonzero, neg.count, neg.nonzero),
        )

    def _all_pairs_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Every unordered pair on one (N, N) matrix with 0/1 float weights (no gathers, no bool masks).

        The full matrix holds every unordered pair twice (i, j) and (j, i), so sums and counts are
        halved; the diagonal (d = 0, weight "same") adds 0 to every sum since pos_margin >= 0.
        """
        dist = pairwise_distances(embeddings, metric=self.distance)
        ids, counts = label_ids(labels)
        same = same_label_matrix(ids)
        n = labels.shape[0]
        n_same = (counts * counts).sum()  # ordered same-label pairs, diagonal included
        num_pos = (n_same - n) // 2
        num_neg = (n * n - n_same) // 2
        with torch.no_grad():  # one hinge for both kinds: same -> d - pos_margin, else margin - d
            sign = 2.0 * same - 1.0
            offset = self.margin - (self.margin + self.pos_margin) * same
        losses = self._shape(F.relu(torch.addcmul(offset, sign, dist)))
        total = losses.sum()
        pos_total = (losses * same).sum() if self.balance else None
        with torch.no_grad():
            pos_nonzero = torch.count_nonzero(losses * same) // 2
            all_nonzero = torch.count_nonzero(losses) // 2
            d_same = (dist * same).sum()
            pos_dist = (0.5 * d_same, num_pos)
            neg_dist = (0.5 * (dist.sum() - d_same), num_neg)
        neg_nonzero = all_nonzero - pos_nonzero
        if self.balance:
            pools = [
                Pool(0.5 * pos_total, num_pos, pos_nonzero),
                Pool(0.5 * (total - pos_total), num_neg, neg_nonzero),
            ]
        else:
            pools = [Pool(0.5 * total, num_pos + num_neg, all_nonzero)]
        return self._finish(
            embeddings,
            pools,
            active=all_nonzero,
            pos_dist=pos_dist,
            neg_dist=neg_dist,
            **_pair_stats(num_pos, pos_nonzero, num_neg, neg_nonzero),
        )


def _pair_stats(num_pos: Tensor, pos_nonzero: Tensor, num_neg: Tensor, neg_nonzero: Tensor) -> dict[str, Tensor]:
    """Contrastive extra stats (0-dim tensors)."""
    return {
        "num_pos_pairs": num_pos,
        "num_neg_pairs": num_neg,
        "pos_active_fraction": pos_nonzero / num_pos.clamp_min(1),
        "neg_active_fraction": neg_nonzero / num_neg.clamp_min(1),
    }


class TripletLoss(BaseMetricLoss):
    """Triplet loss of the seed: ``max(0, margin + D(a, p) - D(a, n))`` per triplet.

    ``soft=True`` is the soft-margin variant of Hermans et al. (2017): ``softplus(D(a, p) - D(a, n))``
    (no margin; every triplet then has a positive loss, so ``active_fraction`` counts the triplets
    with ``D(a, p) > D(a, n)`` instead, and ``"nonzero_mean"`` equals ``"mean"``).

    Triplets: ``indices_tuple`` None -> every valid triplet of the batch (computed as a
    (positive pairs, N) table, never N^3); a 3-tuple as given (e.g. from a miner).

    Relation to PML ``TripletMarginLoss(margin, swap=False, smooth_loss=False)`` (reducer
    ``AvgNonZeroReducer``, distance ``LpDistance(normalize_embeddings=True, p=2)``): equal to
    ``TripletLoss(margin, reduction="nonzero_mean", distance="euclidean")`` on L2-normalised
    embeddings. ``soft=True`` equals PML ``smooth_loss=True`` with ``margin=0``.
    """

    def __init__(
        self,
        margin: float = 0.2,
        *,
        soft: bool = False,
        distance: Metric = "euclidean",
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(distance=distance, reduction=reduction)
        if margin < 0:
            raise ValueError(f"TripletLoss: margin must be >= 0; got {margin}")
        self.margin = float(margin)
        self.soft = bool(soft)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, soft={self.soft}, {super().extra_repr()}"

    def _terms(self, d_ap: Tensor, d_an: Tensor, weight: Tensor | None = None) -> tuple[Pool, Tensor]:
        """Pool of the per-triplet losses and the number of active triplets (see class doc)."""
        violation = d_ap - d_an
        if not self.soft:
            pool = Pool.of(F.relu(violation + self.margin), weight)
            return pool, pool.nonzero
        pool = Pool.of(_softplus(violation), weight)
        with torch.no_grad():
            hinge = F.relu(violation) if weight is None else F.relu(violation) * weight
            return pool, torch.count_nonzero(hinge)

    def compute_loss(self, embeddings: Tensor, labels: Tensor, indices_tuple: IndicesTuple | None) -> Tensor:
        if indices_tuple is None:
            return self._all_triplets_loss(embeddings, labels)
        if len(indices_tuple) != 3:
            raise ValueError("TripletLoss: indices_tuple must be triplets (a, p, n), not pairs")
        a, p, n = indices_tuple
        d_ap, d_an = self._distances(embeddings, [(a, p), (a, n)])
        pool, active = self._terms(d_ap, d_an)
        return self._finish(
            embeddings, [pool], active=active, pos_dist=_sum_count(d_ap), neg_dist=_sum_count(d_an)
        )

    def _all_triplets_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Every valid triplet: rows = ordered positive pairs (a, p), columns = candidate negatives,
        a (P, N) table with a 0/1 float weight for "column is a negative of a"."""
        dist = pairwise_distances(embeddings, metric=self.distance)
        ids, counts = label_ids(labels)
        a, p = positive_pairs(ids, counts)
        d_ap = gather_pairs(dist, a, p)
        d_an = dist.index_select(0, a)  # (P, N)
        weight = 1.0 - same_label_matrix(ids.index_select(0, a), ids)
        pool, active = self._terms(d_ap[:, None], d_an, weight)
        with torch.no_grad():  # stats per valid triplet
            per_row = weight.sum(dim=1)
            pos_dist = ((d_ap * per_row).sum(), pool.count)
            neg_dist = ((d_an * weight).sum(), pool.count)
        return self._finish(embeddings, [pool], active=active, pos_dist=pos_dist, neg_dist=neg_dist)




def build_loss(name: str, **kwargs: Any) -> BaseMetricLoss:
    """Build a loss by its name in :data:`training.registry.LOSSES` with keyword arguments.

    Raises:
        ValueError: unknown name (naming the allowed set) or bad arguments.
    """
    cls = LOSSES.require(name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for loss {name!r}: {exc}") from exc
