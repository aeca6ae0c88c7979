"""Hard-negative miners: pick the informative tuples of a batch for a metric loss.

A miner maps a batch ``(embeddings (N, D), labels (N,))`` to index tensors that the losses accept:
triplets ``(a, p, n)`` with ``labels[a] == labels[p]``, ``a != p`` and ``labels[a] != labels[n]``.
All miners are vectorised over the batch (no Python loop over samples), run under
``torch.no_grad`` on one distance matrix, and leave counters in ``miner.stats``.

Memory: batch-hard needs only the (N, N) distance matrix. The margin miners (semi-hard, hard,
batch-all) look at every triplet, as a (positive pairs, N) table: ``N * (K - 1) * N`` entries for a
P x K batch (4 M for N = 1024, K = 4), processed in chunks of at most ``_CHUNK_ELEMENTS`` entries,
so the working memory is bounded; the *returned* index tensors hold every selected triplet
(3 int64 per triplet), which for batch-all without a margin is all ``~N^2 (K - 1)`` of them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from .distances import Metric, check_metric, gather_pairs, pairwise_distances
from .registry import MINERS

log = logging.getLogger(__name__)

Triplets = tuple[Tensor, Tensor, Tensor]
Pairs = tuple[Tensor, Tensor, Tensor, Tensor]

# Upper bound on the entries of one (positive pairs x N) chunk in the margin miners (~16 M floats).
_CHUNK_ELEMENTS = 1 << 24


def check_batch(embeddings: Tensor, labels: Tensor, *, who: str) -> Tensor:
    """Validate a batch; return ``labels`` on the embeddings' device.

    Args:
        embeddings: (N, D) floating tensor.
        labels: (N,) integer tensor (int64 preferred).
        who: the caller's name, for the error message.

    Raises:
        ValueError: wrong rank, dtype or length, naming what was received.
    """
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or not embeddings.is_floating_point():
        if isinstance(embeddings, Tensor):
            got = f"{tuple(embeddings.shape)} {embeddings.dtype}"
        else:
            got = type(embeddings).__name__
        raise ValueError(f"{who}: embeddings must be a floating (N, D) tensor; got {got}")
    if not isinstance(labels, Tensor) or labels.ndim != 1:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{who}: labels must be a 1-D (N,) tensor; got {got}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{who}: labels must be an integer tensor (int64); got {labels.dtype}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{who}: {embeddings.shape[0]} embeddings but {labels.shape[0]} labels; they must match"
        )
    return labels.to(device=embeddings.device, dtype=torch.long)


def label_ids(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous class ids of a batch.

    Args:
        labels: (N,) integer tensor, any values.

    Returns:
        ``(ids, counts)``: (N,) int64 in ``[0, C)`` and (C,) int64 class sizes.
    """
    _, ids, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return ids, counts


def same_label_matrix(ids: Tensor, other: Tensor | None = None) -> Tensor:
    """(len(ids), len(other)) float32 matrix: 1.0 where the class ids match, else 0.0.

    The diagonal of the square case is 1. Built as a float matrix directly (``torch.eq`` writing
    into a float32 output), because on CPU bool masks are slow to combine with float tensors
    (``where``/``masked_fill`` cost ~10x an arithmetic op at N = 1024). Ids come from
    :func:`label_ids` (< 2^24, hence exact in float32).
    """
    a = ids.float()
    b = a if other is None else other.float()
    out = torch.empty(a.shape[0], b.shape[0], device=ids.device)
    return torch.eq(a[:, None], b[None, :], out=out)


def positive_pairs(ids: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Every ordered positive pair ``(a, p)``, ``a != p``, from the class ids -- in O(pairs).

    Built from a sort of the labels instead of ``nonzero`` over an (N, N) mask (which costs
    more than the whole batch-hard step at N = 1024).

    Args:
        ids, counts: from :func:`label_ids`.

    Returns:
        ``(a, p)``: int64 tensors of length ``sum(c * (c - 1))``, grouped by class.
    """
    device = ids.device
    order = torch.argsort(ids, stable=True)  # batch positions grouped by class
    group = ids[order]
    size = counts[group]
    start = (torch.cumsum(counts, 0) - counts)[group]  # where each element's class starts (sorted)
    rank = torch.arange(ids.numel(), device=device) - start  # position inside its class
    reps = size - 1  # partners per anchor
    anchor = torch.repeat_interleave(torch.arange(ids.numel(), device=device), reps)
    first = torch.cumsum(reps, 0) - reps
    r = torch.arange(anchor.numel(), device=device) - first[anchor]  # 0 .. size - 2
    partner = start[anchor] + r + (r >= rank[anchor]).long()  # skip the anchor itself
    return order[anchor], order[partner]


def all_pairs(labels: Tensor) -> Pairs:
    """Every positive and every negative pair of a batch, each unordered pair once.

    Args:
        labels: (N,) integer tensor.

    Returns:
        ``(a1, p, a2, n)``, int64: positive pairs ``(a1[k], p[k])`` and negative pairs
        ``(a2[k], n[k])``, each with first index < second index (``i < j``), in row-major order.
    """
    labels = labels.reshape(-1)
    n = labels.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=labels.device)
    same = labels[i] == labels[j]
    return i[same], j[same], i[~same], j[~same]


def _unique_unordered(i: Tensor, j: Tensor, num_items: int) -> tuple[Tensor, Tensor]:
    """Unique unordered pairs of (T,) index tensors, returned as (lo, hi) with lo <= hi, sorted."""
    lo, hi = torch.minimum(i, j), torch.maximum(i, j)
    code = torch.unique(lo * num_items + hi)
    return code // num_items, code % num_items


def triplets_to_pairs(a: Tensor, p: Tensor, n: Tensor, *, num_items: int | None = None) -> Pairs:
    """The unique positive and negative pairs implied by triplets.

    ``(a, p)`` and ``(p, a)`` are the same pair (distances are symmetric), so pairs are unordered
    and returned once each as ``(i, j)`` with ``i < j``, sorted.

    Args:
        a, p, n: (T,) int64 triplet indices.
        num_items: batch size N; defaults to ``max index + 1``.

    Returns:
        ``(a1, p, a2, n)`` int64: unique positive pairs ``(a1, p)``, unique negative pairs ``(a2, n)``.
    """
    if not (a.shape == p.shape == n.shape) or a.ndim != 1:
        raise ValueError(
            f"triplets_to_pairs: a, p, n must be 1-D of equal length; got {tuple(a.shape)}, "
            f"{tuple(p.shape)}, {tuple(n.shape)}"
        )
    if a.numel() == 0:
        empty = a.new_empty(0, dtype=torch.long)
        return empty, empty, empty, empty
    if num_items is None:
        num_items = int(torch.stack([a.max(), p.max(), n.max()]).max()) + 1
    a1, p1 = _unique_unordered(a.long(), p.long(), num_items)
    a2, n2 = _unique_unordered(a.long(), n.long(), num_items)
    return a1, p1, a2, n2


def _empty_triplets(device: torch.device) -> Triplets:
    empty = torch.empty(0, dtype=torch.long, device=device)
    return empty, empty, empty


class BaseMiner:
    """Validates a batch, computes one distance matrix and hands it to the hook :meth:`mine`.

    Call: ``miner(embeddings (N, D) float, labels (N,) int64) -> (a, p, n)``, three int64 tensors
    of equal length T (the triplet indices), computed under ``torch.no_grad`` in float32.

    After each call ``self.stats`` (dict[str, float]) holds ``num_triplets``, ``mean_pos_dist``
    and ``mean_neg_dist`` of the selected triplets (NaN when there are none), ``hard_fraction``
    (selected triplets whose negative is closer than the positive), and for margin miners
    ``num_candidates`` (all valid triplets of the batch) and ``kept_fraction`` (kept / candidates).
    """

    def __init__(self, *, distance: Metric = "euclidean") -> None:
        self.distance: Metric = check_metric(distance)
        self.stats: dict[str, float] = {}

    def __repr__(self) -> str:
        extra = {k: v for k, v in vars(self).items() if k != "stats"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in extra.items())})"

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        labels = check_batch(embeddings, labels, who=type(self).__name__)
        if embeddings.shape[0] == 0:
            self.stats = {"num_triplets": 0.0}
            return _empty_triplets(embeddings.device)
        with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
            emb = embeddings.detach().float()
            dist = pairwise_distances(emb, metric=self.distance)
            a, p, n = self.mine(emb, labels, dist)
        assert a.shape == p.shape == n.shape and a.dtype == torch.long, "mine() broke its contract"
        return a, p, n

    def mine(self, embeddings: Tensor, labels: Tensor, dist: Tensor) -> Triplets:
        """The hook: embeddings (N, D) float32, labels (N,) int64, dist (N, N) float32 -> (a, p, n).

        Must set ``self.stats`` (use :meth:`_record`).
        """
        raise NotImplementedError

    def _record(self, dist: Tensor, a: Tensor, p: Tensor, n: Tensor, **extra: Tensor | float) -> None:
        """Fill ``self.stats`` from the selected triplets with a single device sync."""
        if a.numel():
            d_ap, d_an = gather_pairs(dist, a, p), gather_pairs(dist, a, n)
            values = [d_ap.mean(), d_an.mean(), (d_an < d_ap).float().mean()]
        else:
            nan = torch.tensor(float("nan"), device=dist.device)
            values = [nan, nan, nan]
        names = ["mean_pos_dist", "mean_neg_dist", "hard_fraction", *extra]
        values += [torch.as_tensor(v, dtype=torch.float32, device=dist.device) for v in extra.values()]
        self.stats = {"num_triplets": float(a.numel()), **dict(zip(names, torch.stack(values).tolist()))}


class BatchHardMiner(BaseMiner):
    """Batch-hard mining (Hermans et al. 2017, "In Defense of the Triplet Loss").

    For every anchor: its hardest positive (largest ``d(a, p)``, ``p != a``) and its hardest
    negative (smallest ``d(a, n)``). Anchors without a positive or without a negative are dropped.
    Returns at most N triplets, one per anchor, in anchor order. Same selection as PML
    ``BatchHardMiner`` (up to ties between equal distances).
    """

    def mine(self, embeddings: Tensor, labels: Tensor, dist: Tensor) -> Triplets:
        ids, _ = label_ids(labels)
        same = same_label_matrix(ids)
        # Masked arg-max/min with arithmetic masks (see same_label_matrix): subtracting `big` from
        # every non-positive and adding it to every non-negative puts them out of reach.
        big = dist.amax() + 1.0
        pos_score = torch.addcmul(dist, 1.0 - same, big, value=-1.0)  # positives keep d >= 0
        pos_score.diagonal().fill_(float("-inf"))  # an anchor is not its own positive
        best_p, p = pos_score.max(dim=1)
        best_n, n = torch.addcmul(dist, same, big).min(dim=1)  # negatives keep d < big
        a = torch.nonzero((best_p >= 0) & (best_n < big)).squeeze(1)
        p, n = p[a], n[a]
        self._record(dist, a, p, n)
        return a, p, n


class _MarginMiner(BaseMiner):
    """Shared machinery: enumerate every valid triplet as a (positive pairs, N) table, keep some."""

    def _keep(self, d_ap: Tensor, d_an: Tensor) -> Tensor:
        """(P, 1) and (P, N) distances -> (P, N) bool: which candidate triplets to keep."""
        raise NotImplementedError

    def mine(self, embeddings: Tensor, labels: Tensor, dist: Tensor) -> Triplets:
        ids, counts = label_ids(labels)
        a_all, p_all = positive_pairs(ids, counts)
        n_items = dist.shape[0]
        # Every anchor of class c has N - |c| negatives.
        candidates = float((n_items - counts[ids.index_select(0, a_all)]).sum()) if a_all.numel() else 0.0
        rows = max(1, _CHUNK_ELEMENTS // n_items)
        out_a, out_p, out_n = [], [], []
        # Chunks of positive pairs bound the working memory; this is not a loop over samples.
        for start in range(0, a_all.numel(), rows):
            a, p = a_all[start : start + rows], p_all[start : start + rows]
            negative = ids.index_select(0, a)[:, None] != ids[None, :]  # (P, N)
            keep = negative & self._keep(gather_pairs(dist, a, p)[:, None], dist.index_select(0, a))
            k, n = torch.nonzero(keep, as_tuple=True)
            out_a.append(a.index_select(0, k))
            out_p.append(p.index_select(0, k))
            out_n.append(n)
        if out_a:
            a, p, n = torch.cat(out_a), torch.cat(out_p), torch.cat(out_n)
        else:
            a, p, n = _empty_triplets(dist.device)
        kept = a.numel() / candidates if candidates else 0.0
        self._record(dist, a, p, n, num_candidates=candidates, kept_fraction=kept)
        return a, p, n


class SemiHardMiner(_MarginMiner):
    """Semi-hard mining (Schroff et al. 2015, FaceNet): every anchor-positive pair, with every
    negative that is farther than the positive but still inside the margin:
    ``d(a, p) < d(a, n) < d(a, p) + margin``.

    Relation to PML: ``TripletMarginMiner(margin, type_of_triplets="semihard")`` keeps
    ``0 < d(a, n) - d(a, p) <= margin`` -- the same set except the upper boundary, which is
    included there and excluded here (a measure-zero difference for real embeddings). FaceNet's own
    implementation keeps only the closest semi-hard negative per pair; like PML we keep them all.
    """

    def __init__(self, margin: float = 0.2, *, distance: Metric = "euclidean") -> None:
        super().__init__(distance=distance)
        if not margin > 0:
            raise ValueError(f"SemiHardMiner: margin must be > 0; got {margin}")
        self.margin = float(margin)

    def _keep(self, d_ap: Tensor, d_an: Tensor) -> Tensor:
        return (d_an > d_ap) & (d_an < d_ap + self.margin)


class HardMiner(_MarginMiner):
    """All hard triplets: every (anchor, positive, negative) with ``d(a, n) < d(a, p)``.

    Same set as PML ``TripletMarginMiner(margin >= 0, type_of_triplets="hard")`` up to the
    ``d(a, n) == d(a, p)`` boundary (kept there, dropped here).
    """

    def _keep(self, d_ap: Tensor, d_an: Tensor) -> Tensor:
        return d_an < d_ap


class BatchAllMiner(_MarginMiner):
    """Batch-all mining: every valid triplet of the batch; with ``margin``, only the *active* ones,
    ``d(a, p) - d(a, n) + margin > 0`` (those with a non-zero triplet loss).

    ``BatchAllMiner(margin)`` is PML ``TripletMarginMiner(margin, type_of_triplets="all")`` (up to the
    boundary). Output size is up to ``N^2 (K - 1)`` triplets for a P x K batch; see module notes.
    """

    def __init__(self, margin: float | None = None, *, distance: Metric = "euclidean") -> None:
        super().__init__(distance=distance)
        if margin is not None and margin < 0:
            raise ValueError(f"BatchAllMiner: margin must be >= 0 or None; got {margin}")
        self.margin = None if margin is None else float(margin)

    def _keep(self, d_ap: Tensor, d_an: Tensor) -> Tensor:
        if self.margin is None:
            return torch.ones_like(d_an, dtype=torch.bool)
        return d_ap - d_an + self.margin > 0




def build_miner(name: str | None, **kwargs: Any) -> BaseMiner | None:
    """Build a miner by its name in :data:`training.registry.MINERS`;
    ``None`` or ``"none"`` -> None (the loss then uses every pair / triplet of the batch).

    Keyword arguments go to the miner (``distance=...``, ``margin=...``).

    Raises:
        ValueError: unknown name (naming the allowed set) or bad arguments.
    """
    if name is None or name == "none":
        if kwargs:
            log.debug("build_miner(None) ignores %s", sorted(kwargs))
        return None
    if name not in MINERS:
        raise ValueError(f"unknown miner {name!r}; allowed: none, {', '.join(MINERS)}")
    try:
        return MINERS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for miner {name!r}: {exc}") from exc
