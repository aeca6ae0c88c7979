"""An index that outgrows RAM, simulated: sharded IVF-PQ build, merge, recall, latency, serving RSS.

The same FAISS path as ``lookalike index train-quantizer`` / ``build --shard`` / ``merge`` /
``serve --read-only`` of an ``--on-disk`` index, on synthetic vectors (no images, no SQLite):

1. **train**: ``auto`` under ``--max-ram`` picks the factory (:func:`index.ann.choose_factory`);
   :func:`index.shards.train_quantizer` trains it once on ``--train-sample`` vectors.
2. **add**: each of ``--shards`` shards fills a copy of the trained index with its vectors and
   writes it to disk (run one after the other here; a real build runs them in parallel, so the
   wall time of the add step is the slowest shard's: both are reported).
3. **merge**: :func:`index.shards.merge_ivf` (FAISS ``merge_from``) into one index file.
4. **tune**: the smallest nprobe reaching ``--recall-target`` on 1,000 tuning queries.
5. **measure**: recall@10 against exact search (a chunked brute-force scan) on 1,000 *other*
   queries; p50/p99 latency of 1 query and of 32 (1 FAISS thread, as the service searches);
   and the RSS of a serving process that loads the merged index with its lists in RAM, against
   one that memory-maps them (the ``--on-disk`` path), each after running the same queries.

Data: clustered unit vectors as in bench/bench_search.py (N/100 centres, spread 0.7: a point's
cosine to its centre ~0.82), generated chunk by chunk from seeds so the N x D matrix is never
held at once. Queries are fresh points of the same mixture.

    nice -n 19 python bench/bench_scale.py --n 10000000 --max-ram 1G      # the issue's size
    python bench/bench_scale.py --n 200000 --max-ram 16M                   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNK = 250_000


def centres(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((max(1, n // 100), d), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def chunk(c: np.ndarray, index: int, size: int, spread: float, seed: int) -> np.ndarray:
    """Chunk ``index`` of the collection: (size, D) float32 unit vectors, the same on every call."""
    rng = np.random.default_rng((seed, index))
    d = c.shape[1]
    v = c[rng.integers(0, len(c), size)] + (spread / np.sqrt(d)) * rng.standard_normal((size, d), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def chunks(n: int):
    for i, start in enumerate(range(0, n, CHUNK)):
        yield i, start, min(CHUNK, n - start)


def exact_truth(queries: np.ndarray, c: np.ndarray, n: int, spread: float, seed: int, k: int = 10) -> np.ndarray:
    """Exact top-k ids (rows) of each query over the whole collection, scanned chunk by chunk."""
    import faiss

    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for i, start, size in chunks(n):
        s, idx = faiss.knn(queries, chunk(c, i, size, spread, seed), k, metric=faiss.METRIC_INNER_PRODUCT)
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, idx + start], axis=1)
        top = np.argsort(-all_s, axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, top, axis=1)
        best_i = np.take_along_axis(all_i, top, axis=1)
    return best_i


def rss() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024  # MiB
    return out


def percentiles(ts: list[float]) -> dict:
    a = np.asarray(ts) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def serve_child(path: str, mmap: bool, queries_path: str, nprobe: int) -> dict:
    """A serving process: load the index (lists in RAM or memory-mapped), search, report RSS."""
    import faiss

    from index import ann

    base = rss()
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    t0 = time.perf_counter()
    index = faiss.read_index(path, flags)
    load_s = time.perf_counter() - t0
    loaded = rss()
    ann.set_params(index, {"nprobe": nprobe})
    ann.set_search_threads(1)
    q = np.load(queries_path)
    singles = []
    for i in range(len(q)):
        t = time.perf_counter()
        index.search(q[i:i + 1], 10)
        singles.append(time.perf_counter() - t)
    after = rss()
    return {"mmap": mmap, "load_s": round(load_s, 3), "rss_before_load_mib": round(base["VmRSS"], 1),
            "rss_mib": round(after["VmRSS"], 1), "rss_anon_mib": round(after["RssAnon"], 1),
            "rss_file_mib": round(after["RssFile"], 1),
            "index_rss_mib": round(after["VmRSS"] - base["VmRSS"], 1),
            "index_rss_after_load_mib": round(loaded["VmRSS"] - base["VmRSS"], 1),
            "index_anon_mib": round(after["RssAnon"] - base["RssAnon"], 1), "one_query": percentiles(singles[50:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--max-ram", default="1G", help="memory budget given to auto (e.g. 1G)")
    ap.add_argument("--factory", default="auto", help="override auto (e.g. IVF4096,PQ32)")
    ap.add_argument("--train-sample", type=int, default=200_000)
    ap.add_argument("--recall-target", type=float, default=0.9)
    ap.add_argument("--spread", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="FAISS threads for train/add/truth")
    ap.add_argument("--workdir", default=None, help="where the index files go (default: a temp dir, removed)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--serve-child", nargs=4, metavar=("INDEX", "MMAP", "QUERIES", "NPROBE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_child:
        path, mmap, qpath, nprobe = args.serve_child
        print(json.dumps(serve_child(path, mmap == "1", qpath, int(nprobe))))
        return

    import faiss

    from index import ann
    from index.shards import merge_ivf, train_quantizer
    from models.backends import cpu_info

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    n, d = args.n, args.dim
    budget = ann.parse_bytes(args.max_ram)
    factory = args.factory if args.factory != "auto" else ann.choose_factory("auto", n, d, max_ram=budget)
    c = centres(n, d, args.seed)
    res: dict = {"bench": "scale", "n": n, "dim": d, "shards": args.shards, "max_ram": args.max_ram,
                 "factory": factory, "cpu": cpu_info(), "python": platform.python_version(),
                 "faiss": faiss.__version__, "threads": args.threads, "load_avg_start": os.getloadavg()}
    print(json.dumps({"start": res}), flush=True)
    ann.set_search_threads(args.threads)
    seconds: dict[str, float] = {}

    # 1. train once, on a sample
    t0 = time.perf_counter()
    sample = np.concatenate([chunk(c, i, size, args.spread, args.seed) for i, _s, size in chunks(n)
                             if i * CHUNK < args.train_sample])[: args.train_sample]
    trained_path = work / "trained.faiss"
    train_quantizer(sample, factory, trained_path, fingerprint="bench", n_planned=n)
    ann.set_search_threads(args.threads)  # train_quantizer resets it to 1
    del sample
    seconds["train"] = time.perf_counter() - t0
    print(json.dumps({"train_s": round(seconds["train"], 1)}), flush=True)

    # 2. every shard fills a copy of the trained index (contiguous chunk ranges here) and writes it
    trained = faiss.read_index(str(trained_path))
    ids_of = list(chunks(n))
    per_shard = np.array_split(np.arange(len(ids_of)), args.shards)
    shard_s = []
    for s, mine in enumerate(per_shard):
        t = time.perf_counter()
        index = faiss.clone_index(trained)
        for i in mine:
            _i, start, size = ids_of[i]
            index.add_with_ids(chunk(c, i, size, args.spread, args.seed), np.arange(start, start + size))
        faiss.write_index(index, str(work / f"shard-{s}.faiss"))
        del index
        shard_s.append(time.perf_counter() - t)
        print(json.dumps({"shard": s, "add_s": round(shard_s[-1], 1)}), flush=True)
    seconds["add_sum"] = sum(shard_s)
    seconds["add_slowest_shard"] = max(shard_s)

    # 3. merge the inverted lists
    t = time.perf_counter()
    parts = [faiss.read_index(str(work / f"shard-{s}.faiss")) for s in range(args.shards)]
    merged = merge_ivf(trained, parts)
    del parts
    merged_path = work / "merged.faiss"
    faiss.write_index(merged, str(merged_path))
    seconds["merge"] = time.perf_counter() - t
    assert merged.ntotal == n

    # 4./5. queries, exact truth, tuning on one half, recall on the other
    qrng = np.random.default_rng((args.seed, 999))
    q = np.empty((2000, d), dtype=np.float32)
    v = c[qrng.integers(0, len(c), 2000)] + (args.spread / np.sqrt(d)) * qrng.standard_normal((2000, d), dtype=np.float32)
    q[:] = v / np.linalg.norm(v, axis=1, keepdims=True)
    t = time.perf_counter()
    truth = exact_truth(q, c, n, args.spread, args.seed)
    seconds["exact_truth"] = time.perf_counter() - t
    tune_q, test_q = q[:1000], q[1000:]
    curve = []
    nlist = ann.nlist_of(merged)
    chosen = nlist
    for nprobe in [p for p in ann._NPROBE_GRID if p < nlist] + [nlist]:
        ann.set_params(merged, {"nprobe": nprobe})
        _, found = merged.search(tune_q, 10)
        r = ann.recall_at(found, truth[:1000])
        curve.append((nprobe, round(r, 4)))
        print(json.dumps({"nprobe": nprobe, "tune_recall": round(r, 4)}), flush=True)
        if r >= args.recall_target + ann.TUNING_MARGIN:
            chosen = nprobe
            break
        if len(curve) >= 3 and r - curve[-3][1] < ann.PLATEAU_GAIN:
            chosen = curve[-3][0]
            break
    ann.set_params(merged, {"nprobe": chosen})
    _, found = merged.search(test_q, 10)
    recall = ann.recall_at(found, truth[1000:])

    ann.set_search_threads(1)
    singles, batches = [], []
    for i in range(1000):
        t = time.perf_counter()
        merged.search(test_q[i:i + 1], 10)
        singles.append(time.perf_counter() - t)
    for i in range(0, 1000 - 32, 32):
        t = time.perf_counter()
        merged.search(test_q[i:i + 32], 10)
        batches.append(time.perf_counter() - t)
    main_rss = rss()
    del merged, trained

    qpath = work / "queries.npy"
    np.save(qpath, test_q)
    serving = {}
    for mmap in (False, True):
        out = subprocess.run([sys.executable, __file__, "--serve-child", str(merged_path), "1" if mmap else "0",
                              str(qpath), str(chosen)], capture_output=True, text=True, check=True)
        serving["on_disk" if mmap else "in_ram"] = json.loads(out.stdout.strip().splitlines()[-1])
    disk = {p.name: p.stat().st_size for p in work.iterdir() if p.suffix == ".faiss"}
    res.update({
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "nprobe": chosen, "nlist": nlist, "tuning_curve": curve,
        "recall_at_10": round(recall, 4), "recall_queries": 1000,
        "latency_1_query": percentiles(singles[50:]), "latency_32_queries": percentiles(batches[2:]),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "main_rss_after_mib": round(main_rss["VmRSS"], 1),
        "disk_mib": {k: round(v / 2**20, 1) for k, v in disk.items()},
        "merged_index_mib": round(disk["merged.faiss"] / 2**20, 1),
        "serving": serving,
        "rss_ratio_on_disk_vs_in_ram": round(serving["on_disk"]["index_rss_mib"]
                                             / max(1e-9, serving["in_ram"]["index_rss_mib"]), 3),
        "private_rss_ratio_on_disk_vs_in_ram": round(serving["on_disk"]["index_anon_mib"]
                                                     / max(1e-9, serving["in_ram"]["index_anon_mib"]), 3),
        "load_avg_end": os.getloadavg(),
    })
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    print()
    print(f"| {n:,} x {d}, {factory}, {args.shards} shards | value |")
    print("|---|---|")
    for k, v in res["seconds"].items():
        print(f"| {k} (s) | {v} |")
    print(f"| recall@10 (1,000 queries, nprobe {chosen}) | {res['recall_at_10']} |")
    print(f"| 1 query p50 / p99 (ms) | {res['latency_1_query']['p50_ms']} / {res['latency_1_query']['p99_ms']} |")
    print(f"| 32 queries p50 / p99 (ms) | {res['latency_32_queries']['p50_ms']} / "
          f"{res['latency_32_queries']['p99_ms']} |")
    print(f"| peak RSS of the build (MiB) | {res['peak_rss_mib']} |")
    print(f"| disk: merged index / all files (MiB) | {res['merged_index_mib']} / "
          f"{round(sum(disk.values()) / 2**20, 1)} |")
    for name, s in serving.items():
        print(f"| serving {name}: index RSS after load / after 1,000 queries / of it private (MiB) | "
              f"{s['index_rss_after_load_mib']} / {s['index_rss_mib']} / {s['index_anon_mib']} |")
        print(f"| serving {name}: 1 query p50 / p99 (ms) | {s['one_query']['p50_ms']} / {s['one_query']['p99_ms']} |")
    print(f"| on-disk / in-RAM: index RSS after the queries | {res['rss_ratio_on_disk_vs_in_ram']} |")
    print(f"| on-disk / in-RAM: private (anonymous) index RSS | {res['private_rss_ratio_on_disk_vs_in_ram']} |")
    print(f"| load average start / end | {res['load_avg_start']} / {res['load_avg_end']} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
