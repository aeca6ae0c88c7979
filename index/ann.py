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

Below that bound ``auto`` is ANN only where it measures as good as exact, at a fraction of the
scan: from N * D >= :data:`EARLY_ANN_MIN_ELEMENTS` (2**23 floats = 32 MiB, 6,554 vectors at
D=1280, 65,536 at D=128) the store builds ``IVF{nlist},Flat`` on its own vectors and keeps it when
tuning reaches recall@10 >= :data:`EARLY_ANN_RECALL` (or the store's higher target) while probing
at most :data:`EARLY_ANN_MAX_PROBE_SHARE` of the lists (1/4); otherwise it stays exact, and tries again
once the collection has doubled (:func:`early_ann_candidate`, :func:`passes_early_gate`).
Well-separated clusters pass; uniform random vectors, where IVF must probe most lists, do not,
and neither did zero-shot Lite0 embeddings of cub100 (0.998 needed 24 of 64 lists).

Under a memory budget (``max_ram``, ``lookalike index build --max-ram``) ``auto`` takes the first
structure whose estimated size (:func:`index_bytes`) fits: Flat, ``IVF,Flat``, ``IVF,SQ8``, then
IVF-PQ with the longest code that fits (:func:`pq_factory`, OPQ from 8 dimensions per
sub-quantizer). Compressed codes cap recall, so tuning stops where more probes stop paying.
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
#: From this many stored floats (N * D) up to FLAT_MAX_ELEMENTS, ``auto`` tries an IVF index and
#: keeps it only if it passes :func:`passes_early_gate`. A one-query Flat scan of 2**23 floats
#: took ~3 ms on one core here (docs/design.md, "Index: measured ANN below the exact bound").
EARLY_ANN_MIN_ELEMENTS = 2**23
#: Recall@10 (held-out, against exact search) an IVF index must reach to replace an exact one.
EARLY_ANN_RECALL = 0.99
#: ...while probing at most this share of its lists (so a search scans ~1/4 of the vectors or less).
EARLY_ANN_MAX_PROBE_SHARE = 1 / 4
#: Queries sampled from the collection to tune and measure recall@10.
TUNING_QUERIES = 1000
#: Safety margin over the target when tuning, so fresh queries also meet the target.
TUNING_MARGIN = 0.005
METRIC = faiss.METRIC_INNER_PRODUCT
METRIC_NAME = "inner_product"
#: Compressed codes: stop raising nprobe once two more steps gained less recall@10 than this.
PLATEAU_GAIN = 0.002
_NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
                1536, 2048, 3072, 4096, 8192, 16384, 32768, 65536)

#: Exact (Flat) searches of at most this many queries take FAISS's sequential scan, larger
#: batches its BLAS path (see :func:`route_exact_search`).
SEQUENTIAL_MAX_QUERIES = 2

# FAISS scans sequentially while (queries x D) < this threshold, else it calls BLAS; its
# default, 128000, sends up to 99 queries at D=1280 (999 at D=128) to the sequential scan,
# ~7x slower than BLAS for 32 queries here (docs/design.md, "Index"). Searches through
# IndexStore set it per call (route_exact_search); other callers get BLAS from 1 query.
faiss.cvar.distance_compute_blas_threshold = 20


def faiss_version() -> str:
    return faiss.__version__


def route_exact_search(dim: int) -> None:
    """Route the next exact searches of ``dim``-dimensional vectors: at most
    :data:`SEQUENTIAL_MAX_QUERIES` queries take FAISS's sequential scan, more take BLAS.

    Measured (``bench/bench_search.py --blas-paths``, 1 FAISS thread): one query over
    20k x 1280 took 4.3 ms sequentially against 9.3 ms through BLAS (100k x 128: 2.0 vs 3.5 ms);
    the two are even at 2 queries and BLAS wins from 4 (8 queries: 10.4 vs 28 ms). The
    threshold is one process-wide FAISS setting, so two threads searching indexes of different
    dimensions at once can send a search down the slower path (speed only, never results).
    """
    faiss.cvar.distance_compute_blas_threshold = SEQUENTIAL_MAX_QUERIES * int(dim) + 1


_BLAS: list = []  # the threadpoolctl controller, built on first use (it inspects loaded libraries)


def flat_rows(index: faiss.Index) -> tuple[np.ndarray, np.ndarray] | None:
    """Zero-copy views of an ``IndexIDMap2(IndexFlatIP)``'s stored rows and ids:
    ((N, D) float32, (N,) int64), or None for any other index. Valid until the index is written
    (read them under the store's read lock)."""
    if not isinstance(index, faiss.IndexIDMap2) or index.ntotal == 0:
        return None
    flat = faiss.downcast_index(index.index)
    if not isinstance(flat, faiss.IndexFlatIP):
        return None
    n, d = int(index.ntotal), int(index.d)
    rows = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    ids = faiss.rev_swig_ptr(index.id_map.data(), n)
    return rows, ids


def lone_exact_search(rows: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int,
                      threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of one query over a Flat index's ``rows`` on ``threads`` cores: one BLAS
    matrix-vector product (numpy's BLAS, limited to ``threads`` with threadpoolctl), then the
    top ``k`` by score. (1, D) query -> ((1, k) float32 scores, (1, k) int64 ids), best first.

    FAISS scans one query on one thread whatever its thread count (1.15.1: 4.3-5.0 ms over
    20k x 1280 here, with 2 threads too); the product on 2 threads took 1.8 ms. The service uses
    it for a lone query when a core is free (:class:`service.batching.ThreadPolicy`). numpy's
    OpenBLAS workers spin ~0.1 s of CPU after each call unless ``OPENBLAS_THREAD_TIMEOUT`` is
    low, which ``python -m service`` sets before numpy loads.
    """
    controller, which = _numpy_blas()
    with controller.limit(limits={which: max(1, int(threads))}):
        scores = rows @ q[0]
    return _top_k(scores[None, :], ids, k)


#: Exact searches of 2 to this many queries on one thread take :func:`blocked_exact_search`
#: (from 4 queries FAISS's BLAS path is as fast, from 8 faster).
BLOCKED_MAX_QUERIES = 3
#: Rows per block of :func:`blocked_exact_search`, in bytes: small enough to stay in cache while
#: every query of the batch reads them (2 MiB = 409 rows at D=1280).
BLOCK_BYTES = 2**21


def blocked_exact_search(rows: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of a small batch over a Flat index's ``rows``, reading the rows once.

    The rows stream through in blocks of :data:`BLOCK_BYTES`; each block, while in cache, is
    multiplied by every query (one BLAS matrix-vector product each, numpy's BLAS on one thread).
    FAISS's sequential scan reads all rows once per query, and its BLAS path (like a BLAS
    matrix product) costs about two passes for a few queries: over 20k x 1280 on one core of
    an AVX2 AMD EPYC (Zen 3), 2 queries took 13.1 ms against FAISS's 17.7, 3 took 14.1 against
    22.5; from 4 queries FAISS is as fast (docs/design.md, "Index"). (Q, D) float32 unit queries
    -> ((Q, k) float32 scores, (Q, k) int64 ids), best first.
    """
    n, d = rows.shape
    scores = np.empty((len(q), n), dtype=np.float32)
    step = max(64, BLOCK_BYTES // (4 * d))
    controller, which = _numpy_blas()
    with controller.limit(limits={which: 1}):
        for start in range(0, n, step):
            block = rows[start:start + step]
            for i, qv in enumerate(q):
                np.dot(block, qv, out=scores[i, start:start + step])
    return _top_k(scores, ids, k)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of each row of (Q, N) ``scores`` -> ((Q, k) scores, (Q, k) ids of ``ids``), best first."""
    k = min(int(k), scores.shape[1])
    top = (np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1]
           else np.broadcast_to(np.arange(scores.shape[1]), scores.shape))
    picked = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    return np.take_along_axis(picked, order, axis=1), ids[top]


def _numpy_blas() -> tuple:
    """(threadpoolctl controller, the key that limits numpy's own BLAS): the library under
    numpy's wheel directory (faiss-cpu ships a second OpenBLAS, left alone), else every BLAS."""
    if not _BLAS:
        from threadpoolctl import ThreadpoolController

        controller = ThreadpoolController()
        mine = [c.prefix for c in controller.lib_controllers
                if c.user_api == "blas" and "numpy" in os.path.basename(os.path.dirname(c.filepath))]
        _BLAS.append((controller, mine[0] if mine else "blas"))
    return _BLAS[0]


#: Extra candidates an exact search fetches before :func:`rank_exact` rescores and cuts them.
RESCORE_MARGIN = 8


def rank_exact(index: faiss.Index, q: np.ndarray, ids: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """One score and one order for an exact search, whichever path found the candidates.

    FAISS's sequential scan, its BLAS path and :func:`lone_exact_search` sum a dot product in
    different orders, so the same query's scores differed by ~6e-8 between a lone request and
    one micro-batched with others, and near-ties could swap: pages fetched separately must
    concatenate to the top-k. Each candidate (``ids``: (Q, K) int64, -1 = none; K includes
    :data:`RESCORE_MARGIN` extra) is rescored from its stored vector in float64, then ranked by
    score, ties by id, and cut to ``keep``. -> ((Q, keep) float32 scores, (Q, keep) int64 ids),
    -1 / -inf padded.
    """
    out_s = np.full((len(q), keep), -np.inf, dtype=np.float32)
    out_i = np.full((len(q), keep), -1, dtype=np.int64)
    for r, (qv, row) in enumerate(zip(q, ids)):
        row = row[row >= 0]
        if len(row) == 0:
            continue
        vecs = index.reconstruct_batch(row).astype(np.float64)
        scores = (vecs * qv.astype(np.float64)).sum(axis=1).astype(np.float32)
        order = np.lexsort((row, -scores))[:keep]
        out_s[r, :len(order)], out_i[r, :len(order)] = scores[order], row[order]
    return out_s, out_i


def warm_lone_search() -> None:
    """Load what :func:`lone_exact_search` needs (~3 ms once), so no user's query pays it."""
    _numpy_blas()


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


def choose_factory(requested: str, n: int, dim: int, *, max_ram: int | None = None) -> str:
    """Concrete factory for ``n`` vectors of dimension ``dim`` (resolves ``auto``).

    ``max_ram``: bytes the FAISS index may take in RAM (None: no budget). Under a budget,
    ``auto`` takes the first structure that fits: Flat (while small), ``IVF,Flat`` (4 bytes a
    dimension), ``IVF,SQ8`` (1 byte a dimension), then IVF-PQ with the most bytes per vector
    that fit (see :func:`pq_factory`).
    """
    if requested != "auto":
        return requested
    if n * dim <= FLAT_MAX_ELEMENTS and (max_ram is None or index_bytes("Flat", n, dim) <= max_ram):
        return "Flat"
    factory = ann_factory(n)
    if max_ram is None or index_bytes(factory, n, dim) <= max_ram:
        return factory
    sq8 = f"IVF{nlist_for(n)},SQ8"
    if index_bytes(sq8, n, dim) <= max_ram:
        return sq8
    return pq_factory(n, dim, max_ram)


def early_ann_candidate(n: int, dim: int, *, max_ram: int | None = None) -> str | None:
    """The IVF factory ``auto`` tries for ``n`` x ``dim`` vectors below the exact bound, or None
    outside [:data:`EARLY_ANN_MIN_ELEMENTS`, :data:`FLAT_MAX_ELEMENTS`] (or when it would not fit
    ``max_ram``). Whether it is kept is measured: :func:`passes_early_gate`."""
    if not EARLY_ANN_MIN_ELEMENTS <= n * dim <= FLAT_MAX_ELEMENTS:
        return None
    factory = ann_factory(n)
    if max_ram is not None and index_bytes(factory, n, dim) > max_ram:
        return None
    return factory


def early_ann_target(recall_target: float) -> float:
    """Recall@10 an early IVF index is tuned to: the store's target, at least :data:`EARLY_ANN_RECALL`."""
    return max(float(recall_target), EARLY_ANN_RECALL)


def early_ann_max_nprobe(nlist: int) -> int:
    """Most lists an early IVF index may probe: :data:`EARLY_ANN_MAX_PROBE_SHARE` of ``nlist``."""
    return max(1, int(nlist * EARLY_ANN_MAX_PROBE_SHARE))


def passes_early_gate(index: faiss.Index, tuning: "Tuning", recall_target: float) -> bool:
    """Whether an IVF index tuned below the exact bound replaces exact search: its held-out
    recall@10 reached :func:`early_ann_target` (with the tuning margin) at an ``nprobe`` of at
    most :func:`early_ann_max_nprobe` of its lists."""
    nlist = nlist_of(index)
    if nlist is None or not tuning.n_queries:
        return False
    nprobe = int(tuning.params.get("nprobe", nlist))
    need = min(1.0, early_ann_target(recall_target) + TUNING_MARGIN)
    return tuning.recall_at_10 >= need and nprobe <= early_ann_max_nprobe(nlist)


#: Bytes per vector of bookkeeping besides its code: the int64 id in its inverted list.
_ID_BYTES = 8
#: Smallest PQ code ``auto`` uses; below it recall@10 collapses (see bench/bench_scale.py).
PQ_MIN_BYTES = 8


def pq_factory(n: int, dim: int, max_ram: int) -> str:
    """The IVF-PQ factory for ``n`` x ``dim`` vectors whose index fits ``max_ram`` bytes.

    The PQ code takes ``m`` bytes per vector (8-bit sub-quantizers, ``m`` divides ``dim``): the
    largest ``m <= dim / 2`` that fits. OPQ (a learned rotation before PQ) is added when each
    sub-quantizer codes 8 or more dimensions. At 200k x 128 (README, Scaling) OPQ32 (4
    dimensions each) raised recall@10 only from 0.499 to 0.505, for 3.6x the training time;
    a one-off check saw OPQ16 (8 each) raise it from 0.431 to 0.465.

    Raises:
        ValueError: even the smallest code does not fit; names the budget and the minimum.
    """
    nlist = nlist_for(n)
    fixed = nlist * dim * 4 + 256 * dim * 4 + dim * dim * 4  # coarse centroids, PQ codebooks, OPQ rotation
    per_vector = (max_ram - fixed) / max(1, n) - _ID_BYTES
    fitting = [m for m in range(dim // 2, PQ_MIN_BYTES - 1, -1) if dim % m == 0 and m <= per_vector]
    if not fitting:
        need = index_bytes(f"IVF{nlist},PQ{_smallest_pq(dim)}", n, dim)
        raise ValueError(f"max_ram {max_ram / 2**20:.0f} MiB is too small for {n} vectors of dimension {dim}: "
                         f"the smallest PQ code needs about {need / 2**20:.0f} MiB")
    m = fitting[0]
    ivfpq = f"IVF{nlist},PQ{m}"
    return f"OPQ{m},{ivfpq}" if dim // m >= 8 else ivfpq


def _smallest_pq(dim: int) -> int:
    return next((m for m in range(PQ_MIN_BYTES, dim + 1) if dim % m == 0), dim)


def index_bytes(factory: str, n: int, dim: int) -> int:
    """Estimated RAM in bytes of a FAISS index of ``n`` vectors (``Flat`` or ``[OPQm,]IVFk,{Flat|PQm|SQ8}``)."""
    if factory == "Flat":
        return n * (dim * 4 + 3 * _ID_BYTES)  # the floats, the id array and the id -> row map
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", factory)) else nlist_for(n)
    code, codebook = dim * 4, 0
    if pq := re.search(r",PQ(\d+)(?:x(\d+))?", factory):
        bits = int(pq.group(2) or 8)
        code, codebook = math.ceil(int(pq.group(1)) * bits / 8), 2**bits * dim * 4
    elif "SQ8" in factory:
        code = dim
    opq = dim * dim * 4 if factory.startswith("OPQ") else 0
    return n * (code + _ID_BYTES) + nlist * dim * 4 + codebook + opq


def parse_bytes(text: str) -> int:
    """``'8G'``, ``'512M'``, ``'1.5GiB'``, ``'1000000'`` -> bytes (binary units).

    Raises:
        ValueError: naming the text and the accepted form.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"memory size {text!r} not understood; write e.g. 512M, 8G or 1.5GiB")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if value < 1:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value)


def ann_factory(n: int) -> str:
    """The ANN factory ``auto`` picks above the exact bound: ``IVF{nlist},Flat``."""
    return f"IVF{nlist_for(n)},Flat"


def empty_index(factory: str, dim: int) -> faiss.Index:
    """An untrained/empty index for a concrete factory (``Flat`` or an IVF string)."""
    if factory == "Flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index = faiss.index_factory(dim, factory, METRIC)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):
        # FAISS trains polysemous codes by default: most of the training time (measured ~3x
        # here), for a Hamming-filtered search that is never used (polysemous_ht stays 0)
        ivf.do_polysemous_training = False
    return index


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
          recall_target: float = 0.95, threads: int | None = None,
          trained: faiss.Index | None = None, max_nprobe: int | None = None) -> tuple[faiss.Index, Tuning]:
    """Build a concrete index over (N, D) float32 unit ``vectors`` with int64 ``ids``.

    IVF: trains on a sample that excludes the tuning queries, adds everything, then tunes.
    ``trained``: an empty, trained index (e.g. the coarse quantizer and PQ trained once for
    every shard, :mod:`index.shards`); a copy of it is filled instead of training.
    ``max_nprobe``: tuning stops there even below the target (:func:`tune`).
    Returns the index and its :class:`Tuning` (recall 1.0 for Flat).
    """
    if trained is not None:
        return _build_from_trained(trained, vectors, ids, rng=rng or np.random.default_rng(0),
                                   recall_target=recall_target, threads=threads, max_nprobe=max_nprobe)
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
        tuning = tune(index, vectors, ids, q_rows, recall_target=recall_target, max_nprobe=max_nprobe)
        return index, tuning
    finally:
        set_search_threads(1)


def _build_from_trained(trained: faiss.Index, vectors: np.ndarray, ids: np.ndarray, *, rng: np.random.Generator,
                        recall_target: float, threads: int | None,
                        max_nprobe: int | None = None) -> tuple[faiss.Index, Tuning]:
    if not trained.is_trained or trained.ntotal:
        raise ValueError("the trained index must be trained and empty")
    set_search_threads(threads or os.cpu_count() or 1)
    try:
        index = faiss.clone_index(trained)
        if len(ids):
            index.add_with_ids(vectors, ids)
        q_rows = rng.permutation(len(ids))[: min(TUNING_QUERIES, len(ids) // 10)]
        return index, tune(index, vectors, ids, q_rows, recall_target=recall_target, max_nprobe=max_nprobe)
    finally:
        set_search_threads(1)


def is_lossy(index: faiss.Index) -> bool:
    """True for IVF indexes whose codes are compressed (PQ, SQ): their recall saturates below 1."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)


def tune(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, q_rows: np.ndarray, *,
         recall_target: float, max_nprobe: int | None = None) -> Tuning:
    """Pick the smallest nprobe whose recall@10 on the held-out queries reaches the target.

    ``max_nprobe``: probe no more lists than this; if the target is not reached by then, the
    largest tried is chosen and its (lower) recall reported.

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
    lossy = is_lossy(index)
    top = min(nlist, max_nprobe) if max_nprobe else nlist
    for nprobe in [p for p in _NPROBE_GRID if p < top] + [top]:
        set_params(index, {"nprobe": nprobe})
        _, found = index.search(q, min(k, n))
        r = recall_at(_drop_self(found, qids), truth)
        curve.append((nprobe, round(r, 4)))
        if r >= min(1.0, recall_target + TUNING_MARGIN) or nprobe >= top:
            chosen = (nprobe, r)
            break
        if lossy and len(curve) >= 3 and r - curve[-3][1] < PLATEAU_GAIN:
            # compressed codes cap recall: probing more lists costs time and gains nothing
            chosen = curve[-3]
            log.warning("recall@10 saturates at %.4f with %s codes, below the target %.3f; a larger "
                        "memory budget (a longer code) raises it", r, type(faiss.downcast_index(
                            faiss.extract_index_ivf(index))).__name__, recall_target)
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
