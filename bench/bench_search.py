"""Search latency and recall@10: lookalike's exact (Flat) path and its auto-chosen ANN vs torch.

Baseline measured in the same run: ``torch.topk(q @ X.T, 10)`` on the same (N, D) float32
matrix (the physical reference for exact search in a torch process). Reported per size:

* torch matmul+topk (torch's default threads);
* lookalike exact: ``IndexIDMap2(IndexFlatIP)`` as the store holds it and searches it (up to
  ``SEQUENTIAL_MAX_QUERIES`` queries by the sequential scan, more through BLAS:
  :func:`index.ann.route_exact_search`), 1 FAISS thread per call (the store's default) and 2 threads;
* the same Flat through BLAS for every batch (the store's routing before), and at FAISS's default
  BLAS threshold (128000: sequential up to 127999 / D queries), to show what the routing buys;
* ``--blas-paths``: the sequential scan and BLAS at 1, 2, 4, 8 and 16 queries, 1 thread (the
  measurement behind the routing);
* lookalike ANN: the factory ``auto`` picks above the exact bound (``IVF{~sqrt N},Flat``), built by
  :func:`index.ann.build` (trained without, and tuned on, 1,000 held-out collection vectors to the
  recall target), searched with 1 thread.

Data: clustered synthetic unit vectors (D=128 by default), like embeddings of many classes:
N/100 random unit centres (``--points-per-cluster`` 100, i.e. 1,000 clusters at 100k, 10,000
at 1M), each point = centre + N(0, spread^2 / D) per coordinate, renormalised. Default spread
0.7: a point's cosine to its centre is ~0.82, two points of a cluster ~0.67, unrelated points
~0 +- 0.09 (like a trained metric-learning embedding). ``--spread 1.0`` is a harder, more
diffuse variant (cluster pairs ~0.5) where IVF needs far more probes; uniform data would be
harder still. Queries are 1,000 fresh points from the same mixture, not in the collection.
Recall@10 is against exact search on the same data.

    python bench/bench_search.py                    # 100k and 1M (~3-4 min on 2 cores)
    python bench/bench_search.py --sizes 100000     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def clustered(rng: np.random.Generator, n: int, d: int, centres: np.ndarray, spread: float) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        v = centres[rng.integers(0, len(centres), m)] + (spread / np.sqrt(d)) * rng.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def latency(search, queries: np.ndarray, reps1: int, reps32: int) -> tuple[float, float]:
    singles = [queries[i:i + 1] for i in range(reps1)]
    it = iter(range(10**9))
    t1 = timed(lambda: search(singles[next(it) % reps1]), reps1)
    t32 = timed(lambda: search(queries[:32]), reps32)
    return t1, t32


def recall(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def run_size(n: int, args, rng: np.random.Generator) -> dict:
    import faiss
    import torch

    from index import ann

    d = args.dim
    n_clusters = max(1, n // args.points_per_cluster)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    base = clustered(rng, n, d, centres, args.spread)
    queries = clustered(rng, 1000, d, centres, args.spread)
    ids = np.arange(n, dtype=np.int64) * 2 + 1  # non-contiguous ids, as after deletions
    gen_s = time.perf_counter() - t0
    res: dict = {"n": n, "dim": d, "clusters": n_clusters, "data_seconds": round(gen_s, 2)}

    # torch reference (torch's default threads), first: we are "a torch process" from here on
    xt = torch.from_numpy(base)
    res["torch_threads"] = torch.get_num_threads()

    def torch_search(q):
        return torch.topk(torch.from_numpy(q) @ xt.T, 10, dim=1)

    res["torch_ms"] = latency(torch_search, queries, args.reps1, args.reps32)
    truth_rows = np.concatenate([torch_search(queries[s:s + 100]).indices.numpy() for s in range(0, 1000, 100)])
    truth = ids[truth_rows]

    flat = ann.empty_index("Flat", d)
    flat.add_with_ids(base, ids)

    def flat_search(threads, threshold=None):
        def f(q):
            ann.set_search_threads(threads)
            if threshold is None:
                ann.route_exact_search(d)  # as IndexStore searches
            else:
                faiss.cvar.distance_compute_blas_threshold = threshold
            return flat.search(q, 10)
        return f

    res["flat_1t_ms"] = latency(flat_search(1), queries, args.reps1, args.reps32)
    few1, few32 = max(3, args.reps1 // 5), max(2, args.reps32 // 3)  # context rows, often slow
    res["flat_2t_ms"] = latency(flat_search(2), queries, few1, few32)
    res["flat_blas_always_1t_ms"] = latency(flat_search(1, 1), queries, args.reps1, args.reps32)
    res["flat_default_blas_2t_ms"] = latency(flat_search(2, 128000), queries, few1, few32)
    if args.blas_paths:
        res["paths_1t_ms"] = {
            nq: {"sequential": timed(lambda: flat_search(1, 2**31 - 1)(queries[:nq]), args.reps32),
                 "blas": timed(lambda: flat_search(1, 1)(queries[:nq]), args.reps32)}
            for nq in (1, 2, 4, 8, 16)}
    ann.route_exact_search(d)
    ann.set_search_threads(1)
    _, found = flat.search(queries, 10)
    res["flat_recall_at_10"] = recall(found, truth)
    del flat

    factory = ann.ann_factory(n)
    res["auto_choice"] = ann.choose_factory("auto", n, d)
    t0 = time.perf_counter()
    ivf, tuning = ann.build(factory, base, ids, recall_target=args.recall_target, threads=os.cpu_count())
    res["ann"] = {"factory": factory, "build_seconds": round(time.perf_counter() - t0, 1), "params": tuning.params,
                  "tuned_recall_at_10": tuning.recall_at_10, "tuning_curve": tuning.curve}

    def ivf_search(q):
        ann.set_search_threads(1)
        return ivf.search(q, 10)

    res["ann_1t_ms"] = latency(ivf_search, queries, args.reps1, args.reps32)
    _, found = ivf_search(queries)
    res["ann_recall_at_10"] = recall(found, truth)
    res["exact_vs_torch"] = [round(a / b, 2) for a, b in zip(res["flat_1t_ms"], res["torch_ms"])]
    res["best_exact_vs_torch"] = [round(min(a, b) / c, 2) for a, b, c in
                                  zip(res["flat_1t_ms"], res["flat_2t_ms"], res["torch_ms"])]
    res["ann_speedup_vs_flat"] = [round(b / a, 1) for a, b in zip(res["ann_1t_ms"], res["flat_1t_ms"])]
    return res


def table(results: list[dict]) -> str:
    lines = [f"{'N':>9}  {'method':<44} {'1 query ms':>10} {'32 queries ms':>13} {'recall@10':>9}"]
    for r in results:
        rows = [
            (f"torch matmul+topk ({r['torch_threads']} threads) [baseline]", r["torch_ms"], 1.0),
            ("lookalike exact Flat, 1 thread (default)", r["flat_1t_ms"], r["flat_recall_at_10"]),
            ("lookalike exact Flat, 2 threads", r["flat_2t_ms"], r["flat_recall_at_10"]),
            ("Flat, BLAS from 1 query (before), 1 thr", r["flat_blas_always_1t_ms"], r["flat_recall_at_10"]),
            ("Flat, faiss default BLAS threshold, 2 thr", r["flat_default_blas_2t_ms"], r["flat_recall_at_10"]),
            (f"ANN {r['ann']['factory']} nprobe={r['ann']['params'].get('nprobe')}, 1 thr",
             r["ann_1t_ms"], r["ann_recall_at_10"]),
        ]
        for name, (t1, t32), rec in rows:
            lines.append(f"{r['n']:>9}  {name:<44} {t1:>10.2f} {t32:>13.2f} {rec:>9.4f}")
        lines.append(f"{'':>9}  exact/torch (1 thr): {r['exact_vs_torch']}  best exact/torch: "
                     f"{r['best_exact_vs_torch']}  ANN speed-up vs exact: {r['ann_speedup_vs_flat']}  "
                     f"auto picks: {r['auto_choice']}")
        if "paths_1t_ms" in r:
            lines.append(f"{'':>9}  sequential / BLAS ms by queries (1 thr): " + "  ".join(
                f"{nq}: {p['sequential']:.2f} / {p['blas']:.2f}" for nq, p in r["paths_1t_ms"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated collection sizes")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--points-per-cluster", type=int, default=100, help="clusters = N / this")
    p.add_argument("--spread", type=float, default=0.7)
    p.add_argument("--recall-target", type=float, default=0.95)
    p.add_argument("--reps1", type=int, default=30, help="single-query repetitions (median)")
    p.add_argument("--reps32", type=int, default=7, help="32-query batch repetitions (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blas-paths", action="store_true",
                   help="also time FAISS's sequential scan and BLAS path at 1-16 queries")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    import faiss
    import torch

    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        results.append(run_size(n, args, rng))
    from models.backends import cpu_info, cpu_summary

    out = {"benchmark": "search", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                              "cpu": cpu_info(), "load_avg_end": os.getloadavg()},
           "faiss": faiss.__version__, "torch": torch.__version__,
           "data": {"kind": "clustered unit vectors", "points_per_cluster": args.points_per_cluster, "spread": args.spread,
                    "queries": "1000 fresh points of the same mixture"},
           "results": results}
    print(json.dumps(out, indent=2))
    print()
    print(f"CPU: {cpu_summary(out['machine']['cpu'])}; load avg {os.getloadavg()[0]:.1f}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
