"""The app factory: ``create_app(settings) -> FastAPI``.

Heavy state (model backend, index, threads) is loaded in the lifespan, so importing this module
and building the app are cheap; ``with TestClient(create_app(s))`` runs the lifespan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from service.collections import Collections
from service.deps import CollectionPath
from service.errors import install_error_handlers
from service.metrics import ServiceMetrics
from service.middleware import (BodyBufferMiddleware, BodyLimitMiddleware, ErrorContractMiddleware,
                                MetricsMiddleware, SecurityHeadersMiddleware)
from service.routers import collections, feedback, health, images, index, page, search
from service.settings import Settings
from service.state import BackendFactory, IndexOpener

log = logging.getLogger(__name__)

DESCRIPTION = """Image retrieval by metric learning: upload an image, get the most similar indexed
images ranked by cosine similarity. Errors are always `{"error": {"code", "message"}}`."""


@asynccontextmanager
async def lifespan(app: FastAPI):
    registry: Collections = app.state.collections
    try:
        await registry.start()
    except BaseException:
        await registry.stop()
        raise
    try:
        yield
    finally:
        await registry.stop()


def _openapi(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's OpenAPI document, plus what it cannot infer from the routes: the bearer scheme on
    the writes (the key is checked in a dependency that reads the header itself) and the bounds
    of every ``k`` (1..``max_k``, a setting, so not in the route signatures)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http", "scheme": "bearer",
        "description": "LOOKALIKE_API_KEY, sent as `Authorization: Bearer <key>`; required by writes"}

    def bound_k(s: dict) -> None:
        target = s
        if "anyOf" in s:  # Optional[int]
            target = next((x for x in s["anyOf"] if x.get("type") == "integer"), s)
        target["minimum"] = 1
        target["maximum"] = settings.max_k

    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            if not isinstance(op, dict):
                continue
            if "401" in op.get("responses", {}):
                op["security"] = [{"bearerAuth": []}]
            for param in op.get("parameters", []):
                if param.get("name") == "k":
                    bound_k(param.setdefault("schema", {}))
            for media in op.get("requestBody", {}).get("content", {}).values():
                props = media.get("schema", {}).get("properties", {})
                if "k" in props:
                    bound_k(props["k"])
    for comp in schema.get("components", {}).get("schemas", {}).values():
        if "k" in comp.get("properties", {}) and comp.get("title", "").endswith("Request"):
            bound_k(comp["properties"]["k"])
    app.openapi_schema = schema
    return schema


#: Where a named collection's copy of each ``/v1/...`` route lives.
COLLECTION_PREFIX = "/v1/collections/{collection}"


def collection_routes(router: APIRouter) -> APIRouter:
    """The ``/v1/...`` routes of ``router`` again under ``/v1/collections/{collection}/...``.

    Each route is copied with its full path (not included with a prefix): FastAPI puts the
    route it matched in ``scope["route"]``, and the metrics label every request with that route's
    own path, which for an included-with-prefix route lacks the prefix."""
    out = APIRouter()
    for r in router.routes:
        if not isinstance(r, APIRoute):
            continue
        assert r.path.startswith("/v1/"), r.path
        out.add_api_route(
            COLLECTION_PREFIX + r.path.removeprefix("/v1"), r.endpoint, response_model=r.response_model,
            status_code=r.status_code, tags=[*r.tags, "collections"], dependencies=[*r.dependencies, CollectionPath],
            summary=r.summary, description=r.description, response_description=r.response_description,
            responses=r.responses, deprecated=r.deprecated, methods=r.methods, name=r.name,
            include_in_schema=r.include_in_schema, response_class=r.response_class, openapi_extra=r.openapi_extra)
    return out


def _overload_refusal(registry: Collections, routers) -> Callable[[str, str], str | None]:
    """``(method, path) -> why``: why the service would refuse this request with 503 right now,
    before reading its body, or None. Only requests for the routes marked ``admits_queries`` are
    refused, when the addressed collection's batcher would refuse a query now (O(1):
    :meth:`ServiceState.refusal`). The route is matched with Starlette's own matching, against
    the few marked routes only (read from the routers: FastAPI 0.16x includes routers lazily, so
    ``app.routes`` holds no APIRoute); a ``{collection}`` the server does not have is left to the
    route (404). Used by the HTTP protocol (:mod:`service.protocol`), which answers before any
    ASGI work."""
    from starlette.routing import Match

    from service.errors import ApiError

    routes = [r for router in routers for r in router.routes
              if getattr(getattr(r, "endpoint", None), "admits_queries", False)]

    def refusal(method: str, path: str) -> str | None:
        scope = {"type": "http", "method": method, "path": path, "root_path": ""}
        for r in routes:
            match, child = r.matches(scope)
            if match is Match.FULL:
                try:
                    state = registry.get(child.get("path_params", {}).get("collection"))
                except ApiError:
                    return None
                return state.refusal()
        return None

    return refusal


def create_app(settings: Settings | None = None, *, backend_factory: BackendFactory | None = None,
               index_opener: IndexOpener | None = None) -> FastAPI:
    """Build the lookalike FastAPI app.

    Args:
        settings: the configuration; None reads it from ``LOOKALIKE_*`` environment variables.
        backend_factory: builds the default model's inference backend (called in the inference
            thread); None loads ``settings.model_dir`` with ``settings.backend``.
        index_opener: ``(card, writable) -> IndexStore`` of the default collection; None opens
            ``settings.index_dir``. Named collections (``settings.collections``) open their own.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed distribution's version; service does not import the lookalike command
        __version__ = version("lookalike")
    except PackageNotFoundError:
        __version__ = "0+unknown"

    settings = settings if settings is not None else Settings()
    metrics = ServiceMetrics()
    app = FastAPI(title="lookalike", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    registry = Collections(settings, metrics, backend_factory=backend_factory, index_opener=index_opener)
    app.state.collections = registry
    app.state.lookalike = registry.default
    app.state.settings = settings
    app.openapi = lambda: _openapi(app, settings)
    install_error_handlers(app)
    # The collection resources answer for the default collection under /v1, and for any named
    # one under /v1/collections/{collection} (deps.get_state picks it from the path).
    routers: list[APIRouter] = []
    for r in (search.router, images.router, index.router, feedback.router):
        routers += [r, collection_routes(r)]
    routers += [collections.router, health.router, page.router]
    for r in routers:
        app.include_router(r)
    app.state.overload_refusal = _overload_refusal(registry, routers)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR), name="static")

    # Added innermost first: Metrics(SecurityHeaders(BodyLimit(BodyBuffer(ErrorContract([CORS](app)))))).
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)
    app.add_middleware(ErrorContractMiddleware)
    app.add_middleware(BodyBufferMiddleware, timeout_s=settings.body_timeout_s,
                       max_buffered_bytes=max(settings.max_buffered_body_bytes, settings.max_body_bytes),
                       retry_after_s=settings.retry_after_s)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
