"""Pure ASGI middlewares: request body cap, whole-body read before the app, request metrics,
security headers.

They are plain ASGI (not ``BaseHTTPMiddleware``) so they add microseconds, stream the body
through untouched, and see every response including the error ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _json_message(status: int, code: str, message: str, extra_headers: list[tuple[bytes, bytes]] = ()):
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *extra_headers,
        ],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a request body passes the cap."""


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413, before they are read whole.

    * A ``Content-Length`` over the cap is answered at once; the body is never read into the app.
    * Without one (chunked), or if the client sends more than it announced, ``receive`` is
      counted and the app is stopped (``BodyTooLarge``) as soon as the cap is passed; the
      response the app would have sent is replaced by the 413.

    After a 413 the rest of the body is drained (up to ``drain_bytes``, within ``drain_s``) so the
    client reads the answer instead of a connection reset; then the connection closes.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, drain_bytes: int | None = None,
                 drain_s: float = 5.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else 8 * max_body_bytes
        self.drain_s = drain_s

    def _message(self) -> str:
        return f"request body is over the limit of {self.max_body_bytes} bytes"

    async def _drain(self, receive: Receive, already: int) -> None:
        async def drain() -> None:
            seen = already
            while seen < self.drain_bytes:
                msg = await receive()
                if msg["type"] != "http.request":
                    return
                seen += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(drain(), self.drain_s)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - best effort only
            pass

    async def _refuse(self, send: Send) -> None:
        start, body = _json_message(413, "too_large", self._message(), [(b"connection", b"close")])
        await send(start)
        await send(body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    start, body = _json_message(400, "bad_request", "invalid Content-Length header")
                    await send(start)
                    await send(body)
                    return
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send)
            await self._drain(receive, 0)
            return

        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise BodyTooLarge(self._message())
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's own answer is replaced by the 413
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            exceeded = True
        if exceeded and not started:
            await self._refuse(send)
            await self._drain(receive, received)


class BodyBufferMiddleware:
    """Read a request's whole body, within ``timeout_s``, before the app sees the request.

    Why: the routes take an inference admission slot as they start. Without this, a client
    sending its upload at 3 bytes/s holds a slot for as long as it likes, and 64 of them refuse
    every other search. Here a request reaches the app (and admission) only once its body has
    fully arrived; a body still incomplete after ``timeout_s`` is answered 408 and the
    connection closed. Requests without a body (GET, HEAD, DELETE, OPTIONS, or a zero
    Content-Length) pass straight through.

    Memory: bodies are held until the app returns, so at most ``max_buffered_bytes`` are held
    across all requests (a declared Content-Length is reserved up front); beyond it the request
    gets the JSON 503 with Retry-After. Each body is also capped by the
    :class:`BodyLimitMiddleware` outside this one.
    """

    NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})

    def __init__(self, app: ASGIApp, *, timeout_s: float, max_buffered_bytes: int, retry_after_s: int = 1) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.max_buffered_bytes = max_buffered_bytes
        self.retry_after_s = retry_after_s
        self.buffered = 0  #: bytes reserved by bodies held right now (event-loop only: no lock)

    async def _answer(self, send: Send, status: int, code: str, message: str, extra=()) -> None:
        start, body = _json_message(status, code, message, [(b"connection", b"close"), *extra])
        await send(start)
        await send(body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in self.NO_BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = None
        chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit():
                declared = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        if declared == 0 and not chunked:
            await self.app(scope, receive, send)
            return
        reserved = declared or 0
        if self.buffered + reserved > self.max_buffered_bytes:
            await self._answer(send, 503, "unavailable", "overloaded: too many uploads in progress, retry shortly",
                               [(b"retry-after", str(self.retry_after_s).encode())])
            return
        self.buffered += reserved
        try:
            chunks: list[bytes] = []
            got = 0
            try:
                async with asyncio.timeout(self.timeout_s):
                    while True:
                        msg = await receive()
                        if msg["type"] == "http.disconnect":
                            return  # nobody to answer
                        body = msg.get("body", b"")
                        if body:
                            chunks.append(body)
                            got += len(body)
                            if got > reserved:  # chunked, or more than announced: reserve as it comes
                                extra = got - reserved
                                if self.buffered + extra > self.max_buffered_bytes:
                                    await self._answer(send, 503, "unavailable",
                                                       "overloaded: too many uploads in progress, retry shortly",
                                                       [(b"retry-after", str(self.retry_after_s).encode())])
                                    return
                                self.buffered += extra
                                reserved = got
                        if not msg.get("more_body", False):
                            break
            except TimeoutError:
                log.info("request body incomplete after %.0f s (%d bytes): 408", self.timeout_s, got)
                await self._answer(send, 408, "request_timeout",
                                   f"the request body did not arrive within {self.timeout_s:g} s")
                return
            whole = b"".join(chunks)
            del chunks
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": whole, "more_body": False}
                return await receive()  # after the body: only http.disconnect

            await self.app(scope, replay, send)
        finally:
            self.buffered -= reserved


class _HttpMiddleware:
    """A pure ASGI middleware acting on HTTP requests only (the subclass's ``http(scope, receive,
    send)``); lifespan and other scopes pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)  # defined by each subclass


class ErrorContractMiddleware(_HttpMiddleware):
    """Every error below it leaves in the one JSON shape, and each unexpected one is logged once.

    * An exception no handler took is answered here (500 ``internal``, or 507 when the disk is
      full; see :func:`service.errors.unexpected_error`) and not re-raised: Starlette's outermost
      error middleware would answer the same and then re-raise it, so uvicorn logged every 500 a
      second time.
    * A plain-text error response from below (Starlette's CORS middleware refusing a preflight)
      is rewritten to ``{"error": {"code", "message"}}`` with the same status and headers.
    """

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        from service.errors import _STATUS_CODES, unexpected_error

        started = False
        held: tuple[int, list] | None = None  # a plain-text error being rewritten
        text = b""

        async def send_wrapper(msg: Message) -> None:
            nonlocal started, held, text
            if msg["type"] == "http.response.start":
                started = True
                headers = list(msg.get("headers", ()))
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if msg["status"] >= 400 and ctype.startswith(b"text/plain"):
                    keep = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
                    held = (msg["status"], keep)
                    return
            elif msg["type"] == "http.response.body" and held is not None:
                text += msg.get("body", b"")
                if msg.get("more_body", False):
                    return
                status, keep = held
                code = _STATUS_CODES.get(status, f"http_{status}")
                message = text.decode("utf-8", "replace").strip()[:300] or code.replace("_", " ")
                start, body = _json_message(status, code, message, keep)
                await send(start)
                await send(body)
                return
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        except BodyTooLarge:
            raise  # BodyLimitMiddleware answers it
        except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are answered
            status, code, message = unexpected_error(exc, scope.get("method", ""), scope.get("path", ""))
            if started:
                return  # too late for an answer; the connection is closed with the response cut short
            start, body = _json_message(status, code, message)
            await send(start)
            await send(body)


class MetricsMiddleware:
    """Count requests and time them by method, route template and status.

    The route template (``/v1/images/{image_id}``) comes from the matched route, so ids do not
    explode the label set; unmatched paths are labelled ``<unmatched>``.
    """

    def __init__(self, app: ASGIApp, *, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None)
            if template is None:
                template = "/static" if scope.get("path", "").startswith("/static/") else "<unmatched>"
            self.metrics.observe_request(scope.get("method", ""), template, status, time.perf_counter() - t0)


class SecurityHeadersMiddleware(_HttpMiddleware):
    """Add conservative security headers to every response (CSP for the page)."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"cross-origin-resource-policy", b"same-origin"),
    ]
    CSP = (
        b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )

    #: Paths whose pages load Swagger UI / ReDoc from their CDN: no CSP there.
    NO_CSP_PREFIXES = ("/docs", "/redoc")

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        csp = not scope.get("path", "").startswith(self.NO_CSP_PREFIXES)

        async def send_wrapper(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self.HEADERS if k not in present]
                if csp and b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", self.CSP))
                msg["headers"] = headers
            await send(msg)

        await self.app(scope, receive, send_wrapper)
