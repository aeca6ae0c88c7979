"""Bounded SIGKILL loop (issue 12, the CI version of a 100-cycle benchmark): a real server is
killed with adds and deletes in flight, five times. After every restart each acknowledged add is
there with its bytes, each acknowledged delete is gone, and the start-up sweep has left no
``.tmp`` file, unfinished generation or orphan upload behind."""

from __future__ import annotations

import random
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import ServerProcess
from tests.unit.service import imagegen
from tests.unit.service.apihelpers import auth

CYCLES = 5


def _writer(url: str, stop: threading.Event, adds: dict, deletes: set, tried: set, seed: int) -> None:
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


def _check(url: str, index_dir, adds: dict, deletes: set, tried: set) -> None:
    from index import IndexStore
    from index.store import DELETED_DIR

    with httpx.Client(timeout=10) as c:
        for rid, data in adds.items():
            r = c.get(f"{url}/v1/images/{rid}")
            if rid in deletes:
                assert r.status_code == 404, (rid, r.status_code)  # acknowledged delete: gone for good
            elif rid in tried and r.status_code == 404:
                deletes.add(rid)  # a delete sent as the server died took effect; it must stay gone
            else:
                assert r.status_code == 200 and r.content == data, (rid, r.status_code)
    uploads = index_dir / "uploads"
    debris = [p.name for p in uploads.iterdir() if p.name.endswith(".tmp")] if uploads.is_dir() else []
    debris += [p.name for p in (index_dir / "generations").glob(".tmp-*")]
    debris += [p.name for p in index_dir.glob(".*.tmp")]
    assert not debris, debris
    with IndexStore.open(index_dir) as store:  # a reader, beside the running writer
        for f in uploads.iterdir() if uploads.is_dir() else []:
            if f.name == DELETED_DIR:  # bytes of deleted uploads, kept a while for snapshots in progress
                for g in f.iterdir():
                    assert store.get_by_sha256(g.name.split(".")[0]) is None, f"live upload in {DELETED_DIR}: {g.name}"
                continue
            assert store.get_by_sha256(f.name.split(".")[0]) is not None, f"orphan upload {f.name}"


@pytest.mark.slow
def test_sigkill_loop_loses_nothing_and_leaves_no_debris(e2e_model, e2e_index, tmp_path):
    adds: dict[int, bytes] = {}
    deletes: set[int] = set()
    tried: set[int] = set()
    rng = random.Random(0)
    for cycle in range(CYCLES + 1):
        srv = ServerProcess(e2e_model, e2e_index, tmp_path / f"server{cycle}.log", checkpoint_every="3").start()
        try:
            _check(srv.url, e2e_index, adds, deletes, tried)
            if cycle == CYCLES:
                assert srv.stop(signal.SIGTERM) == 0, srv.log()
                break
            stop = threading.Event()
            threads = [threading.Thread(target=_writer, args=(srv.url, stop, adds, deletes, tried, 100 * cycle + i))
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
    assert len(adds) >= CYCLES, len(adds)  # the loop did write under the kills
