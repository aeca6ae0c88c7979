"""The real server process: writes survive restarts (graceful and killed), limits over real
HTTP, the upload catalogue leaves the process up, named collections. Calls go through the
typed client (``lookalike.client``) wherever it can express them, so the client is exercised
against a real server; raw httpx only where the test is about the wire (chunked bodies,
content types, half-sent headers)."""

from __future__ import annotations

import json
import shutil
import signal
import socket

import httpx
import pytest

from lookalike.client import Client, LookalikeError
from tests.unit.service import imagegen
from tests.unit.service.apihelpers import API_KEY, assert_error

pytestmark = pytest.mark.slow

NEW = imagegen.encode(imagegen.pattern(9090, (140, 100)), "PNG")


def _client(srv, **kw) -> Client:
    return Client(srv.url, api_key=API_KEY, **kw)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "killed"])
def test_add_and_delete_survive_a_restart(start_server, sig):
    srv = start_server()
    with _client(srv) as api:
        added = api.add(NEW, label="newcomer")
        assert added.created
        new_id = added.image.id
        victim = api.search(NEW, k=2).hits[1].id  # the nearest other image
        assert api.delete(victim).deleted
        before = api.search(NEW, k=50).hits
    assert before[0].id == new_id and victim not in [h.id for h in before]

    rc = srv.stop(sig)
    if sig == signal.SIGTERM:  # uvicorn re-raises the signal after a graceful shutdown
        assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in srv.log(), srv.log()
    else:
        assert rc == -signal.SIGKILL
    srv2 = start_server()  # same index directory, a new process
    with _client(srv2) as api:
        after = api.search(NEW, k=50).hits
        assert after[0].id == new_id and after[0].label == "newcomer"
        assert victim not in [h.id for h in after]
        assert [h.id for h in after] == [h.id for h in before]
        assert api.image(new_id) == NEW
        with pytest.raises(LookalikeError) as exc:
            api.image(victim)
        assert (exc.value.status, exc.value.code) == (404, "not_found")


def test_413_reaches_the_client_over_real_http(start_server):
    srv = start_server(max_upload_bytes="100000", multipart_overhead_bytes="4096")
    big = b"\xff\xd8\xff" + b"\0" * 2_000_000
    with _client(srv) as api, pytest.raises(LookalikeError) as exc:
        api.search(big)
    assert (exc.value.status, exc.value.code) == (413, "too_large")

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
    with _client(server) as api:
        for data, status in cases:
            try:
                got = 200 if api.search(data).hits else "no hits"
            except LookalikeError as e:
                got = e.status
                assert e.code and e.message and "Traceback" not in e.message
            assert got == status, (status, got)
    with httpx.Client(base_url=server.url, timeout=30) as c:  # not a form at all: the raw wire
        resp = c.post("/v1/search", content=imagegen.jpeg(1), headers={"Content-Type": "image/jpeg"})
        assert_error(resp, 415, "unsupported_media_type")
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    assert server.alive()


def test_slow_client_headers_do_not_block_others(server):
    """A client that opens a connection and sends nothing does not stall other requests."""
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        idle.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\n")
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        with _client(server) as api:
            assert api.search(imagegen.jpeg(3), k=1).hits


def test_read_only_server_needs_no_key(start_server, monkeypatch):
    monkeypatch.delenv("LOOKALIKE_API_KEY", raising=False)
    srv = start_server(writes_enabled="false", api_key="")
    with _client(srv) as api, pytest.raises(LookalikeError) as exc:
        api.add(NEW)
    assert (exc.value.status, exc.value.code) == (403, "writes_disabled")


def test_client_search_features_against_the_real_server(server, e2e_images):
    """Filters, pages, batch, mean and similar through the client over real HTTP; the answers
    agree with each other as the API promises."""
    root, files = e2e_images
    query = files[5]
    with _client(server) as api:
        info = api.index_info()
        assert info.size == len(files) and info.writable
        top = api.search(query, k=10)
        assert top.hits[0].path == query.relative_to(root).as_posix() and top.hits[0].score > 0.999
        assert top.model == info.model and top.k == 10
        assert api.search(query, k=5).hits + api.search(query, k=5, offset=5).hits == top.hits
        label = query.parent.name
        same = api.search(query, k=3, label=label).hits
        assert len(same) == 3 and {h.label for h in same} == {label}
        assert label not in {h.label for h in api.search(query, k=10, exclude_label=label).hits}
        items = api.search_batch([query, imagegen.truncated_jpeg(), files[0]], k=4)
        assert [i.ok for i in items] == [True, False, True]
        assert [h.id for h in items[0].hits] == [h.id for h in top.hits[:4]]
        assert (items[1].error.status, items[1].error.code) == (400, "truncated")
        me = top.hits[0].id
        sim = api.similar(me, k=4)
        assert me not in {h.id for h in sim.hits} and len(sim.hits) == 4
        assert [h.id for h in api.search_mean(ids=[me], k=4).hits] == [h.id for h in sim.hits]
        with pytest.raises(LookalikeError) as exc:
            api.similar(10**9)
        assert (exc.value.status, exc.value.code) == (404, "not_found")
    server.stop()
    with _client(server) as api, pytest.raises(LookalikeError) as exc:
        api.index_info()
    assert exc.value.status is None and exc.value.code == "transport_error"


def test_named_collections_in_a_real_server(start_server, e2e_index, tmp_path, e2e_images):
    """LOOKALIKE_COLLECTIONS (JSON in the environment) in a real process: a collection is
    searched and written on its own, the default routes are unchanged, and writes to a
    collection survive a restart in its own directory."""
    root, files = e2e_images
    copy = tmp_path / "copy"
    shutil.copytree(e2e_index, copy)
    srv = start_server(collections=json.dumps({"copy": str(copy)}))
    with _client(srv) as api, _client(srv, collection="copy") as other:
        assert [(c.name, c.status, c.index_size) for c in api.collections()] == \
            [("default", "ready", len(files)), ("copy", "ready", len(files))]
        new_id = other.add(NEW, label="newcomer").image.id
        hit = other.search(NEW, k=1).hits[0]
        assert (hit.id, hit.label) == (new_id, "newcomer")
        assert hit.image_url == f"/v1/collections/copy/images/{new_id}" and other.image(new_id) == NEW
        assert "newcomer" not in {h.label for h in api.search(NEW, k=len(files)).hits}
        assert api.index_info().size == len(files) and other.index_info().size == len(files) + 1
        assert api.index_info().model == other.index_info().model
        with pytest.raises(LookalikeError) as exc:
            api.in_collection("nope").search(NEW)
        assert (exc.value.status, exc.value.code) == (404, "collection_not_found")
    ready = httpx.get(srv.url + "/readyz", timeout=10).json()
    assert [c["name"] for c in ready["collections"]] == ["default", "copy"]
    srv.stop()
    srv2 = start_server(collections=json.dumps({"copy": str(copy)}))
    with _client(srv2, collection="copy") as other, _client(srv2) as api:
        assert other.search(NEW, k=1).hits[0].id == new_id
        assert "newcomer" not in {h.label for h in api.search(NEW, k=len(files)).hits}
