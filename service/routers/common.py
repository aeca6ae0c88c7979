"""Helpers shared by the routers."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from service.errors import ApiError
from service.schemas import CollectionStatus, ErrorResponse
from service.settings import Settings
from service.state import ServiceState
from service.uploads import parse_k, parse_label


_ID = "__image_id__"


def admits_queries(endpoint):
    """Mark a route whose handler admits an inference query (``state.admit()``) as soon as it
    starts: under overload the service then answers it 503 before reading its body
    (:class:`service.middleware.EarlyAdmissionMiddleware`). Put it under ``@router.post(...)``."""
    endpoint.admits_queries = True
    return endpoint


def image_url_prefix(request: Request) -> tuple[str, str]:
    """(before, after) the id in an image's URL on this service (relative, proxy-prefix aware),
    in the collection the request addresses."""
    params = {"image_id": _ID}
    if "collection" in request.path_params:
        params["collection"] = request.path_params["collection"]
    url = request.scope.get("root_path", "") + request.app.url_path_for("get_image", **params)
    before, _, after = url.partition(_ID)
    return before, after


def image_url(request: Request, image_id: int) -> str:
    """Path of an image on this service (relative, so it works behind a proxy prefix)."""
    before, after = image_url_prefix(request)
    return f"{before}{image_id}{after}"


def hit_list(request: Request, hits: list) -> list[dict]:
    """:class:`SearchResult` dicts of ``hits`` (``index.SearchHit``), best first."""
    before, after = image_url_prefix(request)
    return [{"id": h.id, "score": float(h.score), "path": h.path, "label": h.label,
             "image_url": f"{before}{h.id}{after}"} for h in hits]


def search_response(request: Request, state: ServiceState, hits: list, k: int, t0: float,
                    offset: int = 0) -> JSONResponse:
    """The :class:`SearchResponse` JSON, built directly (the hot path skips a second validation)."""
    body = {
        "results": hit_list(request, hits),
        "k": k,
        "offset": offset,
        "model": state.fingerprint,
        "index": state.store.generation,
        "took_ms": round((time.perf_counter() - t0) * 1000.0, 3),
    }
    return JSONResponse(body)


@dataclass(frozen=True)
class SearchWindow:
    """Which hits a search asks for: ranks ``offset .. offset+k-1`` among those passing the filters."""

    k: int
    offset: int = 0
    label: str | None = None
    exclude_label: str | None = None

    @property
    def filtered(self) -> bool:
        return self.label is not None or self.exclude_label is not None

    def search_kwargs(self) -> dict:
        """Keyword arguments of :meth:`index.IndexStore.search` for this window."""
        return {"offset": self.offset, "label": self.label, "exclude_label": self.exclude_label}


def parse_offset(raw: str | int | None, k: int, max_k: int) -> int:
    """``offset`` from a form or query value: an integer >= 0 with ``offset + k <= max_k`` (422 otherwise)."""
    if raw is None or raw == "":
        return 0
    try:
        offset = int(raw)
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_parameter", f"offset: must be an integer, got {str(raw)[:32]!r}") from None
    if offset < 0:
        raise ApiError(422, "invalid_parameter", f"offset: must be >= 0, got {offset}")
    if offset + k > max_k:
        raise ApiError(422, "invalid_parameter",
                       f"offset: offset + k must be at most max_k={max_k} (results go {max_k} deep), "
                       f"got offset {offset} + k {k}")
    return offset


def parse_label_filter(name: str, raw: str | None) -> str | None:
    """A ``label`` / ``exclude_label`` filter value (stripped; empty means no filter; 422 if invalid)."""
    try:
        return parse_label(raw)
    except ApiError as exc:
        raise ApiError(422, "invalid_parameter", f"{name}: {exc.message.partition(': ')[2]}") from None


def parse_window(settings: Settings, k: str | int | None, offset: str | int | None = None,
                 label: str | None = None, exclude_label: str | None = None) -> SearchWindow:
    """Validate the search parameters shared by every search route (422 on a bad one)."""
    kk = parse_k(k, settings.default_k, settings.max_k)
    return SearchWindow(k=kk, offset=parse_offset(offset, kk, settings.max_k),
                        label=parse_label_filter("label", label),
                        exclude_label=parse_label_filter("exclude_label", exclude_label))


def collection_status(state: ServiceState) -> CollectionStatus:
    """What ``/readyz`` and ``/v1/collections`` say about one collection."""
    if state.ready:
        status = "ready"
    elif state.stopping:
        status = "stopping"
    else:
        status = "failed" if state.error else "loading"
    store = state.store
    return CollectionStatus(name=state.name, status=status, model=state.fingerprint,
                            backend=state.backend_name if state.backend is not None else "",
                            index_size=len(store) if store is not None else 0,
                            generation=store.generation if store is not None else 0,
                            writable=state.writes_available)


def errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` entries documenting the error shape for ``statuses``."""
    return {s: {"model": ErrorResponse} for s in statuses}
