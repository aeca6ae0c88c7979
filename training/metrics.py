"""Retrieval metrics of an embedding: Recall@K, precision@1, R-precision, MAP@R.

numpy + faiss only (no torch). Neighbours come from an exact ``faiss.IndexFlatIP`` over
L2-normalised vectors (inner product = cosine), searched in blocks of queries, so memory is
``O(block_size * k)`` and no (Q, N) matrix is ever built.

Definitions (Musgrave et al. 2020, "A Metric Learning Reality Check"; same as
pytorch-metric-learning's ``AccuracyCalculator`` with ``k="max_bin_count"``):

- ``R`` of a query = number of references with the query's label (excluding the query itself in
  leave-one-out mode). Queries with ``R = 0`` cannot be scored and are left out of every metric
  (PML: "lone query labels"); ``num_queries`` counts the queries that were scored.
- ``recall@k``: fraction of queries with at least one same-label item among the top k (the
  metric-learning Recall@K of Oh Song et al. 2016; not the IR recall).
- ``precision@1``: fraction whose nearest neighbour has the query's label (= ``recall@1``).
- ``r_precision``: mean over queries of (same-label items among the top R) / R.
- ``map@r``: mean over queries of ``(1/R) * sum_{i<=R} P@i * [item i has the query's label]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np

log = logging.getLogger(__name__)


def _as_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    """(N, D) float32 contiguous, L2-normalised copy; ValueError on bad shape/values."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"retrieval_metrics: {name} must be a non-empty (N, D) array; got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"retrieval_metrics: {name} must be numeric; got dtype {x.dtype}")
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(x).all():
        raise ValueError(f"retrieval_metrics: {name} contains NaN or inf")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"retrieval_metrics: {name} has {(norms == 0).sum()} all-zero rows; cannot normalise")
    x /= norms[:, None]
    return x


def _as_labels(y: np.ndarray, n: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"retrieval_metrics: {name} must have shape ({n},); got {y.shape}")
    return y


def retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    reference: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    block_size: int = 4096,
) -> dict[str, float]:
    """Retrieval quality of ``query`` against ``reference`` by cosine similarity.

    Args:
        query: (Q, D) float32 embeddings (unit norm; normalised again here so ranking is cosine).
        query_labels: (Q,) labels (any comparable dtype: ints or strings).
        reference: (N, D) gallery, or None for leave-one-out on the query set itself (each query
            is removed from its own neighbours, as PML ``AccuracyCalculator`` with reference =
            query). A separate reference must not contain the queries.
        reference_labels: (N,) labels; required with ``reference``.
        ks: the K of Recall@K, positive ints.
        block_size: queries searched per faiss call (bounds memory to block_size x k).

    Returns:
        ``{"recall@1": ..., "recall@2": ..., "precision@1", "r_precision", "map@r", "num_queries"}``,
        plain floats in [0, 1] except ``num_queries`` (the count of scored queries, as a float).

    Raises:
        ValueError: bad shapes/values, or no query has a same-label reference.
    """
    q = _as_embeddings(query, "query")
    q_labels = _as_labels(query_labels, q.shape[0], "query_labels")
    leave_one_out = reference is None
    if leave_one_out:
        if reference_labels is not None:
            raise ValueError("retrieval_metrics: reference_labels given without reference")
        ref, ref_labels = q, q_labels
    else:
        if reference_labels is None:
            raise ValueError("retrieval_metrics: reference given without reference_labels")
        ref = _as_embeddings(reference, "reference")
        ref_labels = _as_labels(reference_labels, ref.shape[0], "reference_labels")
        if ref.shape[1] != q.shape[1]:
            raise ValueError(
                f"retrieval_metrics: query has dimension {q.shape[1]} but reference has {ref.shape[1]}"
            )
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"retrieval_metrics: ks must be positive integers; got {ks}")
    if block_size < 1:
        raise ValueError(f"retrieval_metrics: block_size must be >= 1; got {block_size}")

    # R per query: references sharing its label (minus itself in leave-one-out mode).
    ref_values, ref_counts = np.unique(ref_labels, return_counts=True)
    pos = np.clip(np.searchsorted(ref_values, q_labels), 0, len(ref_values) - 1)
    r_all = np.where(ref_values[pos] == q_labels, ref_counts[pos], 0) - int(leave_one_out)
    scored = r_all > 0
    num_scored = int(scored.sum())
    if num_scored == 0:
        raise ValueError("retrieval_metrics: no query has a reference with the same label; nothing to score")
    if num_scored < q.shape[0]:
        log.warning("retrieval_metrics: %d of %d queries have no same-label reference; skipped",
                    q.shape[0] - num_scored, q.shape[0])

    available = ref.shape[0] - int(leave_one_out)
    k = min(max(ks[-1], int(r_all.max())), available)
    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(ref)

    hits = {kk: 0 for kk in {1, *ks}}  # k = 1 is precision@1
    r_precision_sum = 0.0
    map_sum = 0.0
    cols = np.arange(1, k + 1)
    for start in range(0, q.shape[0], block_size):
        stop = min(start + block_size, q.shape[0])
        keep = scored[start:stop]
        if not keep.any():
            continue
        block = q[start:stop][keep]
        r = r_all[start:stop][keep]
        labels = q_labels[start:stop][keep]
        if leave_one_out:
            _, nn = index.search(block, k + 1)
            own = np.flatnonzero(keep) + start
            nn = _drop_self(nn, own)
        else:
            _, nn = index.search(block, k)
        same = ref_labels[nn] == labels[:, None]  # (b, k) bool
        for kk in hits:
            hits[kk] += int(same[:, : min(kk, k)].any(axis=1).sum())
        within_r = cols[None, :] <= r[:, None]  # (b, k): rank <= R
        relevant = same & within_r
        r_precision_sum += float((relevant.sum(axis=1) / r).sum())
        precision_at_i = np.cumsum(relevant, axis=1) / cols[None, :]
        map_sum += float(((precision_at_i * relevant).sum(axis=1) / r).sum())

    out = {f"recall@{kk}": hits[kk] / num_scored for kk in ks}
    out["precision@1"] = hits[1] / num_scored
    out["r_precision"] = r_precision_sum / num_scored
    out["map@r"] = map_sum / num_scored
    out["num_queries"] = float(num_scored)
    return out


def _drop_self(nn: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Remove each query's own index from its (b, k + 1) neighbour list -> (b, k).

    Where the query is not among its k + 1 neighbours (exact duplicates outrank it), the last
    column is dropped instead -- PML's rule.
    """
    is_self = nn == own[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), nn.shape[1] - 1)
    keep = np.ones(nn.shape, dtype=bool)
    keep[np.arange(nn.shape[0]), drop] = False
    return nn[keep].reshape(nn.shape[0], nn.shape[1] - 1)
