"""Load test of the real service on 127.0.0.1, against baselines measured in the same run.

Servers (separate uvicorn processes, all started up front, measured in interleaved rounds so a
change of load on this shared machine hits every configuration alike):

* ``service``         — ``lookalike serve`` as shipped: decode pool, one dedicated inference
                        thread, micro-batching (``--max-batch``, ``--batch-wait-ms``), search thread;
* ``service-nobatch`` — the same with ``max_batch=1`` (no micro-batching);
* ``service[b]``      — the service on another backend (``--also-backends onnx``), to pick the default;
* ``naive``, ``naive[1 thr]`` — :mod:`bench.naive_server`: decode + embed + search inline in an
                        ``async def`` handler, with library-default threads and with 1 thread
                        (``--naive-threads``); ``naive /empty`` only reads the upload: the floor
                        cost of HTTP + multipart.

Client: ``concurrency`` keep-alive connections sharing a fixed number of requests (the same
query bodies, encoded once), after a warm-up; a minimal asyncio HTTP/1.1 client by default
(``--client httpx`` for ``httpx.AsyncClient``, which adds ~1 ms of client time per request
here). A server's share of a round stops after ``--cell-seconds`` (a collapsed server does
fewer requests; the count is printed). Per server and concurrency (1 and 8): p50/p95/p99, QPS,
and the service's own stage timings read from its /metrics.

Baselines in the same run, same images, model and index:

* in-process decode + preprocess + embed (batch 1) + search, one image at a time, in its own
  process with the service's thread counts (1 torch / ONNX Runtime thread, 1 FAISS thread);
* backends in-process: torch fp32, torch bf16 autocast (when the CPU has it), ONNX Runtime, at
  batch 1 and 8.

Targets: HTTP + framework overhead of ``service`` at concurrency 1 (p50 minus in-process p50)
<= 15% of the in-process time (also given on the same requests: client mean minus the
service's decode + forward + search); ``service`` QPS at concurrency 8 >= 1.6x the best naive.

Model: an untrained seeded resnet18 (timing does not depend on training) at ``--image-size``
over ``--index-size`` synthetic unit vectors plus the query images. Queries: cub100 images.

    python bench/bench_service.py                         # 100k vectors, 150 requests/level (~2 min)
    python bench/bench_service.py --also-backends onnx    # + the service on ONNX Runtime (~3 min)
    python bench/bench_service.py --quick                 # 10k vectors (~40 s)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------- fixture
def build_fixture(work: Path, args) -> tuple[Path, Path, list[Path]]:
    """Model (+ONNX export) and index under ``work``, reused when the config matches."""
    import hashlib

    import torch

    from index import IndexStore
    from models import ModelCard, decode_image, load_card, save_model
    from models.backends import TorchBackend
    from models.export import export_onnx
    from models.net import EmbeddingNet

    cub = Path(args.cub100)
    files = sorted((cub / "images").rglob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{cub}: no cub100 images (set --cub100 or LOOKALIKE_CUB100)")
    rng = np.random.default_rng(0)
    queries = [files[i] for i in sorted(rng.choice(len(files), size=min(args.images, len(files)), replace=False))]

    if args.pretrained:  # a zero-shot model: the default recipe's architecture, size and D
        from models.net import zero_shot_model

        probe = zero_shot_model(args.pretrained, weights="DEFAULT").card
        args.image_size, args.dim = probe.image_size, probe.embedding_dim
    key = json.dumps({"pretrained": args.pretrained, "size": args.image_size, "dim": args.dim, "n": args.index_size,
                      "factory": args.factory,
                      "q": [str(q) for q in queries]}, sort_keys=True)
    stamp = work / "fixture.json"
    model_dir, index_dir = work / "model", work / "index"
    if stamp.is_file() and stamp.read_text() == key:
        return model_dir, index_dir, queries
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.rmtree(index_dir, ignore_errors=True)
    torch.manual_seed(0)
    resize = int(round(args.image_size / 0.875))
    if args.pretrained:
        from models.net import zero_shot_model

        save_model(zero_shot_model(args.pretrained, weights="DEFAULT"), model_dir)
    else:
        save_model(EmbeddingNet(ModelCard(backbone="resnet18", embedding_dim=args.dim, image_size=args.image_size,
                                          resize_size=resize)), model_dir)
    export_onnx(model_dir)
    card = load_card(model_dir)
    backend = TorchBackend(model_dir, bf16=False)
    qvec = backend.embed_images([decode_image(p, draft_size=backend.preprocess.draft_size()) for p in queries])
    store = IndexStore.create(index_dir, card=card, images_root=cub / "images", factory=args.factory)
    root = cub / "images"
    store.add(qvec, [{"path": p.relative_to(root).as_posix(), "label": p.parent.name,
                      "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                      "mtime": p.stat().st_mtime, "source": "folder"} for p in queries])
    n = args.index_size
    block = 20_000
    for start in range(0, n, block):
        m = min(block, n - start)
        v = rng.standard_normal((m, args.dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        store.add(v, [{"path": f"synthetic/{start + i}.jpg", "label": None, "sha256": f"{start + i:064x}",
                       "size": 0, "mtime": 0.0, "source": "folder"} for i in range(m)])
    store.checkpoint()
    store.close()
    stamp.write_text(key)
    return model_dir, index_dir, queries


# ---------------------------------------------------------------------------------- in-process
def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


class InProcess:
    """decode + preprocess + embed (batch 1) + search per image, sequentially, with the service's
    thread counts (1 torch / ONNX Runtime thread, 1 FAISS thread). ``run_round`` measures one
    pass over the images so it can be interleaved with the server measurements."""

    STAGES = ("decode+preprocess", "embed", "search", "total")

    def __init__(self, model_dir: Path, index_dir: Path, queries: list[Path], backend_name: str) -> None:
        import faiss
        import torch

        from index import IndexStore
        from models.backends import load_backend

        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        self.backend = load_backend(model_dir, backend_name, **({"threads": 1} if backend_name == "onnx" else {}))
        self.store = IndexStore.open(index_dir, card=self.backend.card)
        self.datas = [q.read_bytes() for q in queries]
        self.times: dict[str, list[float]] = {k: [] for k in self.STAGES}
        self.run_round(record=False)  # warm-up

    def run_round(self, record: bool = True) -> None:
        from models import decode_image

        draft = self.backend.preprocess.draft_size()
        for data in self.datas:
            t0 = time.perf_counter()
            x = self.backend.preprocess(decode_image(data, draft_size=draft))[None]
            t1 = time.perf_counter()
            v = self.backend.embed_array(x)
            t2 = time.perf_counter()
            self.store.search(v, 10)
            t3 = time.perf_counter()
            if record:
                for k, dt in zip(self.STAGES, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    self.times[k].append(dt)

    def report(self) -> dict:
        out = {k: {"p50_ms": pct(v, 50), "mean_ms": float(np.mean(v) * 1000)} for k, v in self.times.items()}
        total = out["total"]["mean_ms"]
        for k in self.STAGES[:3]:
            out[k]["share"] = out[k]["mean_ms"] / total
        out["backend"] = self.backend.name + (" bf16" if getattr(self.backend, "bf16", False) else "")
        out["samples"] = len(self.times["total"])
        return out

    def close(self) -> None:
        self.store.close()


class InProcessWorker:
    """:class:`InProcess` in its own Python process (like a server process, minus HTTP), driven
    over stdin/stdout, so the client's own state does not colour the baseline."""

    def __init__(self, model_dir: Path, index_dir: Path, queries: list[Path], backend_name: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        args = json.dumps({"model": str(model_dir), "index": str(index_dir), "queries": [str(q) for q in queries],
                           "backend": backend_name})
        self.proc = subprocess.Popen([sys.executable, __file__, "--_inprocess-worker", args], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, what: str) -> str:
        line = self.proc.stdout.readline().strip()
        if not line.startswith(what):
            raise RuntimeError(f"in-process worker said {line!r}, expected {what!r}")
        return line[len(what):].strip()

    def _send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def run_round(self) -> None:
        self._send("round")
        self._expect("ok")

    def report(self) -> dict:
        self._send("report")
        return json.loads(self._expect("report"))

    def close(self) -> None:
        self._send("quit")
        self.proc.wait(30)


def _inprocess_worker(spec: str) -> int:
    cfg = json.loads(spec)
    ip = InProcess(Path(cfg["model"]), Path(cfg["index"]), [Path(q) for q in cfg["queries"]], cfg["backend"])
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "round":
            ip.run_round()
            print("ok", flush=True)
        elif cmd == "report":
            print("report " + json.dumps(ip.report()), flush=True)
        elif cmd == "quit":
            break
    ip.close()
    return 0


def backend_compare(model_dir: Path, rounds: int) -> dict:
    """ms per batch of 1 and 8 for each backend variant, 1 intra-op thread (the service's),
    variants interleaved in ``rounds`` so a change of machine load hits them alike; the median
    over rounds is reported."""
    import torch

    from models.backends import OnnxBackend, TorchBackend, bf16_supported

    torch.set_num_threads(1)
    size = TorchBackend(model_dir, bf16=False).card.image_size
    rng = np.random.default_rng(0)
    xs = {"b1": rng.standard_normal((1, 3, size, size)).astype(np.float32),
          "b8": rng.standard_normal((8, 3, size, size)).astype(np.float32)}
    variants = {"torch fp32": TorchBackend(model_dir, bf16=False), "onnx": OnnxBackend(model_dir, threads=1)}
    if bf16_supported():
        variants["torch bf16"] = TorchBackend(model_dir, bf16=True)
    if importlib.util.find_spec("openvino") is not None:
        from models.backends import OpenVinoBackend

        variants["openvino"] = OpenVinoBackend(model_dir, threads=1)
    from models.backend_choice import time_backends

    times = time_backends(variants, [("b1", xs["b1"], None, 8), ("b8", xs["b8"], None, 2)], rounds)
    ref = variants["torch fp32"].embed_array(xs["b8"])
    out = {}
    for name, b in variants.items():
        row = {f"{label}_ms": v for label, v in times[name].items()}
        row["b8_per_image_ms"] = row["b8_ms"] / 8
        row["max_abs_diff_vs_fp32"] = float(np.abs(b.embed_array(xs["b8"]) - ref).max())
        out[name] = row
    return out


# ---------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.cmd, self.env, self.port, self.log = name, cmd, env, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready: {self.log.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def service_cmd(model_dir: Path, index_dir: Path, port: int, backend: str, max_batch: int, wait_ms: float,
                threads: int, idle_threads: int = 0) -> tuple[list[str], dict]:
    env = dict(os.environ, LOOKALIKE_IDLE_THREADS=str(idle_threads), PYTHONPATH=str(REPO), LOOKALIKE_MODEL_DIR=str(model_dir),
               LOOKALIKE_INDEX_DIR=str(index_dir), LOOKALIKE_WRITES_ENABLED="false", LOOKALIKE_PORT=str(port),
               LOOKALIKE_BACKEND=backend, LOOKALIKE_MAX_BATCH=str(max_batch), LOOKALIKE_BATCH_WAIT_MS=str(wait_ms),
               LOOKALIKE_INFERENCE_THREADS=str(threads), LOOKALIKE_LOG="WARNING")
    env.pop("LOOKALIKE_API_KEY", None)
    return [sys.executable, "-m", "lookalike", "serve"], env


def naive_cmd(model_dir: Path, index_dir: Path, port: int, backend: str, threads: int = 0) -> tuple[list[str], dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)  # naive: library defaults
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return [sys.executable, str(REPO / "bench" / "naive_server.py"), "--model", str(model_dir), "--index",
            str(index_dir), "--port", str(port), "--backend", backend, "--threads", str(threads)], env


def make_bodies(datas: list[bytes], k: int) -> list[tuple[bytes, dict]]:
    import httpx

    out = []
    for d in datas:
        req = httpx.Request("POST", "http://x/", files={"file": ("q.jpg", d, "image/jpeg")}, data={"k": str(k)})
        out.append((req.read(), {"Content-Type": req.headers["Content-Type"]}))
    return out


async def _measure(url: str, run, n: int, warmup: int) -> dict:
    """Warm up, then time ``n`` requests with ``run(count, latencies, status_counts) -> wall_s``;
    every measured request must have answered 200."""
    if warmup:
        await run(warmup, [], {})
    lat: list[float] = []
    codes: dict[int, int] = {}
    wall = await run(n, lat, codes) if n else 0.0
    if n and set(codes) != {200}:
        raise RuntimeError(f"{url}: not every request succeeded: {codes}")
    return {"latencies": lat, "wall_s": wall, "status": {str(k): v for k, v in sorted(codes.items())}}


async def _load(url: str, bodies: list[tuple[bytes, dict]], concurrency: int, n: int, warmup: int) -> dict:
    """``n`` requests through ``concurrency`` connections (after ``warmup`` unrecorded ones)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def run(count: int, record: list, codes: dict) -> float:
            counter = iter(range(count))

            async def worker() -> None:
                for i in counter:
                    body, headers = bodies[i % len(bodies)]
                    t0 = time.perf_counter()
                    resp = await client.post(url, content=body, headers=headers)
                    await resp.aread()
                    record.append(time.perf_counter() - t0)
                    codes[resp.status_code] = codes.get(resp.status_code, 0) + 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - t0

        return await _measure(url, run, n, warmup)


async def _raw_load(url: str, bodies: list[tuple[bytes, dict]], concurrency: int, n: int, warmup: int,
                    budget_s: float = float("inf")) -> dict:
    """The same as :func:`_load` with a minimal HTTP/1.1 keep-alive client on asyncio streams
    (pre-encoded requests, Content-Length responses), so the client's own CPU time, which is
    counted in every latency, is as small as it can be in Python (~1 ms less than httpx here)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    heads = [f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: {h['Content-Type']}\r\n"
             f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b, h in bodies]

    async def run(count: int, record: list, codes: dict) -> float:
        counter = iter(range(count))
        deadline = time.perf_counter() + budget_s

        async def worker() -> None:
            reader, writer = await asyncio.open_connection(u.hostname, u.port)
            try:
                for i in counter:
                    if time.perf_counter() > deadline:
                        break  # a collapsed server: stop early, report what was measured
                    t0 = time.perf_counter()
                    writer.write(heads[i % len(heads)])
                    status = int((await reader.readline()).split()[1])
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        if line[:15].lower() == b"content-length:":
                            length = int(line[15:])
                    await reader.readexactly(length)
                    record.append(time.perf_counter() - t0)
                    codes[status] = codes.get(status, 0) + 1
            finally:
                writer.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0

    return await _measure(url, run, n, warmup)


CLIENT = "raw"


def load(url: str, bodies, concurrency: int, n: int, warmup: int, budget_s: float = float("inf")) -> dict:
    if CLIENT == "raw":
        return asyncio.run(_raw_load(url, bodies, concurrency, n, warmup, budget_s))
    return asyncio.run(_load(url, bodies, concurrency, n, warmup))


_STAGES = {"lookalike_decode_seconds": "decode_ms", "lookalike_inference_seconds": "forward_ms_per_batch",
           "lookalike_search_seconds": "search_ms_per_batch", "lookalike_batch_size": "batch_size"}


def scrape(base_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the service's stage histograms and of its /v1/search 200 request times."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, tuple[float, float]] = {}
    for fam in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=10).text):
        for smp in fam.samples:
            name = smp.name
            if fam.name == "lookalike_http_request_duration_seconds":
                if smp.labels.get("route") != "/v1/search" or smp.labels.get("status") != "200":
                    continue
            elif fam.name not in _STAGES:
                continue
            for suffix, idx in (("_sum", 0), ("_count", 1)):
                if name.endswith(suffix):
                    key = name[: -len(suffix)]
                    cur = list(out.get(key, (0.0, 0.0)))
                    cur[idx] = smp.value
                    out[key] = (cur[0], cur[1])
    return out


def server_side(before: dict, after: dict) -> dict:
    """Means over one load level, measured inside the service."""
    res = {}
    for key, label in list(_STAGES.items()) + [("lookalike_http_request_duration_seconds", "request_ms")]:
        s0, c0 = before.get(key, (0.0, 0.0))
        s1, c1 = after.get(key, (0.0, 0.0))
        if c1 > c0:
            mean = (s1 - s0) / (c1 - c0)
            res[label] = mean if label == "batch_size" else mean * 1000.0
    return res


# ---------------------------------------------------------------------------------- report
def table(result: dict) -> str:
    from models.backends import cpu_summary

    m = result["machine"]
    lines = [f"CPU: {cpu_summary(m['cpu'])}; load avg {m['load_avg_at_start'][0]:.1f} at start, "
             f"{m.get('load_avg_at_end', [float('nan')])[0]:.1f} at end; service backend: "
             f"{result['config']['service_backend']}"]
    ip = result["in_process"]
    lines.append(f"in-process ({ip['backend']}, 1 thread), per image, mean ms (share):")
    for k in ("decode+preprocess", "embed", "search"):
        lines.append(f"  {k:18s} {ip[k]['mean_ms']:7.2f}  ({ip[k]['share']:.0%})")
    lines.append(f"  {'total':18s} {ip['total']['mean_ms']:7.2f}  (p50 {ip['total']['p50_ms']:.2f})")
    lines.append("")
    lines.append("backends in-process, 1 thread: ms per batch")
    lines.append(f"  {'backend':12s} {'b1':>8s} {'b8':>8s} {'b8/img':>8s} {'maxdiff':>9s}")
    for name, row in result["backends"].items():
        lines.append(f"  {name:12s} {row['b1_ms']:8.2f} {row['b8_ms']:8.2f} {row['b8_per_image_ms']:8.2f} "
                     f"{row['max_abs_diff_vs_fp32']:9.1e}")
    lines.append("")
    lines.append(f"{'server':16s} {'conc':>4s} {'n':>4s} {'p50 ms':>7s} {'p95 ms':>7s} {'p99 ms':>7s} {'QPS':>6s}  "
                 "| in server: request, decode, forward/batch, search/batch ms, batch")
    for row in result["load"]:
        ss = row.get("server_side", {})
        inside = " ".join(f"{ss.get(k, float('nan')):6.2f}" for k in
                          ("request_ms", "decode_ms", "forward_ms_per_batch", "search_ms_per_batch", "batch_size"))
        lines.append(f"{row['server']:16s} {row['concurrency']:4d} {row['requests']:4d} {row['p50_ms']:7.2f} {row['p95_ms']:7.2f} "
                     f"{row['p99_ms']:7.2f} {row['qps']:6.1f}  | {inside if ss else ''}")
    v = result["verdict"]
    lines.append("")
    lines.append(f"HTTP+framework overhead at c=1: {v['overhead_ms']:.2f} ms = {v['overhead_ratio']:.1%} of in-process "
                 f"(target <= 15%: {'PASS' if v['overhead_ok'] else 'FAIL'})")
    if "same_requests_overhead_ratio" in v:
        lines.append(f"  same requests, inside the service: client mean - (decode+forward+search) = "
                     f"{v['same_requests_overhead_ms']:.2f} ms = {v['same_requests_overhead_ratio']:.1%} of the work "
                     f"({v['same_requests_work_ms']:.2f} ms)")
    lines.append(f"QPS at c=8 vs the best naive ({v.get('naive_best')}): {v['qps_ratio_vs_naive']:.2f}x (target >= 1.6x: "
                 f"{'PASS' if v['qps_ok'] else 'FAIL'}); micro-batching vs none at c=8: {v['qps_ratio_batch']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_inprocess-worker"]:
        return _inprocess_worker(argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cub100", default=os.environ.get("LOOKALIKE_CUB100", str(REPO.parent / "shared/data/cub100")))
    p.add_argument("--images", type=int, default=64, help="distinct query images")
    p.add_argument("--requests", type=int, default=150, help="measured requests per server and concurrency")
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="measurements are interleaved over this many rounds")
    p.add_argument("--cell-seconds", type=float, default=6.0,
                   help="stop a server's share of a round after this long (a collapsed server does fewer "
                        "requests; the count is reported)")
    p.add_argument("--index-size", type=int, default=100_000, help="synthetic vectors in the index")
    p.add_argument("--pretrained", metavar="BACKBONE",
                   help="serve a zero-shot model of this backbone (e.g. efficientnet_lite0: the default recipe's "
                        "network, 224 px, D=1280) instead of a seeded resnet18; sets --image-size and --dim")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--factory", default="auto")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                   help="backend of the service, its no-batching twin, the naive server and the in-process baseline")
    p.add_argument("--also-backends", default="", help="comma list (torch,onnx): extra micro-batched services "
                   "on these backends, measured in the same rounds (to pick the default)")
    p.add_argument("--naive-threads", default="0,1",
                   help="comma list: one naive server per torch/OMP thread count (0 = library default)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--inference-threads", type=int, default=1)
    p.add_argument("--compare-idle-threads", action="store_true",
                   help="also run the service with LOOKALIKE_IDLE_THREADS=1 (every batch on one thread: the "
                        "policy before threads followed the load), in the same rounds")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--client", default="raw", choices=["raw", "httpx"],
                   help="load client: minimal asyncio HTTP/1.1 (default) or httpx.AsyncClient")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--workdir", help="reuse the model/index here between runs (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="10k vectors, 60 requests per level")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.index_size, args.requests, args.images, args.warmup, args.rounds = 10_000, 60, 32, 8, 3
    levels = [int(c) for c in args.concurrency.split(",")]
    global CLIENT
    CLIENT = args.client

    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_service_")
        work = Path(tmp.name)
    t_start = time.perf_counter()
    model_dir, index_dir, queries = build_fixture(work, args)
    datas = [q.read_bytes() for q in queries]

    from models.backends import cpu_info, cpu_summary
    from service.settings import Settings
    from service.state import resolve_backend_name

    print(f"CPU: {cpu_summary()}; load avg {os.getloadavg()[0]:.1f}", file=sys.stderr)

    backend = resolve_backend_name(Settings(model_dir=model_dir, writes_enabled=False, backend=args.backend))
    result: dict = {
        "bench": "service", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                        "cpu": cpu_info(), "load_avg_at_start": os.getloadavg()},
        "config": {k: v for k, v in vars(args).items() if k not in ("json",)} | {"service_backend": backend},
        "backends": backend_compare(model_dir, rounds=4 if args.quick else 8),
        "load": [],
    }
    bodies = make_bodies(datas, args.k)
    specs = [
        ("service", *service_cmd(model_dir, index_dir, free_port(), backend, args.max_batch, args.batch_wait_ms,
                                 args.inference_threads)),
        ("service-nobatch", *service_cmd(model_dir, index_dir, free_port(), backend, 1, 0.0,
                                         args.inference_threads)),
    ]
    if args.compare_idle_threads:
        specs.append(("service[idle 1]", *service_cmd(model_dir, index_dir, free_port(), backend, args.max_batch,
                                                      args.batch_wait_ms, args.inference_threads, idle_threads=1)))
    for extra in [b for b in args.also_backends.split(",") if b]:
        specs.append((f"service[{extra}]", *service_cmd(model_dir, index_dir, free_port(), extra, args.max_batch,
                                                        args.batch_wait_ms, args.inference_threads)))
    naive_names = []
    if not args.skip_naive:
        for t in [int(x) for x in args.naive_threads.split(",") if x]:
            name = "naive" if t == 0 else f"naive[{t} thr]"
            naive_names.append(name)
            specs.append((name, *naive_cmd(model_dir, index_dir, free_port(), backend, t)))
    # Every server runs from the start (idle ones cost nothing) and the measurements are
    # interleaved in rounds: the machine is shared, and a change of load during the run then
    # hits every configuration alike instead of whichever happened to run at that moment.
    inproc = InProcessWorker(model_dir, index_dir, queries, backend)
    cells = [(name, c, "/v1/search") for name, *_ in specs for c in levels]
    if naive_names:
        cells.append((naive_names[0], 1, "/empty"))
    lat: dict[tuple, list[float]] = {cell: [] for cell in cells}
    wall: dict[tuple, float] = {cell: 0.0 for cell in cells}
    codes: dict[tuple, dict] = {cell: {} for cell in cells}
    inside: dict[tuple, dict] = {cell: {} for cell in cells}
    per_round = max(1, args.requests // args.rounds)
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, cmd, env in specs:
            port = int(env.get("LOOKALIKE_PORT") or cmd[cmd.index("--port") + 1])
            servers[name] = stack.enter_context(Server(name, cmd, env, port, work / f"{name}.log"))
        for cell in cells:  # warm-up
            load(servers[cell[0]].url + cell[2], bodies, cell[1], args.warmup, 0, args.cell_seconds)
        for r in range(args.rounds):
            inproc.run_round()
            for cell in cells:
                name, c, path = cell
                srv = servers[name]
                before = scrape(srv.url) if name.startswith("service") else {}
                row = load(srv.url + path, bodies, c, per_round, 0, args.cell_seconds)
                lat[cell] += row["latencies"]
                wall[cell] += row["wall_s"]
                for code, count in row["status"].items():
                    codes[cell][code] = codes[cell].get(code, 0) + count
                if before:
                    for key, (s1, c1) in scrape(srv.url).items():
                        s0, c0 = before.get(key, (0.0, 0.0))
                        acc = inside[cell].setdefault(key, [0.0, 0.0])
                        acc[0] += s1 - s0
                        acc[1] += c1 - c0
            print(f"  round {r + 1}/{args.rounds} done (load avg {os.getloadavg()[0]:.1f})", file=sys.stderr)
    result["in_process"] = inproc.report()
    inproc.close()
    for cell in cells:
        name, c, path = cell
        label = name if path == "/v1/search" else f"{name} {path}"
        xs = lat[cell]
        row = {"server": label, "concurrency": c, "requests": len(xs), "p50_ms": pct(xs, 50), "p95_ms": pct(xs, 95),
               "p99_ms": pct(xs, 99), "mean_ms": float(np.mean(xs) * 1000), "qps": len(xs) / wall[cell],
               "status": codes[cell]}
        if inside[cell]:
            row["server_side"] = server_side({}, {k: tuple(v) for k, v in inside[cell].items()})
        result["load"].append(row)

    def find(server: str, c: int) -> dict:
        return next(r for r in result["load"] if r["server"] == server and r["concurrency"] == c)

    base = result["in_process"]["total"]["p50_ms"]
    c1 = find("service", 1)["p50_ms"]
    verdict = {"overhead_ms": c1 - base, "overhead_ratio": (c1 - base) / base}
    verdict["overhead_ok"] = verdict["overhead_ratio"] <= 0.15
    # Same requests, measured inside the service: client mean latency minus the mean of the work
    # itself (decode + forward + search at batch 1). Immune to machine-load drift between runs.
    ss = find("service", 1).get("server_side", {})
    work_ms = sum(ss.get(k, 0.0) for k in ("decode_ms", "forward_ms_per_batch", "search_ms_per_batch"))
    if work_ms:
        verdict["same_requests_work_ms"] = work_ms
        verdict["same_requests_overhead_ms"] = find("service", 1)["mean_ms"] - work_ms
        verdict["same_requests_overhead_ratio"] = verdict["same_requests_overhead_ms"] / work_ms
    hi = max(levels)
    verdict["qps_ratio_batch"] = find("service", hi)["qps"] / find("service-nobatch", hi)["qps"]
    if naive_names:
        # against the best naive variant (library-default threads or 1 thread), to be conservative
        best = max(naive_names, key=lambda n: find(n, hi)["qps"])
        verdict["naive_best"] = best
        verdict["qps_ratio_vs_naive"] = find("service", hi)["qps"] / find(best, hi)["qps"]
        verdict["qps_ratio_vs_each_naive"] = {n: find("service", hi)["qps"] / find(n, hi)["qps"] for n in naive_names}
        verdict["qps_ok"] = verdict["qps_ratio_vs_naive"] >= 1.6
    else:
        verdict["qps_ratio_vs_naive"], verdict["qps_ok"] = float("nan"), False
    result["verdict"] = verdict
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t_start

    print(json.dumps(result, indent=2))
    print()
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
