"""Load for the overload test and ``bench/bench_overload.py``: closed-loop capacity and open-loop
overload against a running service, with a minimal HTTP/1.1 keep-alive client on asyncio streams
(pre-encoded requests, Content-Length responses) so the client's own CPU time stays small.

* :func:`closed_loop`: ``concurrency`` connections each sending the next request as soon as the
  previous answer arrived (the service's capacity: its throughput and latency there).
* :func:`open_loop`: requests sent at a fixed ``rate`` whatever the answers (arrivals do not wait
  for the service, as real users do not), each on an idle kept-alive connection or a new one.

Both return a :class:`Load` of every request's status, latency (request written -> whole answer
read) and whether a 503 carried ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Load:
    """What one phase of load saw. Latencies in seconds."""

    seconds: float = 0.0
    statuses: dict = field(default_factory=dict)          # status (int) or error name -> count
    ok_latency: list = field(default_factory=list)        # 200s
    refused_latency: list = field(default_factory=list)   # 503s
    refused_without_retry_after: int = 0
    offered: int = 0                                      # requests the phase tried to send
    client_lag_s: float = 0.0                             # open loop: how far the sender fell behind
    stalls: list = field(default_factory=list)            # how late 5 ms sleeps of the client woke up
    probe: list = field(default_factory=list)             # GET /healthz latencies, one at a time

    def add(self, status, latency: float, retry_after: bool) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.ok_latency.append(latency)
        elif status == 503:
            self.refused_latency.append(latency)
            self.refused_without_retry_after += not retry_after

    @property
    def ok_per_s(self) -> float:
        return len(self.ok_latency) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        """Counts, rates and latency percentiles (ms) as plain JSON values."""
        return {"seconds": round(self.seconds, 2), "offered": self.offered,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
                "ok_per_s": round(self.ok_per_s, 2),
                "ok_p50_ms": ms(pct(self.ok_latency, 0.50)), "ok_p99_ms": ms(pct(self.ok_latency, 0.99)),
                "refused_p50_ms": ms(pct(self.refused_latency, 0.50)),
                "refused_p95_ms": ms(pct(self.refused_latency, 0.95)),
                "refused_p99_ms": ms(pct(self.refused_latency, 0.99)),
                "refused_without_retry_after": self.refused_without_retry_after,
                "client_lag_ms": round(self.client_lag_s * 1000, 1),
                "stall_p99_ms": ms(pct(self.stalls, 0.99)), "probe_p99_ms": ms(pct(self.probe, 0.99))}


def pct(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``xs``, None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def search_request(host: str, port: int, jpeg: bytes, k: int = 5, path: str = "/v1/search") -> bytes:
    """A whole pre-encoded ``POST /v1/search`` request (multipart upload of ``jpeg``)."""
    import httpx

    req = httpx.Request("POST", f"http://{host}:{port}{path}", files={"file": ("q.jpg", jpeg, "image/jpeg")},
                        data={"k": str(k)})
    body = req.read()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {req.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def exchange(self, request: bytes) -> tuple[int, bool, bool]:
        """Send ``request``, read the answer -> (status, has Retry-After, connection kept open)."""
        self.writer.write(request)
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("closed before an answer")
        status = int(line.split()[1])
        length, retry_after, keep = 0, False, True
        while (h := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = h.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"retry-after":
                retry_after = True
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        await self.reader.readexactly(length)
        return status, retry_after, keep

    def close(self) -> None:
        self.writer.close()


class _Stale(Exception):
    """A kept-alive connection the server had closed (its idle timeout) before this request."""


async def _exchange(host: str, port: int, request: bytes, conn: _Conn | None) -> tuple[_Conn, tuple[int, bool, bool]]:
    if conn is None:
        conn = _Conn(*await asyncio.open_connection(host, port))
        return conn, await conn.exchange(request)
    try:
        return conn, await conn.exchange(request)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        conn.close()
        raise _Stale from exc


async def _one(host: str, port: int, request: bytes, idle: list[_Conn], out: Load) -> None:
    conn = idle.pop() if idle else None
    t0 = time.perf_counter()
    try:
        try:
            conn, (status, retry_after, keep) = await _exchange(host, port, request, conn)
        except _Stale:  # as HTTP clients do: once more on a new connection (latency counted from t0)
            conn = None
            conn, (status, retry_after, keep) = await _exchange(host, port, request, None)
    except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        out.statuses[type(exc).__name__] = out.statuses.get(type(exc).__name__, 0) + 1
        if conn is not None:
            conn.close()
        return
    out.add(status, time.perf_counter() - t0, retry_after)
    if keep:
        idle.append(conn)
    else:
        conn.close()


async def open_loop(host: str, port: int, request: bytes, rate: float, seconds: float,
                    timeout_s: float = 30.0, onset_s: float = 2.0) -> Load:
    """Send ``request`` ``rate`` times per second for ``onset_s + seconds`` (evenly spaced),
    whatever the answers, recording the last ``seconds`` only (the steady state; at the onset of a
    flood, requests that passed the header check together are refused once their bodies are in,
    a few hundred ms later); wait up to ``timeout_s`` for the last ones. ``client_lag_s``: the
    sender's worst delay behind schedule (a sender that cannot keep up offers less than ``rate``)."""
    out = Load()
    onset = Load()
    idle: list[_Conn] = []
    tasks: set[asyncio.Task] = set()
    skip = int(rate * onset_s)
    n = skip + int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif i >= skip:
            out.client_lag_s = max(out.client_lag_s, -delay)
        task = asyncio.create_task(_one(host, port, request, idle, out if i >= skip else onset))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    out.offered = n - skip
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)
    out.seconds = time.perf_counter() - t0 - onset_s
    for c in idle:
        c.close()
    return out


async def closed_loop(host: str, port: int, request: bytes, concurrency: int, seconds: float,
                      backoff_s: float = 0.1) -> Load:
    """``concurrency`` connections, each sending ``request`` again as soon as it is answered, or
    ``backoff_s`` after a 503 (a client that retries a refusal at once only measures how fast
    refusals are; this one backs off, though less than ``Retry-After`` asks)."""
    out = Load()
    end = time.perf_counter() + seconds

    async def worker() -> None:
        idle: list[_Conn] = []
        while time.perf_counter() < end:
            refused = len(out.refused_latency)
            await _one(host, port, request, idle, out)
            if len(out.refused_latency) > refused:
                await asyncio.sleep(backoff_s)
        for c in idle:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.seconds = time.perf_counter() - t0
    out.offered = sum(v for v in out.statuses.values())
    return out


async def _probe_stalls(out: Load, period_s: float = 0.005) -> None:
    """Until cancelled: how late each ``period_s`` sleep of this event loop wakes up, into
    ``out.stalls``. It is the delay the machine (a busy run queue, a low nice level) and the client
    itself add to every latency measured here; the server, at the same nice level, sees the same."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(period_s)
        out.stalls.append(max(0.0, time.perf_counter() - t0 - period_s))


async def _probe_server(host: str, port: int, out: Load, period_s: float = 0.02) -> None:
    """Until cancelled: ``GET /healthz`` every ``period_s`` on one connection, latencies into
    ``out.probe``: the cheapest answer the server gives at that moment (its event loop, its GIL and
    the machine's scheduling all included), the floor any other answer stands on."""
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    conn = None
    try:
        while True:
            t0 = time.perf_counter()
            try:
                conn, _ = await _exchange(host, port, request, conn)
                out.probe.append(time.perf_counter() - t0)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, _Stale):
                conn = None
            await asyncio.sleep(period_s)
    finally:
        if conn is not None:
            conn.close()


def overload_run(host: str, port: int, request: bytes, *, concurrency: int, capacity_s: float,
                 factors: tuple[float, ...], overload_s: float, recovery_s: float,
                 server_cpu: Callable[[], float] | None = None) -> dict:
    """Capacity (closed loop at ``concurrency``), then open-loop overload at each of ``factors`` x the
    measured capacity for ``overload_s``, then capacity again (recovery). Returns each phase's
    :meth:`Load.summary` (plus ``server_cpu_s`` per phase when ``server_cpu()`` reads the server's
    CPU seconds) and the raw :class:`Load` objects under ``"loads"``."""
    cpu: dict[str, float] = {}

    async def phase(name: str, coro) -> Load:
        c0 = server_cpu() if server_cpu else 0.0
        noise = Load()
        probes = [asyncio.create_task(_probe_stalls(noise)), asyncio.create_task(_probe_server(host, port, noise))]
        try:
            load = await coro
        finally:
            for p in probes:
                p.cancel()
        load.stalls, load.probe = noise.stalls, noise.probe
        if server_cpu:
            cpu[name] = round(server_cpu() - c0, 2)
        return load

    async def run() -> dict:
        await closed_loop(host, port, request, concurrency, min(5.0, capacity_s))  # warm-up (and the estimate settles)
        cap = await phase("capacity", closed_loop(host, port, request, concurrency, capacity_s))
        loads = {"capacity": cap}
        for f in factors:
            loads[f"{f:g}x"] = await phase(f"{f:g}x", open_loop(host, port, request, f * cap.ok_per_s, overload_s))
        await asyncio.sleep(1.0)
        loads["recovery"] = await phase("recovery", closed_loop(host, port, request, concurrency, recovery_s))
        return loads

    loads = asyncio.run(run())
    phases = {name: load.summary() for name, load in loads.items()}
    for name, c in cpu.items():
        phases[name]["server_cpu_s"] = c
    return {"phases": phases, "loads": loads}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from ``/proc``."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
