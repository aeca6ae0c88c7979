"""Helpers shared by the routers."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse

from service.schemas import ErrorResponse
from service.state import ServiceState


_ID = "__image_id__"


def image_url_prefix(request: Request) -> tuple[str, str]:
    """(before, after) the id in an image's URL on this service (relative, proxy-prefix aware)."""
    url = request.scope.get("root_path", "") + request.app.url_path_for("get_image", image_id=_ID)
    before, _, after = url.partition(_ID)
    return before, after


def image_url(request: Request, image_id: int) -> str:
    """Path of an image on this service (relative, so it works behind a proxy prefix)."""
    before, after = image_url_prefix(request)
    return f"{before}{image_id}{after}"


def search_response(request: Request, state: ServiceState, hits: list, k: int, t0: float) -> JSONResponse:
    """The :class:`SearchResponse` JSON, built directly (the hot path skips a second validation)."""
    before, after = image_url_prefix(request)
    body = {
        "results": [{"id": h.id, "score": float(h.score), "path": h.path, "label": h.label,
                     "image_url": f"{before}{h.id}{after}"} for h in hits],
        "k": k,
        "model": state.fingerprint,
        "index": state.store.generation,
        "took_ms": round((time.perf_counter() - t0) * 1000.0, 3),
    }
    return JSONResponse(body)


def errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` entries documenting the error shape for ``statuses``."""
    return {s: {"model": ErrorResponse} for s in statuses}
