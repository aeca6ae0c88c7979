"""Overload (issue 12): offered 3x and 8x the searches it can answer, a real server sheds the excess
with fast 503s (``Retry-After``), keeps the admitted requests' latency near what it is at capacity,
keeps answering, and recovers once the flood stops.

Capacity is measured in the same run (32 closed-loop clients that back off 0.1 s after a 503), so
the checks are ratios to it. Each overload phase is measured after its first 2 s (the onset, when
requests that passed the header check together are refused once their bodies are in). The
machine may be shared: the two latency targets (503 p99 <= 50 ms at both factors, admitted p99
<= 2x the p99 at capacity) are widened by twice the p99 of the client's own
scheduling stalls measured during the same phase (how late a 5 ms sleep wakes up: about 0 on a
quiet machine, so there the targets hold as stated; the server runs at the same nice level and
sees the same stalls). ``bench/bench_overload.py`` runs the long version (5 minutes per factor).
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.conftest import ServerProcess, build_index
from tests.e2e.loadgen import overload_run, process_cpu_seconds, search_request
from tests.unit.service import imagegen

pytestmark = pytest.mark.slow

FACTORS = (3.0, 8.0)


@pytest.fixture()
def heavier_model(tmp_path_factory):
    """resnet18 at 224 px: inference, not HTTP, is what a search costs (as with the real models), and 8x
    its capacity stays within what a Python client and server can send and parse on 2 cores."""
    from tests.helpers import save_seeded_model

    return save_seeded_model(tmp_path_factory.mktemp("overload-model") / "m", image_size=224, resize_size=256)


def test_overload_is_shed_fast_and_admitted_latency_stays_bounded(heavier_model, e2e_images, tmp_path):
    index = build_index(heavier_model, e2e_images, tmp_path / "idx")
    server = ServerProcess(heavier_model, index, tmp_path / "server.log").start()
    try:
        request = search_request("127.0.0.1", server.port, imagegen.jpeg(11, size=(320, 240)))
        run = overload_run("127.0.0.1", server.port, request, concurrency=32, capacity_s=8.0, factors=FACTORS,
                           overload_s=15.0, recovery_s=6.0, server_cpu=lambda: process_cpu_seconds(server.proc.pid))
        assert server.alive(), server.log()
    finally:
        server.stop()
    phases, loads = run["phases"], run["loads"]
    print("overload phases:", phases, "load average:", os.getloadavg())
    cap = loads["capacity"]
    assert cap.ok_per_s > 0 and len(cap.ok_latency) >= 20, phases["capacity"]
    cap_p99 = phases["capacity"]["ok_p99_ms"]
    for name, load in loads.items():
        p = phases[name]
        assert set(load.statuses) <= {200, 503}, (name, p)  # no 5xx, no reset, no timeout
        assert load.refused_without_retry_after == 0, (name, p)
    for f in FACTORS:
        name = f"{f:g}x"
        load, p = loads[name], phases[name]
        noise = 2.0 * p["stall_p99_ms"]
        assert p["refused_p50_ms"] is not None, (name, p)  # the excess is refused ...
        assert p["refused_p95_ms"] <= 50.0 + noise, (name, p)  # ... fast
        # the tail too (it was ~200 ms full garbage collections of the start-up objects; frozen now)
        assert p["refused_p99_ms"] <= 50.0 + noise, (name, p)
        assert p["ok_p99_ms"] <= 2.0 * cap_p99 + noise, (name, p, cap_p99)  # admitted ones stay near capacity
        assert load.ok_per_s >= 0.5 * cap.ok_per_s, (name, p, phases["capacity"])  # no collapse of goodput
    assert loads["8x"].statuses[503] > loads["8x"].statuses.get(200, 0), phases["8x"]
    rec = loads["recovery"]
    assert rec.ok_per_s >= 0.6 * cap.ok_per_s, (phases["recovery"], phases["capacity"])
    assert phases["recovery"]["ok_p99_ms"] <= 2.0 * cap_p99 + 2.0 * phases["recovery"]["stall_p99_ms"], \
        (phases["recovery"], cap_p99)
