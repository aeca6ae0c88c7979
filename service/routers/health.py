"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import ReadyDep, StateDep
from service.routers.common import errors
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Readiness: model and index loaded and verified",
            responses=errors(503))
async def readyz(state: ReadyDep) -> Readiness:
    return Readiness(status="ready", model=state.fingerprint, backend=state.backend_name,
                     index_size=len(state.store), generation=state.store.generation,
                     writable=state.writes_available)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
