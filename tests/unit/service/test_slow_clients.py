"""Slow clients cannot hold work (issue 12): a request counts against inference admission only
once its body has fully arrived, a body that does not arrive in time gets 408, the memory held by
bodies in flight is bounded (503 beyond), and SIGTERM with a half-sent upload exits 0 within the
graceful timeout after its shutdown checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import API_KEY, auth
from tests.unit.service.serverthread import closed_by_peer, connect, read_response, serve

REPO = Path(__file__).resolve().parents[3]


def _slow_upload(port: int, length: int = 100_000, path: str = "/v1/search"):
    """A socket that sent the headers of an upload and 10 bytes of its body, and then nothing."""
    s = connect(port)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
              f"Content-Length: {length}\r\n\r\n".encode() + b"--b\r\nConte")
    return s


def _search(port: int, data: bytes) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/search", files={"file": ("q.jpg", data, "image/jpeg")},
                      data={"k": "3"}, timeout=30)


@pytest.fixture()
def live(make_settings):
    from service.app import create_app
    from service.server import http_protocol

    def start(**overrides):
        settings = make_settings(**overrides)
        return serve(create_app(settings), http=http_protocol(settings))

    return start


def test_slow_uploads_do_not_hold_admission_slots(live):
    with live(max_pending=2, body_timeout_s=2.0) as port:
        slow = [_slow_upload(port) for _ in range(6)]  # 3x the admission limit
        time.sleep(0.3)
        statuses = [_search(port, imagegen.jpeg(7 + i)).status_code for i in range(6)]
        assert statuses == [200] * 6, statuses  # was 503: each slow upload held a slot
        for s in slow:
            status, headers, body = read_response(s)
            assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
            assert closed_by_peer(s)
            s.close()


def test_bodies_held_in_memory_are_bounded(live):
    # max_body_bytes = 100_000 + 65_536; the budget is at least one whole body
    with live(max_upload_bytes=100_000, max_buffered_body_bytes=1, body_timeout_s=3.0) as port:
        first = _slow_upload(port, length=150_000)
        time.sleep(0.2)
        with _slow_upload(port, length=150_000) as second:
            status, headers, body = read_response(second)
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body)["error"]["code"] == "unavailable"
        first.close()
        time.sleep(0.2)
        assert _search(port, imagegen.jpeg(3)).status_code == 200  # the reservation was released


@pytest.mark.slow
def test_sigterm_with_a_half_sent_upload_exits_0_after_the_checkpoint(make_settings, tmp_path):
    s = make_settings()
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "LOOKALIKE_MODEL_DIR": str(s.model_dir), "LOOKALIKE_INDEX_DIR": str(s.index_dir),
           "LOOKALIKE_API_KEY": API_KEY, "LOOKALIKE_BACKEND": "torch", "LOOKALIKE_BF16": "false",
           "LOOKALIKE_PORT": str(port), "LOOKALIKE_GRACEFUL_SHUTDOWN_S": "2", "LOOKALIKE_BODY_TIMEOUT_S": "120",
           "LOOKALIKE_CHECKPOINT_EVERY": "0", "PYTHONPATH": str(REPO)}
    log = tmp_path / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/images", headers=auth(),
                       files={"file": ("n.jpg", imagegen.jpeg(991), "image/jpeg")}, timeout=30)
        assert r.status_code == 201, r.text
        half = _slow_upload(port, path="/v1/images")
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=2 + 5 + 10)
        took = time.monotonic() - t0
        status, _, body = read_response(half)  # let go at once: its body never came, it held no work
        assert status == 503 and json.loads(body)["error"]["code"] == "unavailable", body
        half.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert took <= 2 + 5, took
    assert "checkpointed index generation" in text, text[-3000:]
