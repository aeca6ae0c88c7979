"""One error contract (issue 12): SVG is 415, protocol and CORS refusals are JSON, each 500 is
logged once, OpenAPI declares the bearer scheme and the bounds of k, and GET serves only the
bytes that were indexed (sha256 checked)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import httpx

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import assert_error, search
from tests.unit.service.serverthread import connect, read_response, serve

SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'


def test_svg_is_415(ro_client):
    err = assert_error(search(ro_client, SVG, filename="x.svg", content_type="image/svg+xml"), 415,
                       "unsupported_format")
    assert "SVG" in err["message"]


def test_openapi_declares_bearer_scheme_and_k_bounds(ro_client):
    doc = ro_client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"]}
    max_k = ro_client.app.state.settings.max_k
    assert doc["paths"]["/v1/images"]["post"]["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/v1/images/{image_id}"]["delete"]["security"] == [{"bearerAuth": []}]
    assert "security" not in doc["paths"]["/v1/images/{image_id}"]["get"]
    form_k = doc["paths"]["/v1/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["k"]
    assert (form_k["minimum"], form_k["maximum"]) == (1, max_k)
    (k_param,) = [p for p in doc["paths"]["/v1/images/{image_id}/similar"]["get"]["parameters"] if p["name"] == "k"]
    k_int = next(x for x in k_param["schema"]["anyOf"] if x.get("type") == "integer")
    assert (k_int["minimum"], k_int["maximum"]) == (1, max_k)


def test_cors_preflight_refusal_is_json(make_client):
    with make_client(cors_origins=["https://ok.example"], writes_enabled=False, api_key=None) as c:
        r = c.options("/v1/search", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        err = assert_error(r, 400)
        assert "CORS" in err["message"]


class _Leaky:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self):
        return len(self._inner)

    def info(self):
        raise RuntimeError("boom-7f3a in the index")


def test_each_500_is_logged_once_and_protocol_errors_are_json(make_settings, index_dir, caplog):
    from index import IndexStore
    from service.app import create_app
    from service.server import http_protocol

    settings = make_settings(writes_enabled=False, api_key=None)
    app = create_app(settings, index_opener=lambda card, w: _Leaky(IndexStore.open(index_dir, card=card, writable=w)))
    with serve(app, http=http_protocol(settings)) as port, caplog.at_level(logging.DEBUG):
        r = httpx.get(f"http://127.0.0.1:{port}/v1/index", timeout=30)
        assert r.status_code == 500 and r.json() == {"error": {"code": "internal", "message": "internal server error"}}
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        with connect(port) as s:  # not HTTP at all
            s.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            status, headers, body = read_response(s)
            assert status == 400 and headers["content-type"] == "application/json"
            assert json.loads(body)["error"]["code"] == "bad_request"
    mentions = [r for r in caplog.records
                if "boom-7f3a" in r.getMessage() or (r.exc_info and "boom-7f3a" in str(r.exc_info[1]))]
    assert len(mentions) == 1, [(r.name, r.getMessage()) for r in mentions]


def test_get_serves_only_the_indexed_bytes(model_dir, template_index, images_root, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    mount = tmp_path / "mount"
    shutil.copytree(images_root, mount)
    s = Settings(model_dir=model_dir, index_dir=template_index, writes_enabled=False, backend="torch", bf16=False,
                 decode_threads=1, images_root=mount)
    target = mount / "crow" / "000.jpg"
    with TestClient(create_app(s)) as c:
        assert c.get("/v1/images/1").content == target.read_bytes()
        target.write_bytes(imagegen.jpeg(4242))  # replaced after indexing
        assert_error(c.get("/v1/images/1"), 409, "image_changed")
        secret = tmp_path / "outside.jpg"
        secret.write_bytes(b"\xff\xd8\xff" + b"not the indexed image")
        target.unlink()
        os.link(secret, target)  # a hard link planted in the images root
        r = c.get("/v1/images/1")
        assert_error(r, 409, "image_changed")
        assert b"not the indexed image" not in r.content
