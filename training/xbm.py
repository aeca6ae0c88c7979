"""Cross-batch memory (Wang et al., 2020): negatives and positives from past batches.

A P×K batch of 64 holds few hard negatives, and from a pretrained start the easy ones stop
teaching early. :class:`CrossBatchMemory` keeps a FIFO ring of the last ``size`` embeddings
(detached) and their labels; :func:`memory_contrastive_loss` scores every (batch item,
reference) pair, where the references are the memory plus the current batch (detached, as
in pytorch-metric-learning's ``CrossBatchMemory``), without the item paired with itself.

Cost: one (B, B + M) distance matrix, so memory use is O(B × M), never (B + M)².
With ``miner="batch_hard"`` each anchor keeps only its hardest positive and hardest
negative among all references; with ``"none"`` every pair counts and the contrastive
margin itself selects the hard negatives (pairs beyond it contribute 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.distances import Metric, check_metric, pairwise_distances

from training.registry import MEMORY_MINERS


class CrossBatchMemory:
    """FIFO of past embeddings: (size, D) float32 and (size,) int64 labels, detached.

    Args:
        size: capacity M (entries beyond it overwrite the oldest).
        dim: embedding size D.
        device: where the ring lives.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        self.size, self.dim = int(size), int(dim)
        self.emb = torch.zeros(self.size, self.dim, device=device)
        self.labels = torch.full((self.size,), -1, dtype=torch.int64, device=device)
        self.ptr = 0
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    def contents(self) -> tuple[Tensor, Tensor]:
        """(n, D) float32 embeddings and (n,) int64 labels currently held, oldest first."""
        if self.filled < self.size:
            return self.emb[: self.filled], self.labels[: self.filled]
        order = torch.cat([torch.arange(self.ptr, self.size), torch.arange(0, self.ptr)]).to(self.emb.device)
        return self.emb[order], self.labels[order]

    @torch.no_grad()
    def enqueue(self, emb: Tensor, labels: Tensor) -> None:
        """Add a batch ((B, D) embeddings, (B,) labels), detached; the oldest entries go first."""
        emb = emb.detach().float()
        labels = labels.detach().to(torch.int64)
        if emb.shape[0] >= self.size:  # only the newest `size` fit
            emb, labels = emb[-self.size:], labels[-self.size:]
        b = emb.shape[0]
        idx = (torch.arange(b, device=self.emb.device) + self.ptr) % self.size
        self.emb[idx] = emb.to(self.emb.device)
        self.labels[idx] = labels.to(self.labels.device)
        self.ptr = (self.ptr + b) % self.size
        self.filled = min(self.size, self.filled + b)

    def clear(self) -> None:
        self.ptr = self.filled = 0


def memory_contrastive_loss(emb: Tensor, labels: Tensor, mem_emb: Tensor, mem_labels: Tensor, *,
                            margin: float = 0.5, pos_margin: float = 0.0, squared: bool = True,
                            balance: bool = True, reduction: str = "nonzero_mean",
                            distance: Metric = "cosine", miner: str = "none") -> tuple[Tensor, dict[str, float]]:
    """Contrastive loss of each batch item against the memory plus the batch itself.

    The per-pair terms are :class:`training.losses.ContrastiveLoss`'s (``½·max(0, D - pos_margin)²``
    for a positive pair, ``½·max(0, margin - D)²`` for a negative one; without squares when
    ``squared=False``); ``balance`` reduces positives and negatives separately and adds them;
    ``reduction`` is ``mean`` / ``nonzero_mean`` / ``sum`` as there.

    Args:
        emb: (B, D) float embeddings of the batch (the gradient flows through these).
        labels: (B,) int labels.
        mem_emb: (M, D) past embeddings (treated as constants), M may be 0.
        mem_labels: (M,) int labels.
        miner: ``"none"`` (every pair) or ``"batch_hard"`` (per anchor, the farthest positive and
            the closest negative among all references).

    Returns:
        (scalar loss, stats) with stats ``num_pos_pairs``, ``num_neg_pairs``, ``active_fraction``.
    """
    check_metric(distance)
    if miner not in MEMORY_MINERS:
        raise ValueError(f"unknown memory miner {miner!r}; allowed: {list(MEMORY_MINERS)}")
    if not margin > pos_margin >= 0:
        raise ValueError(f"need margin > pos_margin >= 0; got margin={margin}, pos_margin={pos_margin}")
    b = emb.shape[0]
    emb = emb.float()
    if distance == "cosine":
        emb = F.normalize(emb, dim=1)
    ref = torch.cat([emb.detach(), mem_emb.detach().to(emb.device, torch.float32)])
    ref_labels = torch.cat([labels, mem_labels.to(labels.device)])
    dist = pairwise_distances(emb, ref, metric=distance)  # (B, B + M)
    same = (labels[:, None] == ref_labels[None, :]).float()
    not_self = torch.ones_like(same)
    not_self[torch.arange(b), torch.arange(b)] = 0.0  # an item is not its own positive
    pos_w, neg_w = same * not_self, 1.0 - same

    def shape(h: Tensor) -> Tensor:
        return 0.5 * h * h if squared else h

    l_pos = shape(F.relu(dist - pos_margin))
    l_neg = shape(F.relu(margin - dist))
    if miner == "batch_hard":
        has_pos = pos_w.sum(1) > 0
        has_neg = neg_w.sum(1) > 0
        hard_pos = torch.where(pos_w > 0, dist, torch.full_like(dist, -1.0)).argmax(1)
        hard_neg = torch.where(neg_w > 0, dist, torch.full_like(dist, float("inf"))).argmin(1)
        sel_pos = torch.zeros_like(pos_w)
        sel_neg = torch.zeros_like(neg_w)
        rows = torch.arange(b, device=emb.device)
        sel_pos[rows[has_pos], hard_pos[has_pos]] = 1.0
        sel_neg[rows[has_neg], hard_neg[has_neg]] = 1.0
        pos_w, neg_w = sel_pos, sel_neg

    def reduce(losses: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = losses * w
        total, count, nonzero = x.sum(), w.sum(), (x > 0).sum()
        if reduction == "sum":
            return total, count, nonzero
        if reduction == "mean":
            return total / count.clamp_min(1), count, nonzero
        return total / nonzero.clamp_min(1), count, nonzero

    if balance:
        p_val, n_pos, nz_pos = reduce(l_pos, pos_w)
        n_val, n_neg, nz_neg = reduce(l_neg, neg_w)
        loss = p_val + n_val
    else:
        both = l_pos * pos_w + l_neg * neg_w
        w = pos_w + neg_w
        loss, _, _ = reduce(both, w)
        n_pos, n_neg = pos_w.sum(), neg_w.sum()
        nz_pos, nz_neg = ((l_pos * pos_w) > 0).sum(), ((l_neg * neg_w) > 0).sum()
    with torch.no_grad():
        stats = {"num_pos_pairs": float(n_pos), "num_neg_pairs": float(n_neg),
                 "active_fraction": float((nz_pos + nz_neg) / (n_pos + n_neg).clamp_min(1))}
    return loss + emb.sum() * 0.0, stats


class MemoryLoss(torch.nn.Module):
    """A metric loss with cross-batch memory, as a drop-in ``loss_fn(emb, labels, tuples)``.

    For the first ``warmup_steps`` calls it is ``base`` (the in-batch loss, miner tuples
    honoured) while the memory fills; after that every call is
    :func:`memory_contrastive_loss` against the memory, which already includes every in-batch
    pair. Each call enqueues the batch. ``stats`` follows whichever ran.
    """

    def __init__(self, base: torch.nn.Module, memory: CrossBatchMemory, *, warmup_steps: int = 0,
                 miner: str = "none", **loss_kwargs) -> None:
        super().__init__()
        self.base, self.memory = base, memory
        self.warmup_steps, self.miner, self.loss_kwargs = int(warmup_steps), miner, loss_kwargs
        self.calls = 0
        self.stats: dict[str, float] = {}

    def forward(self, emb: Tensor, labels: Tensor, indices_tuple=None) -> Tensor:
        self.calls += 1
        if self.calls <= self.warmup_steps:
            out = self.base(emb, labels, indices_tuple)
            self.stats = dict(getattr(self.base, "stats", {}))
        else:
            out, self.stats = memory_contrastive_loss(emb, labels, *self.memory.contents(), miner=self.miner,
                                                      **self.loss_kwargs)
        self.memory.enqueue(emb, labels)
        return out
