"""HTTP plumbing: body cap middleware, metrics, security headers, CORS, page, OpenAPI, images."""

from __future__ import annotations

import asyncio
import re

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import assert_error, search
from service.middleware import BodyLimitMiddleware


def _run_asgi(app, headers, chunks):
    """Drive an ASGI app with a request body in ``chunks``; returns (messages sent, bytes the app read)."""
    sent, state = [], {"read": 0}
    body = list(chunks)

    async def receive():
        if body:
            chunk = body.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(body)}
        return {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent, state


def _reading_app(state):
    async def app(scope, receive, send):
        while True:
            msg = await receive()
            state["read"] += len(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_body_limit_refuses_by_content_length_without_calling_the_app():
    called = []

    async def app(scope, receive, send):
        called.append(True)

    mw = BodyLimitMiddleware(app, max_body_bytes=100)
    sent, _ = _run_asgi(mw, [(b"content-length", b"101")], [b"x" * 101])
    assert not called and sent[0]["status"] == 413
    assert b'"too_large"' in sent[1]["body"]


def test_body_limit_streaming_cap_stops_the_app():
    state = {"read": 0}
    mw = BodyLimitMiddleware(_reading_app(state), max_body_bytes=100)
    sent, _ = _run_asgi(mw, [], [b"x" * 60, b"x" * 60, b"x" * 60])  # chunked, no Content-Length
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]
    assert state["read"] == 60  # the app never saw the chunk that passed the cap


def test_body_limit_lets_small_bodies_through():
    state = {"read": 0}
    mw = BodyLimitMiddleware(_reading_app(state), max_body_bytes=100)
    sent, _ = _run_asgi(mw, [(b"content-length", b"100")], [b"x" * 50, b"x" * 50])
    assert sent[0]["status"] == 200 and state["read"] == 100


def test_body_limit_bad_content_length():
    mw = BodyLimitMiddleware(_reading_app({"read": 0}), max_body_bytes=100)
    sent, _ = _run_asgi(mw, [(b"content-length", b"abc")], [b""])
    assert sent[0]["status"] == 400


def test_metrics_by_route_template_and_status(client, images_root):
    data = (images_root / "crow" / "000.jpg").read_bytes()
    for _ in range(3):
        assert search(client, data, k=2).status_code == 200
    assert client.get("/v1/images/1").status_code == 200
    assert client.get("/v1/images/2").status_code == 200
    assert client.get("/v1/images/999").status_code == 404
    assert search(client, b"").status_code == 400
    assert client.get("/no/such/path").status_code == 404
    text = client.get("/metrics").text

    def value(name, **labels):
        lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        m = re.search(rf"^{re.escape(name)}\{{{re.escape(lab)}\}} (\S+)$", text, re.M)
        assert m, (name, lab)
        return float(m.group(1))

    assert value("lookalike_http_requests_total", method="POST", route="/v1/search", status="200") == 3
    assert value("lookalike_http_requests_total", method="POST", route="/v1/search", status="400") == 1
    # ids are not labels: two ids, one series
    assert value("lookalike_http_requests_total", method="GET", route="/v1/images/{image_id}", status="200") == 2
    assert value("lookalike_http_requests_total", method="GET", route="/v1/images/{image_id}", status="404") == 1
    assert value("lookalike_http_requests_total", method="GET", route="<unmatched>", status="404") == 1
    assert value("lookalike_http_request_duration_seconds_count", method="POST", route="/v1/search",
                 status="200") == 3
    assert "lookalike_batch_size_count" in text and "lookalike_batch_size_bucket" in text
    assert re.search(r"^lookalike_queue_depth 0\.0$", text, re.M)
    assert re.search(r"^lookalike_index_size 12\.0$", text, re.M)
    assert re.search(r"^lookalike_ready 1\.0$", text, re.M)


def test_security_headers_and_closed_cors(ro_client):
    resp = ro_client.get("/v1/index", headers={"Origin": "https://evil.example"})
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert "access-control-allow-origin" not in resp.headers
    pre = ro_client.options("/v1/search", headers={"Origin": "https://evil.example",
                                                   "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_cors_opens_only_for_listed_origins(make_client):
    with make_client(cors_origins=["https://app.example"]) as c:
        ok = c.get("/v1/index", headers={"Origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        no = c.get("/v1/index", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in no.headers


def test_page_and_static_assets(ro_client):
    page = ro_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    for needle in ('id="file-input"', 'id="results"', 'role="alert"', "/static/app.js", "/static/style.css"):
        assert needle in html
    js = ro_client.get("/static/app.js")
    assert js.status_code == 200 and "/v1/search" in js.text
    assert ro_client.get("/static/style.css").status_code == 200
    assert_error(ro_client.get("/static/../settings.py"), 404)


def test_openapi_documents_the_api(ro_client):
    spec = ro_client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/search", "/v1/images", "/v1/images/{image_id}", "/v1/images/{image_id}/similar", "/v1/index",
              "/healthz", "/readyz", "/metrics"):
        assert p in paths, p
    body = paths["/v1/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and "k" in body["properties"]
    assert "413" in paths["/v1/search"]["post"]["responses"]
    assert ro_client.get("/docs").status_code == 200


def test_search_response_schema(ro_client, images_root):
    body = search(ro_client, (images_root / "gull" / "002.jpg").read_bytes(), k=4).json()
    from service.schemas import SearchResponse

    SearchResponse.model_validate(body)  # the hot path builds JSON directly; it must match the schema
    assert set(body) == {"results", "k", "offset", "model", "index", "took_ms"} and body["offset"] == 0
    assert body["k"] == 4 and len(body["results"]) == 4
    assert re.fullmatch(r"[0-9a-f]{64}", body["model"]) and isinstance(body["index"], int) and body["took_ms"] > 0
    for r in body["results"]:
        assert set(r) == {"id", "score", "path", "label", "image_url"}
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert body["results"][0]["path"] == "gull/002.jpg" and body["results"][0]["label"] == "gull"


def test_images_are_served_from_the_index_only(ro_client, images_root):
    resp = ro_client.get("/v1/images/1")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    assert resp.content == (images_root / "crow" / "000.jpg").read_bytes()
    for path in ("/v1/images/..%2F..%2Fetc%2Fpasswd", "/v1/images/%2Fetc%2Fpasswd"):
        assert ro_client.get(path).status_code in (404, 422)


def test_index_info(ro_client):
    info = ro_client.get("/v1/index").json()
    assert info["size"] == 12 and info["factory"] == "Flat" and info["recall_at_10"] == 1.0
    assert info["metric"] == "inner_product" and info["backend"] == "torch" and info["dim"] == 32
    assert "images_root" not in info and "directory" not in info  # no server paths


def test_similar_by_id(ro_client):
    body = ro_client.get("/v1/images/3/similar?k=4").json()
    assert len(body["results"]) == 4 and 3 not in [r["id"] for r in body["results"]]
    assert body["k"] == 4


def test_readyz_reports_model_and_index(ro_client):
    body = ro_client.get("/readyz").json()
    assert body["status"] == "ready" and body["index_size"] == 12 and body["backend"] == "torch"
    # torch cannot fork a second handle: one inference thread, batching as configured, not measured
    assert body["inference"] == {"workers": 1, "batch_cap": ro_client.app.state.settings.max_batch,
                                 "batching_measured": None}


def test_images_root_override_serves_from_the_mount(model_dir, template_index, images_root, tmp_path):
    """LOOKALIKE_IMAGES_ROOT: the folder was moved (or is mounted elsewhere in a container)."""
    import shutil

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    moved = tmp_path / "mounted"
    shutil.copytree(images_root, moved)
    s = Settings(model_dir=model_dir, index_dir=template_index, writes_enabled=False, backend="torch", bf16=False,
                 decode_threads=1, images_root=moved)
    with TestClient(create_app(s)) as c:
        resp = c.get("/v1/images/1")
        assert resp.status_code == 200 and resp.content == (moved / "crow" / "000.jpg").read_bytes()
        (moved / "crow" / "000.jpg").unlink()  # tell the two roots apart (the bytes must stay the indexed ones)
        assert c.get("/v1/images/1").status_code == 404
