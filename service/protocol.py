"""uvicorn's httptools HTTP/1.1 protocol with the guards a public service needs.

uvicorn alone (0.54, httptools) has no header-read timeout, no header count/size limit, and
answers its connection limit with a plain-text 503 without Retry-After; it also counts idle and
slow-header *connections* against that limit, so 600 clients trickling headers refuse everyone
else. :func:`guarded_protocol` returns a subclass that:

* closes a connection whose request headers have not all arrived within ``header_timeout_s``
  of its first byte (or of the connection, if it sends nothing): 408 JSON if a request had
  begun, a plain close otherwise;
* answers more than ``max_header_count`` headers, or more than ``max_header_bytes`` before the
  end of the headers, with 431 JSON and closes (the bytes are counted as they arrive, so a 1 MB
  header is refused after the first ``max_header_bytes``, not buffered whole);
* counts only requests whose headers are complete (running ASGI tasks) against
  ``limit_concurrency`` and answers beyond it with the service's JSON 503 + ``Retry-After``;
* answers an unparsable request with a JSON 400 (uvicorn's is plain text);
* answers an inference request the service would refuse now (``refusal(method, path)``, the
  batcher's O(1) queue-wait check) with the JSON 503 + ``Retry-After`` as soon as its headers are
  in: no ASGI task, no middleware, no body read (the body is discarded as it arrives and the
  connection serves the next request), so a flood of refused requests costs the event loop as
  little as it can;
* closes a connection whose request was answered before its body was read (an early 503, a 413)
  if the rest of that body, which is discarded, has not arrived within ``header_timeout_s``;
* on SIGTERM, answers 503 and closes at once a request whose body is still arriving (it holds no
  work), so slow uploads do not hold the shutdown for the graceful timeout.

Every answer has the one error shape ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import httptools

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


@dataclass(frozen=True)
class HttpLimits:
    """Connection-level limits (seconds, counts, bytes)."""

    header_timeout_s: float = 10.0
    max_header_count: int = 100
    max_header_bytes: int = 32 * 1024
    limit_concurrency: int | None = 512
    retry_after_s: int = 1
    #: ``(method, path) -> why`` the service would refuse the request with 503 now, or None.
    refusal: Callable[[str, str], str | None] | None = None


def error_bytes(status: int, code: str, message: str, extra: tuple[tuple[bytes, bytes], ...] = (),
                close: bool = True) -> bytes:
    """A whole HTTP/1.1 response (JSON error body, ``Connection: close`` unless ``close`` is
    False) as bytes."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
             b"content-type: application/json", b"content-length: %d" % len(body)]
    if close:
        lines.append(b"connection: close")
    lines += [k + b": " + v for k, v in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def overloaded_app(retry_after_s: int):
    """ASGI app answering the connection limit with the JSON 503 (and Retry-After)."""
    body = json.dumps({"error": {"code": "unavailable",
                                 "message": "overloaded: too many requests in progress, retry shortly"}}).encode()

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after_s).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """See the module docstring; ``limits`` is set on the subclass :func:`guarded_protocol` makes."""

    limits: HttpLimits = HttpLimits()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._header_count = 0
        self._headers_done = False
        self._refused = False
        self._header_timer = None
        self._discarding = False  # the request was answered 503 from its headers; its body is dropped
        self._overloaded = overloaded_app(self.limits.retry_after_s)
        self._arm_header_timer()

    # ---- header timeout -----------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.limits.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._headers_done:  # armed by on_response_complete: the unread body never finished
            log.info("closing %s: the rest of an answered request's body did not arrive", self.client)
            self.transport.close()
            return
        if self._header_bytes > 0:
            log.info("closing %s: request headers incomplete after %.0f s", self.client, self.limits.header_timeout_s)
            self._refuse(408, "request_timeout",
                         f"request headers did not arrive within {self.limits.header_timeout_s:g} s")
        else:
            self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._refused = True
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, code, message))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to an unparsable request, in the JSON error shape (it was plain text)."""
        self._refuse(400, "bad_request", msg)

    # ---- data and parser callbacks --------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._headers_done:
            self._header_bytes += len(data)
            if self._header_timer is None:  # first bytes of a request on a kept-alive connection
                self._arm_header_timer()
        super().data_received(data)
        if self._refused:
            return
        if self._header_count > self.limits.max_header_count:
            self._refuse(431, "headers_too_large", f"more than {self.limits.max_header_count} request headers")
        elif not self._headers_done and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "headers_too_large",
                         f"request line and headers are over {self.limits.max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count <= self.limits.max_header_count:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        if self._header_count > self.limits.max_header_count:
            self._headers_done = True
            self._refuse(431, "headers_too_large", f"more than {self.limits.max_header_count} request headers")
            return
        self._headers_done = True
        if self._refuse_overloaded():
            return
        limit = self.limits.limit_concurrency
        if limit is not None and len(self.tasks) >= limit:
            log.warning("connection limit: %d requests in progress; answering 503", len(self.tasks))
            app, self.app = self.app, self._overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def _refuse_overloaded(self) -> bool:
        """Answer 503 now if ``limits.refusal`` says so (see the module docstring); True if answered.
        Not for a pipelined request (answers must keep their order) nor a connection that is
        not kept alive (closing with its body unread could reset the answer away)."""
        check = self.limits.refusal
        if check is None or (self.cycle is not None and not self.cycle.response_complete) \
                or not self.parser.should_keep_alive():
            return False
        try:
            path = httptools.parse_url(self.url).path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            return False  # uvicorn answers it
        why = check(self.parser.get_method().decode("ascii"), urllib.parse.unquote(path) if "%" in path else path)
        if why is None:
            return False
        self.transport.write(error_bytes(503, "unavailable", f"overloaded: {why}; retry shortly",
                                         ((b"retry-after", str(self.limits.retry_after_s).encode()),), close=False))
        self._discarding = True
        self._arm_header_timer()  # the body must follow within the header timeout, or the connection closes
        return True

    def on_body(self, body: bytes) -> None:
        if not self._refused and not self._discarding:
            super().on_body(body)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._headers_done and self.cycle is not None and self.cycle.response_complete \
                and not self.transport.is_closing():
            # answered before its whole body came: the rest is discarded, but only for so long
            self._arm_header_timer()

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._cancel_header_timer()
        if self._discarding:  # the refused request's body is over: ready for the next request
            self._discarding = False
            self._headers_done = False
            self._header_bytes = 0
            self._header_count = 0
            self._arm_header_timer()
            return
        super().on_message_complete()
        # the next bytes on this connection start a new request
        self._headers_done = False
        self._header_bytes = 0
        self._header_count = 0
        if self.cycle is not None and self.cycle.response_complete:
            # the body of an already answered request: uvicorn armed its keep-alive timeout at the
            # answer and the body's bytes cancelled it, so the next request gets the header timeout
            self._arm_header_timer()

    def shutdown(self) -> None:
        """Graceful shutdown (SIGTERM). A request whose body is still arriving has started no work:
        it is answered 503 and let go at once, instead of holding the shutdown for the whole
        graceful timeout (its task sees a disconnect and ends without answering)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and self._headers_done \
                and not self._discarding and not self.transport.is_closing():
            self._refused = True
            self.transport.write(error_bytes(503, "unavailable", "service is stopping; retry shortly",
                                             ((b"retry-after", str(self.limits.retry_after_s).encode()),)))
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.close()
            return
        super().shutdown()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def guarded_protocol(limits: HttpLimits) -> type[GuardedHttpToolsProtocol]:
    """A :class:`GuardedHttpToolsProtocol` subclass bound to ``limits`` (uvicorn's ``http=``)."""
    return type("LookalikeHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
