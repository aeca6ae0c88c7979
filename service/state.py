"""The service's runtime: model backends, indexes, worker threads, readiness.

One :class:`ServiceState` per collection (an index and the model that embeds its queries; the
default collection lives on ``app.state.lookalike``), one :class:`ModelRuntime` per distinct
model, shared by the collections that use it; :mod:`service.collections` starts and stops them.
Threads, each with a deliberate thread count:

* ``lookalike-infer`` builds and runs the backend (torch / ONNX Runtime intra-op threads =
  ``inference_threads``), see :mod:`service.batching`; one per model;
* ``lookalike-search`` runs FAISS searches (``search_threads`` OpenMP threads); one per model;
* ``lookalike-decode-*`` (``decode_threads``) decode and preprocess uploads; one pool per server;
* ``lookalike-write`` (one per collection) applies adds, deletes and checkpoints in order, so
  each write is durable before its 2xx.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from index.ann import set_search_threads
from models.decode import DecodeLimits
from service.batching import MicroBatcher, NotRunning, Overloaded, Ticket
from service.errors import ApiError, insufficient_storage, unavailable
from service.metrics import ServiceMetrics
from service.settings import DEFAULT_COLLECTION, Settings
from service.storage import MiB, StorageGuard, is_disk_full
from service.uploads import decode_to_input

log = logging.getLogger(__name__)

#: Uploads up to this size may be decoded by an idle inference thread itself (one hand-off
#: fewer); larger ones always go to the decode pool so a slow decode never holds up the model.
INLINE_DECODE_MAX_BYTES = 1024 * 1024

BackendFactory = Callable[[], Any]
IndexOpener = Callable[[Any, bool], Any]  # (card, writable) -> IndexStore


def resolve_backend_name(settings: Settings, model_dir: Path | None = None) -> str:
    """``torch``, ``onnx`` or ``openvino`` for ``settings.backend`` and the model in ``model_dir``
    (None = ``settings.model_dir``).

    ``auto`` is measured, not guessed (:func:`models.backend_choice.choose_backend`): each
    available runtime embeds a batch of 1 and of 8 on this CPU, and the fastest wins. The
    measurement is saved beside the model (``lookalike export`` takes it), so a start on the
    same machine reuses it; another CPU, an ISA limit or another runtime version measures again
    (a few seconds at start-up). Every candidate is measured, and ``auto`` runs, in fp32; set
    ``LOOKALIKE_BF16=true`` for torch's bf16 autocast.
    """
    if settings.backend != "auto":
        return settings.backend
    from models.backend_choice import choose_backend

    return choose_backend(model_dir or settings.model_dir)


def default_backend_factory(settings: Settings, model_dir: Path | None = None) -> BackendFactory:
    """A factory building the configured backend of ``model_dir`` (None = ``settings.model_dir``);
    it runs inside the inference thread."""
    model_dir = model_dir or settings.model_dir

    def build():
        from models.backends import load_backend

        name = resolve_backend_name(settings, model_dir)
        if name == "torch":
            import torch

            # Intra-op threads of the thread that runs the forward passes; inter-op parallelism
            # is never useful for one CNN forward and only oversubscribes the cores.
            torch.set_num_threads(settings.inference_threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # already set once in this process
                pass
            # auto means fp32 (bf16 changes 3% of top-10 neighbours, see models.backend_choice);
            # LOOKALIKE_BACKEND=torch keeps bf16 where the CPU has it, LOOKALIKE_BF16 decides either way
            bf16 = False if settings.backend == "auto" and settings.bf16 is None else settings.bf16
            return load_backend(model_dir, "torch", bf16=bf16)
        return load_backend(model_dir, name, threads=settings.inference_threads)

    return build


def default_index_opener(index_dir: Path, images_root: Path | None) -> IndexOpener:
    def open_index(card, writable: bool):
        from index import IndexStore

        return IndexStore.open(index_dir, card=card, writable=writable, images_root=images_root)

    return open_index


class ModelRuntime:
    """One model, loaded once and shared by every collection that serves it: the micro-batcher
    whose inference thread builds and runs the backend, and whose search thread runs FAISS.
    Admission (``max_pending``) is per model, so collections sharing one share its bound."""

    def __init__(self, backend_factory: BackendFactory, settings: Settings, metrics: ServiceMetrics) -> None:
        self.batcher = MicroBatcher(backend_factory, max_batch=settings.max_batch, wait_ms=settings.batch_wait_ms,
                                    max_pending=settings.max_pending, max_queue_wait_ms=settings.max_queue_wait_ms,
                                    search_threads=settings.search_threads, idle_threads=settings.idle_thread_count,
                                    busy_threads=settings.inference_threads,
                                    workers=settings.inference_worker_count, metrics=metrics)
        self._loading: asyncio.Future | None = None

    async def load(self) -> Any:
        """The backend, built by the first caller; later callers wait for the same one."""
        if self._loading is None:
            self._loading = asyncio.wrap_future(self.batcher.start())
        return await asyncio.shield(self._loading)

    def stop(self) -> None:
        """Stop taking queries, finish the queued ones, join the threads (blocking)."""
        self.batcher.stop()


class ServiceState:
    """One collection: its index, the shared model runtime embedding its queries, its writer
    thread. ``ready`` once loaded and verified. The routes use one of these per request.

    Args:
        runtime: the model's runtime (shared with the other collections of the same model).
        name: the collection's name (``default`` for ``LOOKALIKE_INDEX_DIR``).
        index_opener: ``(card, writable) -> IndexStore``; None opens ``index_dir``.
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics, runtime: ModelRuntime, *,
                 name: str = DEFAULT_COLLECTION, index_dir: Path | None = None, images_root: Path | None = None,
                 index_opener: IndexOpener | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime = runtime
        self.name = name
        self.index_dir = index_dir
        self.images_root = images_root
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
        self._refresh_task: asyncio.Task | None = None

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

    # ---- lifecycle (driven by service.collections.Collections) -------------------------------
    async def load(self) -> None:
        """Load the model (or wait for the collection that shares it) and the index, verify them
        together, and become ready. ``decode_pool`` must be set first (the server's pool)."""
        s = self.settings
        if self._index_opener is None:
            if self.index_dir is None:
                raise RuntimeError("LOOKALIKE_INDEX_DIR is not set: point it at an index directory")
            self._index_opener = default_index_opener(self.index_dir, self.images_root)
        t0 = time.perf_counter()
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="lookalike-write",
                                             initializer=set_search_threads, initargs=(1,))
        self.batcher = self.runtime.batcher
        self.backend = await self.runtime.load()
        self.card = self.backend.card
        loop = asyncio.get_running_loop()
        self.store = await loop.run_in_executor(self.write_pool, self._index_opener, self.card, self.writable)
        if self.store.dim != self.card.embedding_dim:
            raise RuntimeError(f"index dimension {self.store.dim} != model embedding_dim {self.card.embedding_dim}")
        if self.batcher.store is None:  # the first collection of this model takes the batched search path
            self.batcher.attach_index(self.store)
        self.storage = StorageGuard(getattr(self.store, "directory", self.index_dir or "."), int(s.min_free_mb * MiB))
        # End-to-end self-check: one query through the real pipeline.
        size = self.card.image_size
        with self.batcher.admit() as ticket:
            vector, hits = await self._search(ticket, np.zeros((3, size, size), np.float32), 1)
        if vector.shape != (self.card.embedding_dim,) or abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
            raise RuntimeError(f"self-check failed: query vector shape {vector.shape}, norm {np.linalg.norm(vector)}")
        if len(self.store) > 0 and not hits:
            raise RuntimeError("self-check failed: a non-empty index returned no hit")
        self.ready = True
        if not self.writable and s.refresh_interval_s > 0:
            self._refresh_task = asyncio.create_task(self._refresh_loop(s.refresh_interval_s))
        log.info("collection %s ready in %.1fs: backend=%s, model=%s…, index size=%d, generation=%d, writable=%s",
                 self.name, time.perf_counter() - t0, self.backend_name, self.fingerprint[:12], len(self.store),
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

    def begin_stop(self) -> None:
        """Stop taking queries (503 from now on) and following other writers."""
        self.ready = False
        self.stopping = True
        if self._refresh_task is not None:
            self._refresh_task.cancel()

    async def close(self) -> None:
        """Once no query runs any more: checkpoint writes, release the index lock."""
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
            what = "not ready" if self.name == DEFAULT_COLLECTION else f"collection {self.name!r} not ready"
            raise unavailable(f"{what}: {reason}", self.settings.retry_after_s)

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

    async def _search(self, ticket: Ticket, item, k: int, *, executor=None,
                      inline: bool = True) -> tuple[np.ndarray, list]:
        """Embed ``item`` (as :meth:`MicroBatcher.search` takes it) and search this collection's
        index -> ((D,) float32 unit vector, at most ``k`` hits). The collection whose index the
        model's batcher holds uses its batched search; the others search in its search thread."""
        if self.batcher.store is self.store:
            return await self.batcher.search(ticket, item, k, executor=executor, inline=inline)
        vector = await self.batcher.embed(ticket, item, executor=executor, inline=inline)
        (hits,) = await self.search_thread(lambda: self.store.search(vector[None, :], k))
        return vector, hits

    async def search_upload(self, ticket: Ticket, data: bytes, k: int) -> list:
        """Decode, embed and search an uploaded image -> at most ``k`` hits."""
        _, hits = await self._search(ticket, self._prepare(data), k, executor=self.decode_pool,
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
