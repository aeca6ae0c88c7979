"""The guarded HTTP protocol: header timeout, header count/size limits (431), and the
connection limit answered with the JSON 503 + Retry-After, counting only requests whose
headers have arrived. A real uvicorn server on a socket; no model needed."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from service.protocol import HttpLimits, guarded_protocol
from tests.unit.service.serverthread import closed_by_peer, connect, read_response, serve

GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


def _app_factory():
    release = asyncio.Event()
    state = {"release": release}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    state["loop"] = asyncio.get_running_loop()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app, state


def _json_error(status, headers, body, expect_status, code):
    assert status == expect_status, (status, body)
    assert headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert err["code"] == code and err["message"]
    return err


@pytest.fixture()
def server():
    app, state = _app_factory()
    limits = HttpLimits(header_timeout_s=0.5, max_header_count=50, max_header_bytes=8192, limit_concurrency=3,
                        retry_after_s=2)
    with serve(app, http=guarded_protocol(limits)) as port:
        yield port, state
        state["loop"].call_soon_threadsafe(state["release"].set)


def test_plain_request_and_keep_alive(server):
    port, _ = server
    with connect(port) as s:
        for _ in range(3):
            s.sendall(GET)
            status, _, body = read_response(s)
            assert status == 200 and body == b"ok"


def test_too_many_headers_get_431_json(server):
    port, _ = server
    with connect(port) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + b"\r\n")
        _json_error(*read_response(s), 431, "headers_too_large")
        assert closed_by_peer(s)


def test_one_huge_header_gets_431_before_it_is_sent_whole(server):
    port, _ = server
    with connect(port) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Big: ")
        sent = 0
        try:
            while sent < 1024 * 1024:  # a 1 MB header; the answer comes after the first 8 KiB
                s.sendall(b"a" * 4096)
                sent += 4096
                if sent >= 64 * 1024:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        _json_error(*read_response(s), 431, "headers_too_large")


def test_slow_headers_time_out_with_408(server):
    port, _ = server
    with connect(port) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n")  # never finishes
        _json_error(*read_response(s), 408, "request_timeout")
        assert closed_by_peer(s)
    with connect(port) as idle:  # a connection that sends nothing is closed without an answer
        assert closed_by_peer(idle)


def test_connection_limit_answers_json_503_and_ignores_slow_header_connections(server):
    port, state = server
    trickling = [connect(port) for _ in range(10)]  # more than the limit, headers never complete
    for s in trickling:
        s.sendall(b"GET /x HTTP/1.1\r\n")
    with connect(port) as s:  # not refused: half-sent headers do not count against the limit
        s.sendall(GET)
        assert read_response(s)[0] == 200
    busy = [connect(port) for _ in range(3)]
    for s in busy:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    time.sleep(0.2)
    with connect(port) as s:
        s.sendall(GET)
        status, headers, body = read_response(s)
        _json_error(status, headers, body, 503, "unavailable")
        assert headers["retry-after"] == "2"
    state["loop"].call_soon_threadsafe(state["release"].set)
    for s in busy:
        assert read_response(s)[0] == 200
        s.close()
    for s in trickling:
        s.close()
