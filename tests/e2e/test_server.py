"""The real server process: writes survive restarts (graceful and killed), limits over real
HTTP, the upload catalogue leaves the process up."""

from __future__ import annotations

import signal
import socket

import httpx
import pytest

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import assert_error, auth

pytestmark = pytest.mark.slow

NEW = imagegen.encode(imagegen.pattern(9090, (140, 100)), "PNG")


def _search(url: str, data: bytes, k: int = 10) -> list[dict]:
    resp = httpx.post(url + "/v1/search", files={"file": ("q.png", data, "image/png")}, data={"k": str(k)},
                      timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "killed"])
def test_add_and_delete_survive_a_restart(start_server, sig):
    srv = start_server()
    added = httpx.post(srv.url + "/v1/images", files={"file": ("n.png", NEW, "image/png")},
                       data={"label": "newcomer"}, headers=auth(), timeout=30)
    assert added.status_code == 201, added.text
    new_id = added.json()["image"]["id"]
    victim = _search(srv.url, NEW, k=2)[1]["id"]  # the nearest other image
    assert httpx.delete(f"{srv.url}/v1/images/{victim}", headers=auth(), timeout=30).status_code == 200
    before = _search(srv.url, NEW, k=50)
    assert before[0]["id"] == new_id and victim not in [r["id"] for r in before]

    rc = srv.stop(sig)
    if sig == signal.SIGTERM:  # uvicorn re-raises the signal after a graceful shutdown
        assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in srv.log(), srv.log()
    else:
        assert rc == -signal.SIGKILL
    srv2 = start_server()  # same index directory, a new process
    after = _search(srv2.url, NEW, k=50)
    assert after[0]["id"] == new_id and after[0]["label"] == "newcomer"
    assert victim not in [r["id"] for r in after]
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert httpx.get(f"{srv2.url}/v1/images/{new_id}", timeout=30).content == NEW
    assert httpx.get(f"{srv2.url}/v1/images/{victim}", timeout=30).status_code == 404


def test_413_reaches_the_client_over_real_http(start_server):
    srv = start_server(max_upload_bytes="100000", multipart_overhead_bytes="4096")
    big = b"\xff\xd8\xff" + b"\0" * 2_000_000
    resp = httpx.post(srv.url + "/v1/search", files={"file": ("a.jpg", big, "image/jpeg")}, timeout=30)
    assert_error(resp, 413, "too_large")

    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        for _ in range(200):
            yield b"\0" * 10_000

    resp = httpx.post(srv.url + "/v1/search", content=chunks(), timeout=30,
                      headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert_error(resp, 413, "too_large")
    assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200


def test_catalogue_over_real_http_leaves_the_server_up(server):
    up, rot, _ = imagegen.exif_rotated_pair()
    cases = [
        (b"", 400), (imagegen.random_bytes(), 400), (imagegen.truncated_jpeg(), 400),
        (imagegen.png_bomb(7000, 7000), 413), (imagegen.encode(imagegen.pattern(1, (1, 1)), "PNG"), 200),
        (imagegen.png16(), 200), (imagegen.cmyk_jpeg(), 200), (imagegen.palette_transparent_png(), 200),
        (imagegen.animated_gif(), 200), (rot, 200), (imagegen.eps(), 415), (imagegen.tiff(), 415),
        (imagegen.psd(), 415),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for data, status in cases:
            resp = c.post("/v1/search", files={"file": ("x.jpg", data, "image/jpeg")})
            assert resp.status_code == status, (status, resp.text)
            if status != 200:
                assert_error(resp, status)
        resp = c.post("/v1/search", content=imagegen.jpeg(1), headers={"Content-Type": "image/jpeg"})
        assert_error(resp, 415, "unsupported_media_type")
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    assert server.alive()


def test_slow_client_headers_do_not_block_others(server):
    """A client that opens a connection and sends nothing does not stall other requests."""
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        idle.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\n")
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        assert _search(server.url, imagegen.jpeg(3), k=1)


def test_read_only_server_needs_no_key(start_server, monkeypatch):
    monkeypatch.delenv("LOOKALIKE_API_KEY", raising=False)
    srv = start_server(writes_enabled="false", api_key="")
    resp = httpx.post(srv.url + "/v1/images", files={"file": ("n.png", NEW, "image/png")}, headers=auth(), timeout=30)
    assert_error(resp, 403, "writes_disabled")
