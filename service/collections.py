"""Several named collections in one server: each an index with the model that embeds its queries.

The default collection is ``LOOKALIKE_INDEX_DIR`` with ``LOOKALIKE_MODEL_DIR``; the single-index
routes (``/v1/search``, ``/v1/images/...``) serve it, and so does ``/v1/collections/default/...``.
``LOOKALIKE_COLLECTIONS`` adds named ones, served under ``/v1/collections/{name}/...`` with the same
routes. Each collection has its own index directory, writer thread, free-space guard, refresh
loop and readiness; collections whose models resolve to the same directory share one loaded
model (one :class:`~service.state.ModelRuntime`: one inference thread, one search thread, one
admission bound), and every collection shares the decode pool.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.errors import ApiError
from service.metrics import ServiceMetrics
from service.settings import COLLECTION_NAME, DEFAULT_COLLECTION, Settings
from service.state import BackendFactory, IndexOpener, ModelRuntime, ServiceState, default_backend_factory

log = logging.getLogger(__name__)


def _model_key(model_dir: Path | None) -> str:
    """One key per model on disk, so two spellings of the same directory share one runtime."""
    if model_dir is None:
        return ""
    from models.io import resolve_model_dir

    try:
        return str(resolve_model_dir(model_dir).resolve())
    except FileNotFoundError:  # reported when the collection loads
        return str(Path(model_dir).resolve())


class Collections:
    """The collections of one app: name -> :class:`ServiceState`, their model runtimes, and
    their start / stop order.

    Args:
        backend_factory: builds the default model's backend (tests inject one); None loads
            ``settings.model_dir`` with ``settings.backend``. Other models always load from disk.
        index_opener: opens the default collection's index; None opens ``settings.index_dir``.
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics, *, backend_factory: BackendFactory | None = None,
                 index_opener: IndexOpener | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtimes: dict[str, ModelRuntime] = {}
        self.states: dict[str, ServiceState] = {}
        self.decode_pool: ThreadPoolExecutor | None = None
        self._load_task: asyncio.Task | None = None
        default_key = _model_key(settings.model_dir)
        if backend_factory is not None:
            self.runtimes[default_key] = ModelRuntime(backend_factory, settings, metrics)
        specs = [(DEFAULT_COLLECTION, settings.model_dir, settings.index_dir, settings.images_root)]
        specs += [(name, c.model_dir or settings.model_dir, c.index_dir, c.images_root)
                  for name, c in settings.collections.items()]
        for name, model_dir, index_dir, images_root in specs:
            key = _model_key(model_dir)
            if key not in self.runtimes:
                self.runtimes[key] = ModelRuntime(self._backend_factory(model_dir), settings, metrics)
            self.states[name] = ServiceState(
                settings, metrics, self.runtimes[key], name=name, index_dir=index_dir, images_root=images_root,
                index_opener=index_opener if name == DEFAULT_COLLECTION else None)
        default = self.default
        metrics.bind(
            queue_depth=lambda: default.batcher.queue_depth if default.batcher else 0,
            pending=lambda: default.batcher.pending if default.batcher else 0,
            index_size=lambda: len(default.store) if default.store is not None else 0,
            ready=lambda: 1 if self.ready else 0,
        )
        for name, state in self.states.items():
            metrics.bind_collection(name, ready=lambda s=state: 1 if s.ready else 0,
                                    index_size=lambda s=state: len(s.store) if s.store is not None else 0)

    def _backend_factory(self, model_dir: Path | None) -> BackendFactory:
        if model_dir is None:
            def missing():
                raise RuntimeError("LOOKALIKE_MODEL_DIR is not set: point it at a model or training-run directory")
            return missing
        return default_backend_factory(self.settings, model_dir)

    @property
    def default(self) -> ServiceState:
        return self.states[DEFAULT_COLLECTION]

    @property
    def ready(self) -> bool:
        """Every collection is loaded and verified."""
        return all(s.ready for s in self.states.values())

    def _first(self, attr: str) -> str | None:
        """The first collection's ``attr`` message that is set, naming it unless it is the default."""
        for name, s in self.states.items():
            message = getattr(s, attr)
            if message:
                return message if name == DEFAULT_COLLECTION else f"collection {name!r}: {message}"
        return None

    @property
    def error(self) -> str | None:
        """Why a collection failed to load (the first one)."""
        return self._first("error")

    @property
    def shutdown_error(self) -> str | None:
        """Why a collection's shutdown checkpoint failed (the first one), if one did."""
        return self._first("shutdown_error")

    def get(self, name: str | None) -> ServiceState:
        """The collection called ``name`` (None = the default).

        Raises:
            ApiError: 404 ``collection_not_found`` naming the collections served.
        """
        if name is None:
            return self.default
        state = self.states.get(name) if COLLECTION_NAME.fullmatch(name) else None
        if state is None:
            shown = name if len(name) <= 64 else name[:64] + "…"
            raise ApiError(404, "collection_not_found",
                           f"no collection {shown!r}; this server has {sorted(self.states)}")
        return state

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and verify every collection (in the background if configured). In the
        foreground the first failure stops the start-up; in the background a failed collection
        stays unready (503, its error on ``/readyz``) and the others serve."""
        s = self.settings
        self.decode_pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="lookalike-decode")
        for state in self.states.values():
            state.decode_pool = self.decode_pool
        if s.load_in_background:
            self._load_task = asyncio.create_task(self._load_all(raise_errors=False))
        else:
            await self._load_all(raise_errors=True)

    async def _load_all(self, *, raise_errors: bool) -> None:
        for name, state in self.states.items():  # one at a time: the default first, models load once
            try:
                await state.load()
            except Exception as exc:
                state.error = f"{type(exc).__name__}: {exc}"
                if raise_errors:
                    raise
                log.error("collection %s failed to load; it stays unready: %s", name, state.error)
            except BaseException as exc:  # cancelled while loading (a stop during start-up)
                state.error = f"{type(exc).__name__}: {exc}"
                raise
        freeze_startup_objects()


    async def stop(self) -> None:
        """Stop taking queries, finish in-flight work, checkpoint writes, release the index locks."""
        for state in self.states.values():
            state.begin_stop()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.decode_pool is not None:  # decodes finish (and queue their jobs) before the batchers stop
            await asyncio.to_thread(self.decode_pool.shutdown, True)
        for runtime in self.runtimes.values():
            await asyncio.to_thread(runtime.stop)
        for state in self.states.values():
            await state.close()
        gc.unfreeze()  # what start-up froze is collectable again (an app stopped in a longer-lived process)


def freeze_startup_objects() -> int:
    """Move every object alive now (the loaded model, torch, FastAPI, the index's Python side:
    about 400k objects) out of the cyclic garbage collector's reach (:func:`gc.freeze`); returns
    how many. They live as long as the process, and a full collection walking them held the GIL
    ~200 ms about every 10 s under load (measured: 2-core EPYC, 8x overload), stalling the event
    loop and every request then in flight; after the freeze a full collection walks only what
    the requests created. Reference counting still frees frozen objects that are released;
    :meth:`Collections.stop` unfreezes, so an app stopped inside a longer-lived process (tests, an
    embedding application) leaves nothing uncollectable behind."""
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the cyclic garbage collector", n)
    return n
