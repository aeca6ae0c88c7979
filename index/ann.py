"""FAISS structures: factory strings, the ``auto`` choice, building, tuning and exact search.

Cosine by construction: every vector is L2-normalised before it gets here and every index
uses ``METRIC_INNER_PRODUCT``, so a score is a cosine in [-1, 1], higher is better.

Allowed factories are the ones that keep stable ids *and* support deletion:

* ``Flat`` -> ``IndexIDMap2(IndexFlatIP)``: exact.
* any IVF factory (``IVF1024,Flat``, ``IVF4096,PQ32``, ``IVF1024,SQ8``, ``OPQ16,IVF1024,PQ16``...):
  the inverted lists store the int64 ids natively and ``remove_ids`` works.

HNSW is refused: FAISS cannot delete from an HNSW graph, and the index must never serve a
deleted id.

``auto`` is exact (``Flat``) while N * D <= :data:`FLAT_MAX_ELEMENTS` (2**25 floats = 128 MiB,
262,144 vectors at D=128), which keeps exact single-query latency around 10 ms. Above it,
``IVF{nlist},Flat`` with ``nlist`` the power of two nearest ``sqrt(N)``, and ``nprobe`` tuned on
held-out queries to reach the recall@10 target. The measurement: docs/design.md, "Index: exact
search up to 2**25 floats".
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

import faiss
import numpy as np

log = logging.getLogger(__name__)

#: Below this many stored floats (N * D) ``auto`` stays exact; see the module docstring.
FLAT_MAX_ELEMENTS = 2**25
#: Queries sampled from the collection to tune and measure recall@10.
TUNING_QUERIES = 1000
#: Safety margin over the target when tuning, so fresh queries also meet the target.
TUNING_MARGIN = 0.005
METRIC = faiss.METRIC_INNER_PRODUCT
METRIC_NAME = "inner_product"
_NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
                1536, 2048, 3072, 4096, 8192, 16384, 32768, 65536)

# In faiss-cpu 1.15.1 this defaults to 128000: fewer queries than that take the sequential
# scan, much slower for small query batches (docs/design.md, "Index").
faiss.cvar.distance_compute_blas_threshold = 20


def faiss_version() -> str:
    return faiss.__version__


def set_search_threads(n: int) -> None:
    """Set FAISS's OpenMP threads *for the calling thread* (an OpenMP per-thread setting)."""
    faiss.omp_set_num_threads(max(1, int(n)))


@dataclass
class Tuning:
    """How an index was tuned: runtime parameters and the recall they measured."""

    params: dict[str, int] = field(default_factory=dict)  # e.g. {"nprobe": 24}
    recall_at_10: float = 1.0
    n_queries: int = 0
    n_at_tuning: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (nprobe, recall) tried


def normalize_factory(factory: str) -> str:
    """Validate a factory string; returns it stripped. ``auto`` passes through.

    Raises:
        ValueError: naming the string and the allowed families.
    """
    f = factory.strip()
    if f.lower() == "auto":
        return "auto"
    if f in ("Flat", "IDMap2,Flat", "IDMap,Flat"):
        return "Flat"
    if "HNSW" in f and not re.search(r"IVF\d+_HNSW", f):
        raise ValueError(
            f"factory {factory!r}: HNSW indexes cannot delete vectors, and a deleted id must never be "
            "served; use 'auto', 'Flat' or an IVF factory such as 'IVF1024,Flat' or 'IVF1024,PQ32'"
        )
    if "IVF" not in f:
        raise ValueError(f"factory {factory!r} is not supported; allowed: 'auto', 'Flat', or an IVF factory "
                         "(e.g. 'IVF1024,Flat', 'IVF4096,PQ32', 'IVF1024,SQ8')")
    try:
        idx = faiss.index_factory(8 if "PQ" not in f else 64, f, METRIC)
    except RuntimeError as exc:
        raise ValueError(f"factory {factory!r} is not a valid FAISS factory string ({str(exc).splitlines()[-1]})") from None
    del idx
    return f


def nlist_for(n: int) -> int:
    """IVF list count for ``n`` vectors: the power of two nearest sqrt(n), in [16, 65536]."""
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))))


def choose_factory(requested: str, n: int, dim: int) -> str:
    """Concrete factory for ``n`` vectors of dimension ``dim`` (resolves ``auto``)."""
    if requested != "auto":
        return requested
    if n * dim <= FLAT_MAX_ELEMENTS:
        return "Flat"
    return ann_factory(n)


def ann_factory(n: int) -> str:
    """The ANN factory ``auto`` picks above the exact bound: ``IVF{nlist},Flat``."""
    return f"IVF{nlist_for(n)},Flat"


def empty_index(factory: str, dim: int) -> faiss.Index:
    """An untrained/empty index for a concrete factory (``Flat`` or an IVF string)."""
    if factory == "Flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    return faiss.index_factory(dim, factory, METRIC)


def nlist_of(index: faiss.Index) -> int | None:
    try:
        return faiss.extract_index_ivf(index).nlist
    except (RuntimeError, AttributeError):
        return None


def set_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply runtime knobs (``nprobe``) through ParameterSpace, which sees through wrappers."""
    if params:
        ps = faiss.ParameterSpace()
        for k, v in params.items():
            ps.set_index_parameter(index, k, int(v))


def exact_topk(queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row indices of ``base`` by inner product: (Q, D), (N, D) -> (Q, k) int64."""
    _, idx = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                       np.ascontiguousarray(base, dtype=np.float32), k, metric=METRIC)
    return idx


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean |found[:k] ∩ truth[:k]| / k over queries; (Q, >=k) id arrays (-1 = no result)."""
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k]):
        hits += len(set(f[f >= 0].tolist()) & set(t.tolist()))
    return hits / (k * len(truth))


def build(factory: str, vectors: np.ndarray, ids: np.ndarray, *, rng: np.random.Generator | None = None,
          recall_target: float = 0.95, threads: int | None = None) -> tuple[faiss.Index, Tuning]:
    """Build a concrete index over (N, D) float32 unit ``vectors`` with int64 ``ids``.

    IVF: trains on a sample that excludes the tuning queries, adds everything, then tunes.
    Returns the index and its :class:`Tuning` (recall 1.0 for Flat).
    """
    rng = rng or np.random.default_rng(0)
    n, dim = vectors.shape
    set_search_threads(threads or os.cpu_count() or 1)
    try:
        index = empty_index(factory, dim)
        if factory == "Flat":
            if n:
                index.add_with_ids(vectors, ids)
            return index, Tuning(n_at_tuning=n)
        nlist = nlist_of(index) or 1
        perm = rng.permutation(n)
        n_q = min(TUNING_QUERIES, max(0, n // 10))
        q_rows = perm[:n_q]
        train_rows = perm[n_q:][: max(64 * nlist, 50_000)]
        min_train = nlist  # faiss needs at least one point per centroid
        if len(train_rows) < min_train:
            raise ValueError(f"factory {factory!r} needs at least {min_train} vectors to train; have {n} "
                             f"(use 'Flat' or 'auto' for a collection this small)")
        train = vectors[np.sort(train_rows)]
        log.info("training %s on %d of %d vectors", factory, len(train), n)
        index.train(train)
        index.add_with_ids(vectors, ids)
        tuning = tune(index, vectors, ids, q_rows, recall_target=recall_target)
        return index, tuning
    finally:
        set_search_threads(1)


def tune(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, q_rows: np.ndarray, *,
         recall_target: float) -> Tuning:
    """Pick the smallest nprobe whose recall@10 on the held-out queries reaches the target.

    Each query row is searched with k=11 by both exact and ANN search and its own id is dropped
    from both lists, so a query is effectively held out of the base it is measured against
    (it was also held out of k-means training by :func:`build`).
    """
    nlist = nlist_of(index)
    n = len(vectors)
    if nlist is None or len(q_rows) == 0:
        return Tuning(n_at_tuning=n)
    q = vectors[q_rows]
    qids = ids[q_rows]
    k = 11
    truth = _drop_self(ids[exact_topk(q, vectors, min(k, n))], qids)
    curve = []
    chosen = None
    for nprobe in [p for p in _NPROBE_GRID if p < nlist] + [nlist]:
        set_params(index, {"nprobe": nprobe})
        _, found = index.search(q, min(k, n))
        r = recall_at(_drop_self(found, qids), truth)
        curve.append((nprobe, round(r, 4)))
        if r >= min(1.0, recall_target + TUNING_MARGIN) or nprobe >= nlist:
            chosen = (nprobe, r)
            break
    assert chosen is not None
    set_params(index, {"nprobe": chosen[0]})
    log.info("tuned nprobe=%d: recall@10=%.4f on %d held-out queries (target %.3f)",
             chosen[0], chosen[1], len(q_rows), recall_target)
    return Tuning(params={"nprobe": chosen[0]}, recall_at_10=round(chosen[1], 4), n_queries=len(q_rows),
                  n_at_tuning=n, curve=curve)


def _drop_self(found: np.ndarray, qids: np.ndarray) -> np.ndarray:
    """Remove each query's own id from its result row (keeping order); rows keep width k-1."""
    out = np.full((found.shape[0], found.shape[1] - 1), -1, dtype=np.int64)
    for i, (row, qid) in enumerate(zip(found, qids)):
        kept = row[row != qid][: out.shape[1]]
        out[i, : len(kept)] = kept
    return out
