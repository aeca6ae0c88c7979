"""The SIGKILL loop shared by ``tests/e2e/test_kill_loop.py`` (5 cycles) and
``bench/bench_kill_loop.py`` (100): a real server is killed with adds and deletes in flight, then
restarted and audited: every acknowledged add is there with its bytes, every acknowledged delete
is gone, and the start-up sweep has left no ``.tmp`` file, unfinished generation or orphan upload.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import ServerProcess
from tests.unit.service import imagegen
from tests.unit.service.apihelpers import auth


def writer(url: str, stop: threading.Event, adds: dict, deletes: set, tried: set, seed: int) -> None:
    """Adds and deletes until the server dies. ``adds``/``deletes`` get what was acknowledged;
    ``tried`` every id a delete was sent for (its answer may have been lost in the kill)."""
    rng = random.Random(seed)
    n = 0
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            n += 1
            try:
                if adds and rng.random() < 0.3:
                    victim = rng.choice(sorted(set(adds) - deletes) or [None])
                    if victim is None:
                        continue
                    tried.add(victim)
                    if c.delete(f"{url}/v1/images/{victim}", headers=auth()).status_code == 200:
                        deletes.add(victim)
                else:
                    data = imagegen.jpeg(10_000 * seed + n)
                    r = c.post(f"{url}/v1/images", headers=auth(), files={"file": ("n.jpg", data, "image/jpeg")})
                    if r.status_code == 201:
                        adds[r.json()["image"]["id"]] = data
            except httpx.HTTPError:
                return  # the server was killed: nothing after this was acknowledged


def audit(url: str, index_dir: Path, adds: dict, deletes: set, tried: set) -> dict:
    """What a restarted server and its index directory break of the acknowledged writes ->
    ``{"lost": [...], "resurrected": [...], "debris": [...], "orphans": [...]}`` (all empty when sound)."""
    from index import IndexStore
    from index.store import DELETED_DIR

    found: dict[str, list] = {"lost": [], "resurrected": [], "debris": [], "orphans": []}
    with httpx.Client(timeout=10) as c:
        for rid, data in adds.items():
            r = c.get(f"{url}/v1/images/{rid}")
            if rid in deletes:
                if r.status_code != 404:  # acknowledged delete: gone for good
                    found["resurrected"].append((rid, r.status_code))
            elif rid in tried and r.status_code == 404:
                deletes.add(rid)  # a delete sent as the server died took effect; it must stay gone
            elif r.status_code != 200 or r.content != data:
                found["lost"].append((rid, r.status_code))
    uploads = index_dir / "uploads"
    found["debris"] += [p.name for p in uploads.iterdir() if p.name.endswith(".tmp")] if uploads.is_dir() else []
    found["debris"] += [p.name for p in (index_dir / "generations").glob(".tmp-*")]
    found["debris"] += [p.name for p in index_dir.glob(".*.tmp")]
    with IndexStore.open(index_dir) as store:  # a reader, beside the running writer
        for f in uploads.iterdir() if uploads.is_dir() else []:
            if f.name == DELETED_DIR:  # bytes of deleted uploads, kept a while for snapshots in progress
                found["orphans"] += [f"{DELETED_DIR}/{g.name} (live)" for g in f.iterdir()
                                     if store.get_by_sha256(g.name.split(".")[0]) is not None]
            elif store.get_by_sha256(f.name.split(".")[0]) is None:
                found["orphans"].append(f.name)
    return found


def run_kill_loop(model_dir: Path, index_dir: Path, workdir: Path, cycles: int, seed: int = 0,
                  log_every: int = 0) -> dict:
    """``cycles`` times: start a server, write from two clients for 0.8-2 s, SIGKILL it; audit after
    every restart, and once more before a final SIGTERM. Returns the counts (acknowledged adds
    and deletes, every problem :func:`audit` found with its cycle, restart seconds, the exit
    status of the final SIGTERM)."""
    adds: dict[int, bytes] = {}
    deletes: set[int] = set()
    tried: set[int] = set()
    problems: list = []
    restarts: list[float] = []
    rng = random.Random(seed)
    final_status = None
    for cycle in range(cycles + 1):
        t0 = time.monotonic()
        srv = ServerProcess(model_dir, index_dir, workdir / f"server{cycle % 3}.log", checkpoint_every="3").start()
        restarts.append(time.monotonic() - t0)
        try:
            for kind, items in audit(srv.url, index_dir, adds, deletes, tried).items():
                problems += [(cycle, kind, item) for item in items]
            if cycle == cycles:
                final_status = srv.stop(signal.SIGTERM)
                break
            stop = threading.Event()
            threads = [threading.Thread(target=writer, args=(srv.url, stop, adds, deletes, tried, 100 * cycle + i))
                       for i in range(2)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.8, 2.0))
            srv.stop(signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join(30)
        finally:
            if srv.alive():
                srv.stop(signal.SIGKILL)
        if log_every and (cycle + 1) % log_every == 0:
            print(f"cycle {cycle + 1}/{cycles}: {len(adds)} adds, {len(deletes)} deletes acknowledged, "
                  f"{len(problems)} problems", flush=True)
    return {"cycles": cycles, "acknowledged_adds": len(adds), "acknowledged_deletes": len(deletes),
            "problems": problems, "restart_s": restarts, "final_sigterm_status": final_status}
