"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.deps import ReadyDep, StateDep
from service.errors import unavailable
from service.routers.common import collection_status, errors
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness,
            summary="Readiness: every collection's model and index loaded and verified", responses=errors(503))
async def readyz(request: Request, state: ReadyDep) -> Readiness:
    """The default collection's figures, and every collection's state; 503 until all are ready."""
    registry = request.app.state.collections
    waiting = [name for name, s in registry.states.items() if not s.ready]
    if waiting:
        raise unavailable(f"not ready: collections {waiting} are not loaded (GET /v1/collections says why)",
                          state.settings.retry_after_s)
    return Readiness(status="ready", model=state.fingerprint, backend=state.backend_name,
                     index_size=len(state.store), generation=state.store.generation,
                     writable=state.writes_available,
                     collections=[collection_status(s) for s in registry.states.values()],
                     inference=_inference(state))


def _inference(state) -> dict | None:
    """What :class:`service.batching.MicroBatcher` settled on at start-up (None without one)."""
    b = state.batcher
    if b is None:
        return None
    return {"workers": b.running_workers, "batch_cap": b.batch_cap, "batching_measured": b.batching_measured}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
