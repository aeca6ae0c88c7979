"""The service's runtime: model backend, index, worker threads, readiness.

One :class:`ServiceState` lives on ``app.state.lookalike``; the lifespan starts and stops it.
Threads, each with a deliberate thread count:

* ``lookalike-infer`` builds and runs the backend (torch / ONNX Runtime intra-op threads =
  ``inference_threads``), see :mod:`service.batching`;
* ``lookalike-search`` runs FAISS searches (``search_threads`` OpenMP threads);
* ``lookalike-decode-*`` (``decode_threads``) decode and preprocess uploads;
* ``lookalike-write`` (one) applies adds, deletes and checkpoints in order, so each write is
  durable before its 2xx.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from models.decode import DecodeLimits
from service.batching import MicroBatcher, NotRunning, Overloaded, Ticket
from service.errors import ApiError, insufficient_storage, unavailable
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.storage import MiB, StorageGuard, is_disk_full
from service.uploads import decode_to_input

log = logging.getLogger(__name__)

#: Uploads up to this size may be decoded by an idle inference thread itself (one hand-off
#: fewer); larger ones always go to the decode pool so a slow decode never holds up the model.
INLINE_DECODE_MAX_BYTES = 1024 * 1024

BackendFactory = Callable[[], Any]
IndexOpener = Callable[[Any, bool], Any]  # (card, writable) -> IndexStore


def resolve_backend_name(settings: Settings) -> str:
    """``torch`` or ``onnx`` for ``settings.backend``. ``auto`` (by measurement, bench_service.py):

    * torch with bf16 autocast on CPUs with native bf16 (AVX512-BF16 / AMX): it embeds exactly
      like ``lookalike index build`` (torch, bf16 when supported), its batched forward is the
      cheapest per image (3.7 ms at batch 8 vs 5.1 for ONNX Runtime), and under 8 clients it
      served as many queries as ONNX Runtime (6 interleaved head-to-head runs: -1.5% to +13%,
      median +2%). ONNX Runtime answers a lone client faster (p50 12.6 vs 17.3 ms): choose it
      with ``LOOKALIKE_BACKEND=onnx`` when latency at low load matters most.
    * otherwise ONNX Runtime when the model has an ONNX export (faster than torch fp32 at batch
      1 and 8: 6.2 vs 12.2 ms, 40.4 vs 47.8 ms), and always when torch is not installed;
    * otherwise torch.
    """
    if settings.backend != "auto":
        return settings.backend
    import importlib.util

    from models.backends import ONNX_FILE
    from models.io import resolve_model_dir

    has_onnx = (resolve_model_dir(settings.model_dir) / ONNX_FILE).is_file()
    if importlib.util.find_spec("torch") is None:
        return "onnx"
    from models.backends import bf16_supported

    if settings.bf16 is not False and bf16_supported():
        return "torch"
    return "onnx" if has_onnx else "torch"


def default_backend_factory(settings: Settings) -> BackendFactory:
    """A factory building the configured backend; it runs inside the inference thread."""

    def build():
        from models.backends import load_backend

        name = resolve_backend_name(settings)
        if name == "torch":
            import torch

            # Intra-op threads of the thread that runs the forward passes; inter-op parallelism
            # is never useful for one CNN forward and only oversubscribes the cores.
            torch.set_num_threads(settings.inference_threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # already set once in this process
                pass
            return load_backend(settings.model_dir, "torch", bf16=settings.bf16)
        return load_backend(settings.model_dir, "onnx", threads=settings.inference_threads)

    return build


def default_index_opener(settings: Settings) -> IndexOpener:
    def open_index(card, writable: bool):
        from index import IndexStore

        return IndexStore.open(settings.index_dir, card=card, writable=writable, images_root=settings.images_root)

    return open_index


class ServiceState:
    """Model backend + index + threads of one app. ``ready`` once loaded and verified."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, *,
                 backend_factory: BackendFactory | None = None, index_opener: IndexOpener | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._backend_factory = backend_factory
        self._index_opener = index_opener
        self.limits = DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                                   max_side=settings.max_side,
                                   max_full_pixels=settings.max_full_decode_pixels)
        self.batcher: MicroBatcher | None = None
        self.store = None
        self.backend = None
        self.card = None
        self.ready = False
        self.error: str | None = None
        self.stopping = False
        self.shutdown_error: str | None = None  #: why the shutdown checkpoint failed, if it did
        self.decode_pool: ThreadPoolExecutor | None = None
        self.write_pool: ThreadPoolExecutor | None = None
        self._writes_since_checkpoint = 0
        self._dirty = False
        self.storage: StorageGuard | None = None
        self._checkpoint_failures = 0
        self._checkpoint_not_before = 0.0  # time.monotonic() before which no periodic checkpoint is tried
        self._load_task: asyncio.Task | None = None
        self._refresh_task: asyncio.Task | None = None
        metrics.bind(
            queue_depth=lambda: self.batcher.queue_depth if self.batcher else 0,
            pending=lambda: self.batcher.pending if self.batcher else 0,
            index_size=lambda: len(self.store) if self.store is not None else 0,
        )

    @property
    def writable(self) -> bool:
        return self.settings.writes_enabled

    @property
    def writes_available(self) -> bool:
        """Writes enabled and the index volume above the free-space guard (checked now)."""
        return self.writable and (self.storage is None or not self.storage.low())

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "name", "") or "unknown"

    @property
    def fingerprint(self) -> str:
        return self.card.fingerprint if self.card is not None else ""

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and verify the model and index (in the background if configured)."""
        if self.settings.load_in_background:
            self._load_task = asyncio.create_task(self._load_reporting())
        else:
            await self._load()

    async def _load_reporting(self) -> None:
        try:
            await self._load()
        except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("loading failed; the service stays unready: %s", self.error)

    async def _load(self) -> None:
        s = self.settings
        if self._backend_factory is None:
            if s.model_dir is None:
                raise RuntimeError("LOOKALIKE_MODEL_DIR is not set: point it at a model or training-run directory")
            self._backend_factory = default_backend_factory(s)
        if self._index_opener is None:
            if s.index_dir is None:
                raise RuntimeError("LOOKALIKE_INDEX_DIR is not set: point it at an index directory")
            self._index_opener = default_index_opener(s)
        t0 = time.perf_counter()
        self.decode_pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="lookalike-decode")
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="lookalike-write",
                                             initializer=_limit_faiss_threads, initargs=(1,))
        self.batcher = MicroBatcher(self._backend_factory, max_batch=s.max_batch, wait_ms=s.batch_wait_ms,
                                    max_pending=s.max_pending, max_queue_wait_ms=s.max_queue_wait_ms,
                                    search_threads=s.search_threads,
                                    metrics=self.metrics)
        self.backend = await asyncio.wrap_future(self.batcher.start())
        self.card = self.backend.card
        loop = asyncio.get_running_loop()
        self.store = await loop.run_in_executor(self.write_pool, self._index_opener, self.card, self.writable)
        if self.store.dim != self.card.embedding_dim:
            raise RuntimeError(f"index dimension {self.store.dim} != model embedding_dim {self.card.embedding_dim}")
        if self.store.fingerprint != self.card.fingerprint:
            raise RuntimeError("index was built with another model (fingerprints differ)")
        self.batcher.attach_index(self.store)
        self.storage = StorageGuard(getattr(self.store, "directory", s.index_dir or "."), int(s.min_free_mb * MiB))
        # End-to-end self-check: one query through the real pipeline.
        size = self.card.image_size
        with self.batcher.admit() as ticket:
            vector, hits = await self.batcher.search(ticket, np.zeros((3, size, size), np.float32), 1)
        if vector.shape != (self.card.embedding_dim,) or abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
            raise RuntimeError(f"self-check failed: query vector shape {vector.shape}, norm {np.linalg.norm(vector)}")
        if len(self.store) > 0 and not hits:
            raise RuntimeError("self-check failed: a non-empty index returned no hit")
        self.ready = True
        self.metrics.ready.set(1)
        if not self.writable and s.refresh_interval_s > 0:
            self._refresh_task = asyncio.create_task(self._refresh_loop(s.refresh_interval_s))
        log.info("ready in %.1fs: backend=%s, model=%s…, index size=%d, generation=%d, writable=%s",
                 time.perf_counter() - t0, self.backend_name, self.fingerprint[:12], len(self.store),
                 self.store.generation, self.writable)

    async def _refresh_loop(self, interval_s: float) -> None:
        """Read-only server: apply adds/deletes another process (a batch job, a writer) committed.

        Runs on the write thread, so it never blocks the event loop; searches keep going (the
        index applies a change under its write lock, so each search sees it whole or not at all).
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            try:
                changed = await loop.run_in_executor(self.write_pool, self.store.refresh)
            except Exception as exc:  # noqa: BLE001 - keep serving the last good state
                log.warning("index refresh failed (still serving the previous state): %s", exc)
                continue
            if changed:
                log.info("index refreshed: %s ids changed, size %d", "all" if changed < 0 else changed, len(self.store))

    async def stop(self) -> None:
        """Stop taking queries, finish in-flight work, checkpoint writes, release the index lock."""
        self.ready = False
        self.stopping = True
        self.metrics.ready.set(0)
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.decode_pool is not None:  # decodes finish (and queue their jobs) before the batcher stops
            await asyncio.to_thread(self.decode_pool.shutdown, True)
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop)
        if self.store is not None and self.write_pool is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.write_pool, self._close_store)
        if self.write_pool is not None:
            self.write_pool.shutdown(wait=True)

    def _close_store(self) -> None:
        try:
            if self.writable and self._dirty:
                gen = self.store.checkpoint()
                log.info("checkpointed index generation %d at shutdown", gen)
        except Exception as exc:  # noqa: BLE001 - writes stay durable in the index log; reported
            self.shutdown_error = f"{type(exc).__name__}: {exc}"
            log.error("shutdown checkpoint failed (acknowledged writes stay in the index log): %s", exc)
        finally:
            self.store.close()

    # ---- used by the routes -----------------------------------------------------------------
    def require_ready(self) -> None:
        if not self.ready:
            reason = "service is stopping" if self.stopping else "model and index are loading"
            if self.error:
                reason = "model or index failed to load; see the server log"
            raise unavailable(f"not ready: {reason}", self.settings.retry_after_s)

    def refusal(self) -> str | None:
        """Why a query would be refused as overloaded right now, or None (O(1), for the check made
        before a request's body is read; counted in ``lookalike_rejected``). Not ready: None, the
        route answers that 503 itself."""
        if not self.ready or self.batcher is None:
            return None
        why = self.batcher.refusal()
        if why is not None:
            self.metrics.rejected.labels("overloaded").inc()
        return why

    def admit(self, *, same_request: bool = False) -> Ticket:
        """Admit one query or answer 503 (overloaded / not running) at once. ``same_request``: one
        more image of a request already admitted (checked by count only, not by queue wait)."""
        self.require_ready()
        try:
            return self.batcher.admit(check_wait=not same_request)
        except Overloaded as exc:
            self.metrics.rejected.labels("overloaded").inc()
            raise unavailable(f"overloaded: {exc}; retry shortly", self.settings.retry_after_s) from None
        except NotRunning:
            raise unavailable("not ready", self.settings.retry_after_s) from None

    def _prepare(self, data: bytes) -> Callable[[], np.ndarray]:
        """Decode + preprocess ``data`` -> (3, S, S) float32; runs in the decode pool.
        Raises ImageDecodeError (mapped to 400/413/415)."""

        def prepare() -> np.ndarray:
            t0 = time.perf_counter()
            try:
                return decode_to_input(data, self.backend.preprocess, self.limits, self.settings.jpeg_draft)
            finally:
                self.metrics.decode_seconds.observe(time.perf_counter() - t0)

        return prepare

    async def search_upload(self, ticket: Ticket, data: bytes, k: int) -> list:
        """Decode, embed and search an uploaded image -> at most ``k`` hits."""
        _, hits = await self.batcher.search(ticket, self._prepare(data), k, executor=self.decode_pool,
                                            inline=len(data) <= INLINE_DECODE_MAX_BYTES)
        return hits

    async def embed_upload(self, ticket: Ticket, data: bytes) -> np.ndarray:
        """Decode and embed an uploaded image -> (D,) float32 unit vector."""
        return await self.batcher.embed(ticket, self._prepare(data), executor=self.decode_pool,
                                        inline=len(data) <= INLINE_DECODE_MAX_BYTES)

    async def search_thread(self, fn: Callable[[], Any]) -> Any:
        try:
            return await self.batcher.run_in_search_thread(fn)
        except NotRunning:
            raise unavailable("not ready", self.settings.retry_after_s) from None

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a cheap index read (metadata) off the event loop."""
        return await asyncio.to_thread(fn, *args)

    async def write(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(store)`` in the single writer thread; returns once it is durable.

        Raises:
            ApiError: 403 read-only; 507 while the index volume is under the free-space guard,
                or when the write itself hit a full disk (nothing was acknowledged then).
        """
        if not self.writable:
            raise ApiError(403, "writes_disabled", "this service is read-only")
        if self.storage is not None and self.storage.low():
            self.metrics.rejected.labels("disk_full").inc()
            raise insufficient_storage(self.storage.message())
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.write_pool, self._write, fn)

    def _write(self, fn: Callable[[Any], Any]) -> Any:
        try:
            result = fn(self.store)
        except Exception as exc:
            if is_disk_full(exc):
                log.warning("write refused, disk full: %s", exc)
                self.metrics.rejected.labels("disk_full").inc()
                raise insufficient_storage(self.storage.message() if self.storage is not None else
                                           "the index volume is full; free space there and retry") from None
            raise
        self._dirty = True
        self._writes_since_checkpoint += 1
        self._maybe_checkpoint()
        return result

    def _maybe_checkpoint(self) -> None:
        """Periodic checkpoint after ``checkpoint_every`` writes. A failed one is not retried on
        every following write (that was a storm of full index saves on a full disk): it waits
        5 s, 10 s, 20 s ... up to 5 min, and not at all while the volume is under the guard."""
        every = self.settings.checkpoint_every
        if not every or self._writes_since_checkpoint < every:
            return
        if time.monotonic() < self._checkpoint_not_before:
            return
        if self.storage is not None and self.storage.low():
            self._checkpoint_not_before = time.monotonic() + 5.0
            return
        try:
            gen = self.store.checkpoint()
        except Exception as exc:  # noqa: BLE001 - the write itself is durable in the index log already
            self._checkpoint_failures += 1
            wait = min(300.0, 5.0 * 2 ** (self._checkpoint_failures - 1))
            self._checkpoint_not_before = time.monotonic() + wait
            log.error("checkpoint failed (%s: %s); writes stay durable in the index log; next try in %.0f s",
                      type(exc).__name__, exc, wait)
            return
        self._writes_since_checkpoint = 0
        self._dirty = False
        self._checkpoint_failures = 0
        self._checkpoint_not_before = 0.0
        log.info("checkpointed index generation %d after %d writes", gen, every)


def _limit_faiss_threads(n: int) -> None:
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass

