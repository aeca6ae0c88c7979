"""Micro-batching pipeline: inference threads, one search thread, a bounded admission count.

Why this shape (each a measured fact on these 2-core machines):

* A torch forward run from another thread than the one that built the model was 1.7x slower,
  so the backend is built *and* run in one dedicated thread (``lookalike-infer``), which also
  sets the torch / ONNX Runtime thread count there.
* Runtimes that can (ONNX Runtime, OpenVINO: :meth:`~models.backends.InferenceBackend.fork`) run
  ``workers`` inference threads (the service's default: two on 2+ cores), each with its own
  handle on the model, taking batches from one queue: with one thread, 0.5 of 2 cores stayed
  idle at concurrency 8 while queries waited for the forward pass (measured: 131.7 -> 144.4
  queries/s, 1.47 -> 1.80 cores, Lite0 over 20k x 1280, 2-core EPYC). torch keeps one thread.
* Concurrent queries waiting for that thread are taken together (up to ``max_batch``) into one
  forward pass and one batched index search. The thread never waits for a batch to fill when
  no other query is on its way (at one client that would only add latency); it waits up to
  ``wait_ms`` only while admitted queries are still being decoded. While other inference
  threads are free, a thread takes only its share of the queue: batching gains these CPU
  runtimes little per image, a second core gains ~2x (:meth:`MicroBatcher._collect`). With
  several inference threads, batching is measured at start-up and turned off where a batch is
  no cheaper per image than one query (:meth:`MicroBatcher._measure_batching`).
* Uploads are decoded in a small pool whose worker queues the job for the inference thread
  itself (the event loop is woken once per query, with the answer); when the inference thread
  is idle it decodes the upload itself, saving one more hand-off at low load.
* Under load the index search runs in a second thread (``lookalike-search``) so batch n+1's
  forward pass overlaps batch n's search; when no query waits for the model, the inference
  thread searches itself (one hand-off fewer). ``faiss.omp_set_num_threads`` applies only to
  the thread that calls it, so both threads call it.
* Admission is bounded by latency, not only by count: the inference thread measures the
  pipeline's seconds per query under load (:class:`QueryTime`), and a query is refused when the
  queries already admitted are expected to keep it waiting longer than ``max_queue_wait_ms``
  (``pending x seconds per query``, Little's law), or when ``max_pending`` are admitted. The
  decision is O(1) on the event loop (:meth:`MicroBatcher.refusal` reads two numbers), so the
  service answers 503 from a request's headers, before reading its body (:mod:`service.protocol`).
* Thread counts follow the load (:class:`ThreadPolicy`): a lone query (nothing queued, nothing
  being decoded, a core free of other processes' work: :class:`OtherCpu`) runs its forward pass
  on ``idle_threads`` threads, so an idle service uses every core; a batch, or a query with
  others behind it, runs on one thread and leaves the other cores to decoding and the
  overlapped search. Two threads on a core another process also wants collapse (OpenMP workers
  wait for a descheduled peer: measured 2-25x slower here), so the policy also keeps timing lone
  queries on 1 and on ``idle_threads`` and uses the faster one. FAISS searches stay on
  ``search_threads``: FAISS splits work across queries, so one query gains nothing from more
  threads (bench_search: 816 vs 834 ms, Flat 100k x 1280), while 32 queries on 2 threads under
  load took 11x longer. A lone query over an exact index is searched instead by one BLAS product
  on its ``idle_threads`` cores (:func:`index.ann.lone_exact_search`: 1.8 vs 4.3-5.0 ms over
  20k x 1280).

Results are handed back to the event loop with ``loop.call_soon_threadsafe``; the event loop
never runs model or index code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.ann import set_search_threads

log = logging.getLogger(__name__)

_STOP = object()


class ThreadPolicy:
    """Intra-op (and FAISS) threads of the next batch: ``idle`` for a lone query, ``busy`` otherwise.

    A lone query is a batch of one with nothing queued or being decoded behind it, on a machine
    where other processes leave a core free (``machine_busy``, injectable; :class:`OtherCpu`). Between
    ``busy`` and ``idle`` threads for lone queries it takes the one whose recent latency
    (exponential moving average of the forward pass + search, seconds) is lower, and tries the
    other every ``probe_every`` lone queries, so a machine whose cores are taken by other work
    falls back to one thread (the collapse of the module docstring) and returns when they are free.
    Thread-safe: every inference thread shares one policy.
    """

    def __init__(self, idle: int, busy: int = 1, probe_every: int = 16, alpha: float = 0.25,
                 machine_busy: Callable[[], bool] | None = None) -> None:
        if idle < 1 or busy < 1 or probe_every < 2 or not 0 < alpha <= 1:
            raise ValueError(f"need idle >= 1, busy >= 1, probe_every >= 2, 0 < alpha <= 1; got "
                             f"{idle}, {busy}, {probe_every}, {alpha}")
        self.idle, self.busy, self.probe_every, self.alpha = idle, busy, probe_every, alpha
        self.machine_busy = machine_busy if machine_busy is not None else OtherCpu().busy
        self.ema: dict[int, float] = {}
        self._lone = 0
        self._warmed: set[int] = set()
        self._lock = threading.Lock()

    def choose(self, batch_size: int, others_waiting: bool) -> tuple[int, bool]:
        """(threads, lone) for a batch of ``batch_size`` queries."""
        if batch_size > 1 or others_waiting or self.idle == self.busy or self.machine_busy():
            return self.busy, False
        with self._lock:
            self._lone += 1
            for n in (self.idle, self.busy):
                if n not in self.ema:
                    return n, True  # measure each once first
            best = min((self.idle, self.busy), key=lambda n: self.ema[n])
            if self._lone % self.probe_every == 0:
                return (self.busy if best == self.idle else self.idle), True
            return best, True

    def observe(self, threads: int, seconds: float) -> None:
        """Record a lone query's forward + search time with ``threads`` threads. The first at each
        count is a warm-up and not recorded (a runtime's session or thread pool for that count,
        BLAS libraries loaded: one such 100 ms outlier kept an estimate high for a hundred queries)."""
        with self._lock:
            if threads not in self._warmed:
                self._warmed.add(threads)
                return
            prev = self.ema.get(threads)
            self.ema[threads] = seconds if prev is None else prev + self.alpha * (seconds - prev)


class OtherCpu:
    """Whether other processes hold this machine's cores: the CPU time they used since the last
    reading (at most one reading a second), in cores: the machine's busy time (``/proc/stat``)
    minus this process's own (:func:`time.process_time`, all its threads), over the wall time
    between readings. The 1-minute load average, used before, counts this process's own
    threads too: the client and service of a benchmark at concurrency 1 held it at 1.3-1.6 on
    2 cores, over the old threshold of 1.5, so lone queries never got the second core. Where
    ``/proc/stat`` cannot be read it falls back to the load average.

    ``busy()`` is True when other processes used at least ``cores - 1.5`` cores (2 cores: half a
    core) in the last window (a window over ``3 x period_s`` old, after an idle spell, counts as
    not busy and starts a fresh one: the bench's other servers at concurrency 8 seconds earlier
    kept lone queries on one thread): then a second intra-op thread would share a core with
    them, the collapse of the module docstring. The readers are injectable for tests.
    """

    def __init__(self, cores: int | None = None, *, machine_busy_s: Callable[[], float | None] | None = None,
                 own_s: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic,
                 period_s: float = 1.0) -> None:
        self.cores = cores if cores is not None else (os.cpu_count() or 1)
        self.machine_busy_s = machine_busy_s if machine_busy_s is not None else _machine_busy_seconds
        self.own_s, self.clock, self.period_s = own_s, clock, period_s
        self._last: tuple[float, float, float] | None = None  # (wall, machine busy s, own s)
        self._busy = False
        self.others = 0.0  #: cores used by other processes in the last window

    def busy(self) -> bool:
        now = self.clock()
        if self._last is not None and now - self._last[0] < self.period_s:
            return self._busy
        machine = self.machine_busy_s()
        if machine is None:  # no /proc/stat: the load average, which includes this process
            try:
                self._busy = os.getloadavg()[0] >= max(1, self.cores - 1) + 0.5
            except OSError:
                self._busy = False
            self._last = (now, 0.0, 0.0)
            return self._busy
        own = self.own_s()
        if self._last is not None and now - self._last[0] > 3 * self.period_s:
            # the last reading is old (the service was idle): a window that long describes the
            # past, not now; start a fresh one and trust the latency measurement meanwhile
            self._busy = False
        elif self._last is not None and now > self._last[0]:
            self.others = max(0.0, (machine - self._last[1]) - (own - self._last[2])) / (now - self._last[0])
            self._busy = self.others >= self.cores - 1.5
        self._last = (now, machine, own)
        return self._busy


def _machine_busy_seconds() -> float | None:
    """CPU seconds every core of this machine spent busy since boot (``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is in user)
    return busy / os.sysconf("SC_CLK_TCK")


class Overloaded(Exception):
    """Too many queries are pending; the caller should answer 503 with Retry-After."""


class NotRunning(Exception):
    """The pipeline is not started, failed to start, or is stopping."""


@dataclass(eq=False)
class _Job:
    array: np.ndarray | None       # (3, S, S) float32, or None until ``prepare`` ran
    k: int                         # 0 = embed only
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    vector: np.ndarray | None = field(default=None)
    prepare: Callable[[], np.ndarray] | None = field(default=None)  # run by the inference thread


def _resolve(fut: asyncio.Future, value: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return  # the caller went away
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class Ticket:
    """One admitted query. Use as a context manager; ``release`` is idempotent."""

    def __init__(self, batcher: "MicroBatcher") -> None:
        self._batcher = batcher
        self._incoming = True
        self._released = False

    def _enqueued(self) -> None:
        if self._incoming:
            self._incoming = False
            self._batcher._change(incoming=-1)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._batcher._change(pending=-1, incoming=-1 if self._incoming else 0)
            self._incoming = False

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class QueryTime:
    """Seconds per query of the whole pipeline under load, as an EWMA over batches (thread-safe
    enough: one writer, the inference thread; readers see a whole float).

    A batch that started while other queries were still on their way (admitted, not yet taken
    by the inference thread) is charged the whole interval since the previous batch ended,
    divided by its size: that is the rate at which queries really leave, whatever the bottleneck
    (the forward pass, the decode pool, the event loop parsing uploads, a CPU shared with other
    work). A batch after an idle spell is charged its own busy time. Each sample is capped at
    ``max_jump`` times the estimate, so one slow batch cannot quadruple it at once.

    Measured against it (2-core EPYC, load average 15): the forward pass's busy time alone
    (per batch, times the batches ahead) saw 150 ms where requests waited 1 s, because decoding
    and parsing on a starved CPU took the rest; the service admitted far past its budget.
    """

    ALPHA = 0.2

    def __init__(self, max_jump: float = 4.0) -> None:
        self.seconds = 0.0  #: 0 until the first batch
        self.max_jump = max_jump

    def observe(self, seconds: float, queries: int) -> None:
        """Fold in one batch of ``queries`` that took ``seconds`` (see the class docstring)."""
        x = seconds / max(queries, 1)
        if self.seconds <= 0.0:
            self.seconds = x
            return
        self.seconds += self.ALPHA * (min(x, self.max_jump * self.seconds) - self.seconds)


class MicroBatcher:
    """Runs an :class:`~models.backends.InferenceBackend` and an index search in two threads.

    Args:
        backend_factory: builds the backend; called *in* the inference thread.
        max_batch: most queries per forward pass (1 disables micro-batching).
        wait_ms: longest wait for more queries while others are still being decoded.
        max_pending: queries admitted at once (decode + queue + inference + search).
        max_queue_wait_ms: refuse a query when those already admitted are expected to keep it
            waiting longer than this (0 = by count only); see :meth:`refusal`.
        search_threads: FAISS OpenMP threads of the search thread (and of busy batches).
        idle_threads: threads of a lone query's forward pass and search (see :class:`ThreadPolicy`);
            not above ``busy_threads`` keeps every batch on the backend's own thread count.
        busy_threads: intra-op threads of every other batch (the backend's own count).
        metrics: optional :class:`~service.metrics.ServiceMetrics`.
    """

    def __init__(self, backend_factory: Callable[[], Any], *, max_batch: int = 16, wait_ms: float = 2.0,
                 max_pending: int = 64, max_queue_wait_ms: float = 0.0, search_threads: int = 1,
                 idle_threads: int = 1, busy_threads: int = 1, workers: int = 1, metrics=None) -> None:
        if max_batch < 1 or max_pending < 1 or wait_ms < 0 or search_threads < 1 or max_queue_wait_ms < 0 \
                or workers < 1:
            raise ValueError(
                f"need max_batch >= 1, max_pending >= 1, wait_ms >= 0, max_queue_wait_ms >= 0, search_threads >= 1, "
                f"workers >= 1; got {max_batch}, {max_pending}, {wait_ms}, {max_queue_wait_ms}, {search_threads}, "
                f"{workers}"
            )
        self._factory = backend_factory
        self.max_batch = max_batch
        #: most queries per forward pass as run: ``max_batch``, or 1 where several inference threads
        #: run and a batch measured no cheaper per image than one query (:meth:`_measure_batching`)
        self.batch_cap = max_batch
        #: the start-up measurement behind :attr:`batch_cap` (None: not measured)
        self.batching_measured: dict | None = None
        self.wait_s = wait_ms / 1000.0
        self.max_pending = max_pending
        self.max_wait_s = max_queue_wait_ms / 1000.0
        self.query_time = QueryTime()
        self.search_threads = search_threads
        self.policy = ThreadPolicy(idle=idle_threads, busy=busy_threads) if idle_threads > busy_threads else None
        self.workers = workers  #: inference threads asked for; :attr:`running_workers` says how many run
        self.running_workers = 0
        self.metrics = metrics
        self.backend = None
        self.store = None
        self._queue: queue.Queue = queue.Queue()
        self._search_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._incoming = 0
        self._accepting = False
        self._busy = 0  # inference threads working on a batch
        self._search_s = 0.0  # recent seconds per search call (moving average)
        self._search_held = 0  # forward batches handed to the search thread and not yet searched
        self._loaded_since: float | None = None  # end of the last batch, if queries were on their way then
        self._infer_thread: threading.Thread | None = None
        self._more_infer_threads: list[threading.Thread] = []
        self._helpers_wanted = threading.Event()  # helper inference threads take jobs while set
        self._search_thread: threading.Thread | None = None
        self._backend_ready: concurrent.futures.Future = concurrent.futures.Future()

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> concurrent.futures.Future:
        """Start the inference thread; the returned future gives the built backend (or its error)."""
        if self._infer_thread is not None:
            raise RuntimeError("MicroBatcher already started")
        self._infer_thread = threading.Thread(target=self._infer_main, name="lookalike-infer", daemon=True)
        self._infer_thread.start()
        return self._backend_ready

    def attach_index(self, store) -> None:
        """Start the search thread over ``store`` (an :class:`index.IndexStore`) and accept queries."""
        if self.backend is None:
            raise RuntimeError("attach_index before the backend is ready")
        self.store = store
        if self.policy is not None:
            from index.ann import warm_lone_search

            warm_lone_search()
        self._search_thread = threading.Thread(target=self._search_main, name="lookalike-search", daemon=True)
        self._search_thread.start()
        self._accepting = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish queued work, join the threads."""
        self._accepting = False
        if self._infer_thread is not None:
            for _ in range(1 + len(self._more_infer_threads)):
                self._queue.put(_STOP)
            self._helpers_wanted.set()
            self._infer_thread.join(timeout)
            for t in self._more_infer_threads:
                t.join(timeout)
        if self._search_thread is not None:
            self._search_queue.put(_STOP)
            self._search_thread.join(timeout)
        # anything still queued gets an error rather than hanging forever
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _Job):
                job.loop.call_soon_threadsafe(_resolve, job.future, None, NotRunning("service is stopping"))

    # ---- admission --------------------------------------------------------------------------
    def _change(self, pending: int = 0, incoming: int = 0) -> None:
        with self._lock:
            self._pending += pending
            self._incoming += incoming

    @property
    def pending(self) -> int:
        """Queries admitted and not yet answered."""
        return self._pending

    @property
    def queue_depth(self) -> int:
        """Queries waiting for the inference thread."""
        return self._queue.qsize()

    @property
    def expected_wait_s(self) -> float:
        """Seconds a query admitted now is expected to wait for those already admitted
        (``pending x`` :attr:`QueryTime.seconds`); 0 before the first batch."""
        return self._pending * self.query_time.seconds

    def refusal(self, check_wait: bool = True) -> str | None:
        """Why a query would be refused right now, or None if it would be admitted. O(1), no lock:
        the event loop calls it before reading a request's body (:meth:`admit` decides again).

        A query is always admitted when none is pending, however slow the model.
        ``check_wait=False``: by count only.
        """
        pending = self._pending
        if pending >= self.max_pending:
            return f"{pending} queries pending (limit {self.max_pending})"
        if check_wait and self.max_wait_s > 0 and pending > 0:
            wait = pending * self.query_time.seconds
            if wait > self.max_wait_s:
                return (f"expected queue wait {wait * 1000:.0f} ms is over the budget of "
                        f"{self.max_wait_s * 1000:.0f} ms ({pending} queries pending)")
        return None

    def admit(self, check_wait: bool = True) -> Ticket:
        """Admit one query or raise :class:`Overloaded` (at once, no waiting); see :meth:`refusal`."""
        if not self._accepting:
            raise NotRunning("the model and index are not ready")
        with self._lock:
            why = self.refusal(check_wait)
            if why is not None:
                raise Overloaded(why)
            self._pending += 1
            self._incoming += 1
        return Ticket(self)

    # ---- queries ----------------------------------------------------------------------------
    async def _submit(self, ticket: Ticket, item, k: int, executor, inline: bool = True):
        if not self._accepting:
            raise NotRunning("service is stopping")
        loop = asyncio.get_running_loop()
        job = _Job(array=None, k=k, loop=loop, future=loop.create_future())
        if not callable(item):
            job.array = item
            ticket._enqueued()  # before put: the inference thread must not wait for this very job
            self._put(job)
            return await job.future

        def prepare_and_queue() -> None:
            # Runs in ``executor``; queues the job from here, so the event loop is not woken
            # between decoding and inference (one thread hand-off fewer per query).
            try:
                job.array = item()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                ticket._enqueued()
                loop.call_soon_threadsafe(_resolve, job.future, None, exc)
                return
            ticket._enqueued()
            if not self._accepting:
                loop.call_soon_threadsafe(_resolve, job.future, None, NotRunning("service is stopping"))
                return
            self._put(job)

        if executor is None or (inline and self._idle()):
            # Nothing else for the model to do: the inference thread prepares the input itself,
            # one thread hand-off fewer than going through the decode pool.
            job.prepare = item
            ticket._enqueued()
            self._put(job)
        else:
            executor.submit(prepare_and_queue)
        return await job.future

    def _idle(self) -> bool:
        return self._busy < max(1, self.running_workers) and self._queue.empty() and self._incoming <= 1

    async def search(self, ticket: Ticket, item, k: int, *, executor=None,
                     inline: bool = True) -> tuple[np.ndarray, list]:
        """Embed one image and search it.

        Args:
            item: (3, S, S) float32 from :class:`models.preprocess.Preprocess`, or a zero-argument
                callable returning it (e.g. decode + preprocess), run in ``executor``, or by the
                inference thread itself when it is idle and ``inline`` (pass False for inputs
                slow to prepare, so they never hold up the model).
            k: hits wanted (>= 1).

        Returns:
            ((D,) float32 unit vector, list of at most k ``index.SearchHit``).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return await self._submit(ticket, item, k, executor, inline)

    async def embed(self, ticket: Ticket, item, *, executor=None, inline: bool = True) -> np.ndarray:
        """Embed one image (array or callable, as in :meth:`search`) -> (D,) float32 unit vector."""
        vector, _ = await self._submit(ticket, item, 0, executor, inline)
        return vector

    async def run_in_search_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the search thread (index reads that use FAISS, e.g. search_by_id)."""
        if self._search_thread is None:
            raise NotRunning("the index is not ready")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._search_queue.put((fn, loop, fut))
        return await fut

    # ---- threads ----------------------------------------------------------------------------
    def _infer_main(self) -> None:
        set_search_threads(self.search_threads)  # searches run here when nothing else waits
        try:
            backend = self._factory()
            size = backend.card.image_size
            warm = np.zeros((1, 3, size, size), dtype=np.float32)
            out = backend.embed_array(warm)  # first call allocates; also checks the output
            if out.shape != (1, backend.card.embedding_dim) or not np.isfinite(out).all():
                raise RuntimeError(
                    f"backend self-check failed: output {out.shape}, expected (1, {backend.card.embedding_dim})"
                )
            if self.policy is not None and hasattr(backend, "set_threads"):
                # build the lone-query session now (ONNX Runtime / OpenVINO keep one per count),
                # not on the first user's query
                backend.set_threads(self.policy.idle)
                backend.embed_array(warm)
                backend.set_threads(self.policy.busy)
            self.backend = backend
        except BaseException as exc:  # noqa: BLE001 - reported through the future
            log.error("inference backend failed to start: %s", exc)
            self._backend_ready.set_exception(exc)
            return
        twins = self._fork(backend, warm)
        self.running_workers = 1 + len(twins)
        if twins and self.max_batch > 1:
            try:
                self._measure_batching(backend, size)
            except Exception as exc:  # noqa: BLE001 - a speed decision, never a failed start
                log.warning("could not time batching (%s); batches up to max_batch=%d", exc, self.max_batch)
        self._backend_ready.set_result(backend)
        for i, twin in enumerate(twins, start=2):
            t = threading.Thread(target=self._worker_loop, args=(twin, None, True), name=f"lookalike-infer-{i}",
                                 daemon=True)
            self._more_infer_threads.append(t)
            t.start()
        log.info("inference ready (backend=%s, %d inference thread(s), batches of up to %d, wait_ms=%.1f)",
                 getattr(backend, "name", "?"), self.running_workers, self.batch_cap, self.wait_s * 1000)
        self._worker_loop(backend, self.policy)

    #: The search thread gathers at most this many queries, and waits at most this long, for
    #: queries still in a forward pass (:meth:`_search_main`).
    SEARCH_GATHER_MAX = 8
    SEARCH_GATHER_MAX_S = 0.02

    #: A batch must cost at most this share of one query's time per image for micro-batching to
    #: stay on beside a second inference thread (a core of its own gains ~2x).
    BATCH_GAIN_MIN = 0.9
    #: Batch size and interleaved rounds of :meth:`_measure_batching`.
    BATCH_PROBE = 4
    BATCH_PROBE_ROUNDS = 3

    def _measure_batching(self, backend, size: int) -> None:
        """Time one query and a batch of :data:`BATCH_PROBE` on the busy thread count (interleaved
        rounds, medians) and set :attr:`batch_cap`: 1 when the batch costs more than
        :data:`BATCH_GAIN_MIN` of one query's time per image. Then queries go to the inference
        threads one each, every core running its own. Measured with Lite0 (1 thread, AMD EPYC):
        OpenVINO 18.8 ms for 1 image and 20.8 per image in 8 (AVX2 CPU), 5.2 and 7.8 (bf16 CPU);
        at 8 clients the service without batching answered 56.7-62.0 queries/s against 53.8-57.3
        with it (AVX2). A runtime that gains from batches (torch bf16 on AMX, a GPU) keeps them."""
        one = np.zeros((1, 3, size, size), dtype=np.float32)  # like the warm-up: speed does not depend on it
        many = np.zeros((self.BATCH_PROBE, 3, size, size), dtype=np.float32)
        backend.embed_array(many)  # first call at this shape allocates
        t1, tk = [], []
        for _ in range(self.BATCH_PROBE_ROUNDS):
            t0 = time.perf_counter()
            backend.embed_array(one)
            t1.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            backend.embed_array(many)
            tk.append(time.perf_counter() - t0)
        b1, bk = float(np.median(t1)), float(np.median(tk)) / self.BATCH_PROBE
        ratio = bk / max(b1, 1e-9)
        self.batch_cap = 1 if ratio > self.BATCH_GAIN_MIN else self.max_batch
        self.batching_measured = {"one_ms": round(b1 * 1000, 2), "per_image_in_batch_ms": round(bk * 1000, 2),
                                  "batch": self.BATCH_PROBE, "ratio": round(ratio, 3), "batch_cap": self.batch_cap}
        log.info("batching: 1 image %.2f ms, %.2f ms per image in a batch of %d (%.2fx) -> %s",
                 b1 * 1000, bk * 1000, self.BATCH_PROBE, ratio,
                 "one query per forward pass, one per inference thread" if self.batch_cap == 1
                 else f"batches of up to {self.max_batch}")

    def _fork(self, backend, warm: np.ndarray) -> list[Any]:
        """``workers - 1`` more handles on ``backend`` (:meth:`InferenceBackend.fork`), warmed, for
        the helper threads (which run every batch on the backend's own thread count: lone
        queries go to the first thread); fewer when the backend cannot fork or a fork fails
        (logged: the service runs on the threads it has)."""
        twins = []
        for _ in range(1, self.workers):
            try:
                twin = backend.fork() if hasattr(backend, "fork") else None
                if twin is None:
                    log.info("backend %s runs in one inference thread (inference_workers=%d asked)",
                             getattr(backend, "name", "?"), self.workers)
                    break
                twin.embed_array(warm)
            except Exception as exc:  # noqa: BLE001 - one thread fewer, not a failed start
                log.warning("a second inference thread could not be started (%s); running on %d",
                            exc, 1 + len(twins))
                break
            twins.append(twin)
        return twins

    def _put(self, job: _Job) -> None:
        """Queue ``job`` for the inference threads; wake the helpers if the first one is busy."""
        self._queue.put(job)
        if self._more_infer_threads and (self._busy > 0 or self._queue.qsize() > 1):
            self._helpers_wanted.set()

    def _worker_loop(self, backend, policy: ThreadPolicy | None, helper: bool = False) -> None:
        """One inference thread: take a batch from the shared queue, run it, until ``_STOP``.

        The first thread takes every job it can; a ``helper`` takes jobs only while the first is
        busy (``_helpers_wanted``), so a lone query always runs on the first thread's warm model
        and thread pool (alternating between two handles, each cold, cost the lone path its gain
        from a second core)."""
        if policy is not None and hasattr(backend, "set_threads"):
            backend.set_threads(policy.busy)
        set_search_threads(self.search_threads)
        while True:
            if helper:
                self._helpers_wanted.wait()
                try:
                    first = self._queue.get(timeout=0.02)
                except queue.Empty:
                    if self._busy == 0 and self._queue.empty():
                        self._helpers_wanted.clear()
                    continue
                if first is not _STOP and self._busy == 0 and self._queue.empty():
                    # the first thread came free meanwhile: the job is its (a lone query)
                    self._helpers_wanted.clear()
                    self._queue.put(first)
                    continue
            else:
                first = self._queue.get()
            start = time.monotonic()
            if first is _STOP:
                return
            self._change_busy(+1)
            if not helper and not self._queue.empty() and self._more_infer_threads:
                self._helpers_wanted.set()  # a job queued before this thread counted itself busy
            try:
                batch, stop = self._collect(first)
                batch = self._prepare_inline(batch)
                if batch:
                    self._run_batch(backend, batch, policy)
                    self._observe_batch(start, len(batch))
            finally:
                self._change_busy(-1)
            if stop:
                return

    def _change_busy(self, delta: int) -> None:
        with self._lock:
            self._busy += delta

    def _observe_batch(self, start: float, size: int) -> None:
        """Fold a finished batch into :attr:`query_time`: charged the time since the previous
        batch ended (in any inference thread) when queries were on their way then, else its own."""
        end = time.monotonic()
        with self._lock:
            since = self._loaded_since if self._loaded_since is not None else start
            self.query_time.observe(end - since, size)
            loaded = self._incoming > 0 or not self._queue.empty() or self._busy > 1
            self._loaded_since = end if loaded else None

    def _prepare_inline(self, batch: list[_Job]) -> list[_Job]:
        """Run the ``prepare`` of jobs handed over raw (see :meth:`_submit`); drop those that fail."""
        ready = []
        for j in batch:
            if j.prepare is not None:
                try:
                    j.array = j.prepare()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    j.loop.call_soon_threadsafe(_resolve, j.future, None, exc)
                    continue
                finally:
                    j.prepare = None
            ready.append(j)
        return ready

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` and the jobs batched with it -> (batch, stop seen).

        While other inference threads are free, a thread takes only its share of what is queued
        (rounded up) and does not wait for more: the free threads take the rest, each on its own
        core. With these runtimes a batch costs about as much per image as a single query (Lite0,
        1 thread: OpenVINO 14.1 ms for 1 image, 16.4 per image in 8, on an AVX2 EPYC), so one
        thread running a batch of 2 while another sat idle halved throughput for that batch.
        When every thread is busy the queue is batched up to ``max_batch`` as before."""
        batch = [first]
        deadline = None
        cap = self.batch_cap
        free = max(0, self.running_workers - self._busy)  # other inference threads not in a batch
        if free:
            cap = min(cap, -(-(1 + self._queue.qsize()) // (1 + free)))
        while len(batch) < cap:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                if self.wait_s <= 0 or self._incoming <= 0 or free:
                    break  # nobody else is on the way, or a free thread will take it: no added latency
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.wait_s
                if now >= deadline:
                    break
                try:
                    job = self._queue.get(timeout=min(deadline - now, 0.0005))
                except queue.Empty:
                    continue
            if job is _STOP:
                return [j for j in batch if not j.future.done()], True
            batch.append(job)
        return [j for j in batch if not j.future.done()], False

    def _threads_for(self, backend, batch: list[_Job], policy: ThreadPolicy | None) -> tuple[int, bool]:
        """Set the backend's intra-op threads for ``batch``; returns (threads, lone query). A lone
        query is one with nothing queued or on its way and no other inference thread busy."""
        if policy is None or not hasattr(backend, "set_threads"):
            return 1, False
        others = not self._queue.empty() or self._incoming > 0 or self._busy > 1
        threads, lone = policy.choose(len(batch), others)
        backend.set_threads(threads)
        return threads, lone

    def _run_batch(self, backend, batch: list[_Job], policy: ThreadPolicy | None = None) -> None:
        t0 = time.perf_counter()
        threads, lone = self._threads_for(backend, batch, policy)
        try:
            vectors = backend.embed_array(np.stack([j.array for j in batch]))
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the thread
            log.exception("forward pass failed for a batch of %d", len(batch))
            for j in batch:
                j.loop.call_soon_threadsafe(_resolve, j.future, None, RuntimeError("inference failed"))
            return
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
            self.metrics.inference_seconds.observe(time.perf_counter() - t0)
        to_search: list[int] = []
        for i, j in enumerate(batch):
            j.vector = vectors[i]
            if j.k > 0:
                to_search.append(i)
            else:
                j.loop.call_soon_threadsafe(_resolve, j.future, (vectors[i], None))
        if to_search:
            item = (vectors[to_search], [batch[i] for i in to_search])
            if self._queue.empty() and self._busy <= 1 and not self._search_held:
                # Nobody waits for the model: searching here saves a thread hand-off; under load
                # (or while the search thread holds queries, which this one joins) the search
                # thread takes it so the next forward pass overlaps this search. A lone query
                # searches on the lone query's threads (IndexStore.search).
                self._search_batch(*item, threads=threads if lone else 1)
            else:
                with self._lock:
                    self._search_held += 1
                self._search_queue.put(item)
        if lone:
            policy.observe(threads, time.perf_counter() - t0)

    def _search_main(self) -> None:
        set_search_threads(self.search_threads)
        held = None  # an item taken while gathering a batch, handled next
        while True:
            item, held = (held, None) if held is not None else (self._search_queue.get(), None)
            if item is _STOP:
                return
            if callable(item[0]):
                fn, loop, fut = item
                try:
                    value = fn()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    loop.call_soon_threadsafe(_resolve, fut, None, exc)
                else:
                    loop.call_soon_threadsafe(_resolve, fut, value)
                continue
            # Every forward batch queued behind this one is searched in the same call: an exact
            # search reads the whole index about once per call for a few queries (20k x 1280 on
            # an AVX2 core: 9 ms for 1, 13-14 for 2-3, 20 for 8), so a search thread that falls
            # behind catches up instead of paying the full scan per forward batch. While an
            # inference thread is mid-forward the thread also waits for its queries, up to one
            # recent search's duration (a query that just missed a search would wait that long
            # anyway) and :data:`SEARCH_GATHER_MAX` queries.
            vectors, jobs = [item[0]], list(item[1])
            deadline = time.monotonic() + min(self._search_s, self.SEARCH_GATHER_MAX_S)
            while True:
                try:
                    nxt = self._search_queue.get_nowait()
                except queue.Empty:
                    if len(jobs) >= self.SEARCH_GATHER_MAX or self._busy == 0 or time.monotonic() >= deadline:
                        break
                    try:
                        nxt = self._search_queue.get(timeout=0.0005)
                    except queue.Empty:
                        continue
                if nxt is _STOP or callable(nxt[0]):
                    held = nxt
                    break
                vectors.append(nxt[0])
                jobs.extend(nxt[1])
            self._search_batch(vectors[0] if len(vectors) == 1 else np.concatenate(vectors), jobs)
            with self._lock:
                self._search_held -= len(vectors)

    def _search_batch(self, vectors: np.ndarray, jobs: list[_Job], threads: int = 1) -> None:
        t0 = time.perf_counter()
        try:
            hits = self.store.search(np.ascontiguousarray(vectors, dtype=np.float32), max(j.k for j in jobs),
                                     threads=threads)
        except Exception:  # noqa: BLE001
            log.exception("index search failed for a batch of %d", len(jobs))
            for j in jobs:
                j.loop.call_soon_threadsafe(_resolve, j.future, None, RuntimeError("search failed"))
            return
        took = time.perf_counter() - t0
        self._search_s += 0.2 * (took - self._search_s)  # recent search time (the gathering window)
        if self.metrics is not None:
            self.metrics.search_seconds.observe(took)
        for j, h in zip(jobs, hits):
            j.loop.call_soon_threadsafe(_resolve, j.future, (j.vector, h[: j.k]))
