"""Slow clients against a real server: normal searches while attackers hold connections, and
SIGTERM with slow clients connected (issue 12's targets).

A real ``python -m service`` (default settings, torch backend) serves a tiny seeded model
(resnet18 at 64 px, 32-d) over an index of 48 generated images. Phases, each ``--seconds`` long,
one normal client sending searches back to back (a 96x80 JPEG, k=5):

* baseline: no attacker (measured in the same run);
* slow uploads: ``--slow-uploads`` connections (70) send a search upload's headers and then its
  body at 3 bytes/s each, reconnecting whenever the server closes them;
* slow headers: ``--slow-headers`` connections (600) send a request line and then one header
  byte per second each, reconnecting whenever the server closes them;
* SIGTERM: after one acknowledged add, with 20 slow uploads connected: exit status, seconds from
  SIGTERM to exit (the bound is ``LOOKALIKE_GRACEFUL_SHUTDOWN_S`` + 5), and whether the shutdown
  checkpoint ran.

Reported: the share of normal requests answered 200, their p50/p95 latency, and the statuses
seen. Prints a table, then one JSON line.

    python bench/bench_reliability.py                # ~2 min on 2 cores
    python bench/bench_reliability.py --seconds 8    # quicker
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_service import free_port  # noqa: E402

API_KEY = "bench-key-0123456789abcdef"


def build_fixture(tmp: Path, image_size: int = 64) -> tuple[Path, Path]:
    """A seeded model (resnet18 at ``image_size`` px) and an index of generated images under ``tmp``."""
    from index import IndexStore
    from models.backends import TorchBackend
    from models.decode import decode_image
    from tests.helpers import make_image_folder, save_seeded_model

    model = save_seeded_model(tmp / "model", image_size=image_size, resize_size=image_size * 9 // 8)
    images = tmp / "images"
    make_image_folder(images, n_classes=6, per_class=8, size=96)
    paths = sorted(p for p in images.rglob("*") if p.is_file())
    backend = TorchBackend(model, bf16=False)
    vectors = backend.embed_images([decode_image(p) for p in paths])
    store = IndexStore.create(tmp / "index", card=backend.card, images_root=images)
    store.add(vectors, [{"path": p.relative_to(images).as_posix(), "label": p.parent.name,
                         "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                         "mtime": p.stat().st_mtime, "source": "folder"} for p in paths])
    store.checkpoint()
    store.close()
    return model, tmp / "index"


def query_jpeg(seed: int = 1) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


class Trickle(threading.Thread):
    """``n`` connections that send ``prefix`` and then ``step`` bytes every ``interval`` s."""

    def __init__(self, port: int, n: int, prefix: bytes, step: bytes, interval: float) -> None:
        super().__init__(daemon=True)
        self.port, self.n, self.prefix, self.step, self.interval = port, n, prefix, step, interval
        self.stop = threading.Event()
        self.reconnects = 0
        self.socks: list[socket.socket | None] = [None] * n

    def _open(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            s.setblocking(False)
            s.send(self.prefix)
            return s
        except OSError:
            return None

    def run(self) -> None:
        for i in range(self.n):
            self.socks[i] = self._open()
        while not self.stop.wait(self.interval):
            for i, s in enumerate(self.socks):
                try:
                    if s is None:
                        raise OSError
                    try:
                        if s.recv(65536) == b"":
                            raise OSError  # the server closed it (408): reconnect
                    except BlockingIOError:
                        pass
                    s.send(self.step)
                except OSError:
                    if s is not None:
                        s.close()
                    self.socks[i] = self._open()
                    self.reconnects += 1

    def close(self) -> None:
        self.stop.set()
        self.join(10)
        for s in self.socks:
            if s is not None:
                s.close()


def normal_client(port: int, seconds: float, data: bytes) -> dict:
    import httpx

    statuses: collections.Counter = collections.Counter()
    lat = []
    end = time.monotonic() + seconds
    with httpx.Client(timeout=10) as c:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                r = c.post(f"http://127.0.0.1:{port}/v1/search", files={"file": ("q.jpg", data, "image/jpeg")},
                           data={"k": "5"})
                statuses[r.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            lat.append((time.perf_counter() - t0) * 1000)
    n = sum(statuses.values())
    lat.sort()
    return {"requests": n, "ok_share": statuses.get(200, 0) / max(n, 1), "statuses": dict(statuses),
            "p50_ms": statistics.median(lat) if lat else None,
            "p95_ms": lat[int(0.95 * (len(lat) - 1))] if lat else None}


def upload_prefix(length: int = 100_000) -> bytes:
    return (b"POST /v1/search HTTP/1.1\r\nHost: b\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            b"Content-Length: %d\r\n\r\n--zz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff" % length)


def start_server(model: Path, index: Path, port: int, log: Path, **settings: str) -> subprocess.Popen:
    """``python -m service`` on ``port`` (``settings``: more ``LOOKALIKE_*`` values), once ready."""
    import httpx

    env = {**os.environ, "LOOKALIKE_MODEL_DIR": str(model), "LOOKALIKE_INDEX_DIR": str(index),
           "LOOKALIKE_API_KEY": API_KEY, "LOOKALIKE_BACKEND": "torch", "LOOKALIKE_PORT": str(port),
           "LOOKALIKE_CHECKPOINT_EVERY": "0", "PYTHONPATH": str(REPO),
           **{f"LOOKALIKE_{k.upper()}": str(v) for k, v in settings.items()}}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become ready")


def main(argv: list[str] | None = None) -> int:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--slow-uploads", type=int, default=70)
    ap.add_argument("--slow-headers", type=int, default=600)
    args = ap.parse_args(argv)
    data = query_jpeg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, index = build_fixture(tmp)
        port = free_port()
        log = tmp / "server.log"
        proc = start_server(model, index, port, log)
        try:
            normal_client(port, 2.0, data)  # warm-up
            rows.append({"phase": "baseline (no attacker)", **normal_client(port, args.seconds, data)})
            t = Trickle(port, args.slow_uploads, upload_prefix(), b"\x00\x01\x02", 1.0)  # 3 B/s each
            t.start()
            time.sleep(2.0)
            rows.append({"phase": f"{args.slow_uploads} slow uploads at 3 B/s",
                         **normal_client(port, args.seconds, data), "attacker_reconnects": t.reconnects})
            t.close()
            t = Trickle(port, args.slow_headers, b"GET /healthz HTTP/1.1\r\nX-Slow: ", b"a", 1.0)
            t.start()
            time.sleep(2.0)
            rows.append({"phase": f"{args.slow_headers} slow-header connections",
                         **normal_client(port, args.seconds, data), "attacker_reconnects": t.reconnects})
            t.close()
            r = httpx.post(f"http://127.0.0.1:{port}/v1/images", headers={"Authorization": f"Bearer {API_KEY}"},
                           files={"file": ("n.jpg", query_jpeg(2), "image/jpeg")}, timeout=30)
            acked = r.status_code == 201
            t = Trickle(port, 20, upload_prefix(), b"\x00\x01\x02", 1.0)
            t.start()
            time.sleep(1.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                rc = None
            took = time.monotonic() - t0
            t.close()
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        from index import IndexStore

        with IndexStore.open(index) as reopened:
            size_after = len(reopened)
        shutdown = {"exit_status": rc, "seconds_to_exit": round(took, 2), "bound_s": 10 + 5,
                    "checkpoint_at_shutdown": "checkpointed index generation" in text,
                    "acknowledged_add": acked, "index_size_after_restart": size_after, "expected_size": 48 + int(acked)}
    print(f"{'phase':<34} {'requests':>8} {'200 share':>9} {'p50 ms':>8} {'p95 ms':>8}  statuses")
    for r in rows:
        print(f"{r['phase']:<34} {r['requests']:>8} {r['ok_share']:>9.3f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f}  "
              f"{r['statuses']}")
    print(f"SIGTERM with 20 slow uploads: exit status {shutdown['exit_status']}, {shutdown['seconds_to_exit']} s "
          f"(bound {shutdown['bound_s']} s), shutdown checkpoint {'done' if shutdown['checkpoint_at_shutdown'] else 'MISSING'}, "
          f"index {shutdown['index_size_after_restart']}/{shutdown['expected_size']} after restart")
    print(json.dumps({"bench": "reliability", "seconds": args.seconds, "python": platform.python_version(),
                      "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "phases": rows, "sigterm": shutdown}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
