"""Helpers shared by the routers."""

from __future__ import annotations

import time

from fastapi import Request

from service.schemas import ErrorResponse, SearchResponse, SearchResult
from service.state import ServiceState


def image_url(request: Request, image_id: int) -> str:
    """Path of an image on this service (relative, so it works behind a proxy prefix)."""
    return request.scope.get("root_path", "") + request.app.url_path_for("get_image", image_id=str(image_id))


def search_response(request: Request, state: ServiceState, hits: list, k: int, t0: float) -> SearchResponse:
    return SearchResponse(
        results=[
            SearchResult(id=h.id, score=float(h.score), path=h.path, label=h.label,
                         image_url=image_url(request, h.id))
            for h in hits
        ],
        k=k,
        model=state.fingerprint,
        index=state.store.generation,
        took_ms=round((time.perf_counter() - t0) * 1000.0, 3),
    )


def errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` entries documenting the error shape for ``statuses``."""
    return {s: {"model": ErrorResponse} for s in statuses}
