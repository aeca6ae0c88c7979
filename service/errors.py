"""Every error leaves the service as ``{"error": {"code": str, "message": str}}``.

:class:`ApiError` is raised by handlers; :func:`install_error_handlers` maps it, FastAPI's
validation errors (422), Starlette's HTTP errors (404, 405, ...), image decode errors and any
unexpected exception (500, logged with its traceback, the body names no path nor frame) onto
that one shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.decode import ImageDecodeError
from service.storage import is_disk_full

log = logging.getLogger(__name__)

#: ImageDecodeError.code -> HTTP status.
DECODE_STATUS: dict[str, int] = {
    "empty": 400,
    "undecodable": 400,
    "truncated": 400,
    "too_small": 400,
    "unreadable": 400,
    "too_large": 413,
    "too_many_pixels": 413,
    "unsupported_format": 415,
}

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
    507: "insufficient_storage",
}


class ApiError(Exception):
    """An error answer: HTTP ``status``, machine-readable ``code``, human ``message``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def from_decode_error(exc: ImageDecodeError) -> ApiError:
    """Map a refused image to its HTTP error (the message names no server path)."""
    return ApiError(DECODE_STATUS.get(exc.code, 400), exc.code, exc.reason)


def insufficient_storage(message: str) -> ApiError:
    """507: the index volume is full (the message names the cause; reads keep working)."""
    return ApiError(507, "insufficient_storage", message)


def unavailable(message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, "unavailable", message, headers={"Retry-After": str(retry_after_s)})


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header", "form"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the one JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ImageDecodeError)
    async def _decode_error(request: Request, exc: ImageDecodeError) -> JSONResponse:
        err = from_decode_error(exc)
        return error_response(err.status, err.code, err.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_parameter", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Normally unreached: service.middleware.ErrorContractMiddleware answers first (and
        # logs once; Starlette re-raises after this handler, so uvicorn would log it again).
        return error_response(*unexpected_error(exc, request.method, request.url.path))


def unexpected_error(exc: BaseException, method: str, path: str) -> tuple[int, str, str]:
    """(status, code, message) for an exception no handler took, logged here once: a full disk
    is 507 ``insufficient_storage`` (a warning), anything else 500 ``internal`` (an error with
    the traceback). The message never names a path or a frame."""
    if is_disk_full(exc):
        log.warning("disk full on %s %s: %s", method, path, exc)
        return 507, "insufficient_storage", "the server's volume is full; free space there and retry. Searches keep working"
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return 500, "internal", "internal server error"
