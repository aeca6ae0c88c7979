"""service.uploads on its own: the form reader, k and label parsing, and upload decoding.

The form reader runs inside a two-route Starlette app (so Starlette's in-app error path is the
one exercised) and, for the out-of-app path, on a bare ``Request`` fed by a receive callable.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from models.card import ModelCard
from models.decode import DEFAULT_LIMITS
from models.preprocess import Preprocess
from service.errors import ApiError
from service.uploads import (
    MAX_LABEL_CHARS,
    decode_to_input,
    parse_k,
    parse_label,
    read_upload,
    upload_openapi,
)
from tests.unit.service import imagegen

LIMIT = 64  # bytes: the upload cap of the test app


def _answer(upload_or_error) -> JSONResponse:
    if isinstance(upload_or_error, ApiError):
        return JSONResponse({"status": upload_or_error.status, "code": upload_or_error.code}, status_code=299)
    u = upload_or_error
    return JSONResponse({"size": None if u.data is None else len(u.data), "fields": u.fields})


def _route(file_required: bool):
    async def endpoint(request: Request) -> JSONResponse:
        try:
            return _answer(await read_upload(request, LIMIT, file_required=file_required))
        except ApiError as exc:
            return _answer(exc)
    return endpoint


@pytest.fixture(scope="module")
def client():
    app = Starlette(routes=[Route("/required", _route(True), methods=["POST"]),
                            Route("/optional", _route(False), methods=["POST"])])
    with TestClient(app) as c:
        yield c


def _post(client, path="/required", **kw) -> dict:
    resp = client.post(path, **kw)
    assert resp.status_code in (200, 299), resp.text
    return resp.json()


# ---------------------------------------------------------------------------- read_upload


def test_a_file_up_to_the_limit_is_read_whole_and_one_byte_more_is_413(client):
    assert _post(client, files={"file": ("a.jpg", b"x" * LIMIT)})["size"] == LIMIT
    assert _post(client, files={"file": ("a.jpg", b"x" * (LIMIT + 1))}) == {"status": 413, "code": "too_large"}


def test_other_fields_come_back_as_strings(client):
    got = _post(client, files={"file": ("a.jpg", b"abc")}, data={"label": "cat", "k": "3"})
    assert got == {"size": 3, "fields": {"label": "cat", "k": "3"}}


def test_the_multipart_media_type_is_case_insensitive(client):
    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\nabc\r\n--B--\r\n")
    got = _post(client, content=body, headers={"Content-Type": "Multipart/Form-Data; boundary=B"})
    assert got["size"] == 3


@pytest.mark.parametrize("ctype", ["application/json", "application/x-www-form-urlencoded", ""])
def test_a_required_file_needs_multipart(client, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    assert _post(client, content=b"k=3", headers=headers) == {"status": 415, "code": "unsupported_media_type"}


def test_without_a_required_file_a_urlencoded_form_is_read(client):
    assert _post(client, "/optional", data={"verdict": "wrong"}) == {"size": None, "fields": {"verdict": "wrong"}}
    assert _post(client, "/optional", content=b"{}", headers={"Content-Type": "application/json"})["code"] \
        == "unsupported_media_type"


def test_a_missing_file_is_422_when_required_and_none_otherwise(client):
    assert _post(client, data={"k": "1"}, files={"other": ("a.jpg", b"abc")}) \
        == {"status": 422, "code": "invalid_parameter"}
    assert _post(client, "/optional", files={"other": ("a.jpg", b"abc")})["size"] is None


def test_sixteen_fields_are_read_and_seventeen_are_a_bad_multipart(client):
    fields = {f"f{i}": "v" for i in range(16)}
    assert len(_post(client, files={"file": ("a.jpg", b"abc")}, data=fields)["fields"]) == 16
    fields["f16"] = "v"
    assert _post(client, files={"file": ("a.jpg", b"abc")}, data=fields) == {"status": 400, "code": "bad_multipart"}


def test_a_text_field_over_16_kib_is_a_bad_multipart(client):
    ok = _post(client, files={"file": ("a.jpg", b"abc")}, data={"label": "x" * (16 * 1024 - 1)})
    assert len(ok["fields"]["label"]) == 16 * 1024 - 1
    got = _post(client, files={"file": ("a.jpg", b"abc")}, data={"label": "x" * (16 * 1024 + 1)})
    assert got == {"status": 400, "code": "bad_multipart"}


def test_malformed_multipart_is_400(client):
    got = _post(client, content=b"garbage", headers={"Content-Type": "multipart/form-data"})
    assert got == {"status": 400, "code": "bad_multipart"}


def _bare_request(body: bytes, ctype: str, disconnect: bool = False) -> Request:
    """A Request outside any app (no ``app`` in the scope): Starlette raises its own
    MultiPartException there instead of an HTTPException."""
    sent = False

    async def receive():
        nonlocal sent
        if disconnect:
            return {"type": "http.disconnect"}
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", ctype.encode())],
             "query_string": b""}
    return Request(scope, receive)


def _bare(body: bytes, ctype: str, disconnect: bool = False) -> ApiError | object:
    try:
        return asyncio.run(read_upload(_bare_request(body, ctype, disconnect), LIMIT))
    except ApiError as exc:
        return exc


def test_malformed_multipart_outside_an_app_is_400_too():
    err = _bare(b"garbage", "multipart/form-data")
    assert isinstance(err, ApiError) and (err.status, err.code) == (400, "bad_multipart")


def test_a_client_that_disconnects_mid_body_is_400():
    err = _bare(b"", "multipart/form-data; boundary=B", disconnect=True)
    assert isinstance(err, ApiError) and (err.status, err.code) == (400, "bad_request")


def test_the_uploaded_file_is_closed_after_reading(client, monkeypatch):
    closed = []
    real_close = UploadFile.close

    async def close(self):
        closed.append(self.filename)
        await real_close(self)

    monkeypatch.setattr(UploadFile, "close", close)
    _post(client, files={"file": ("a.jpg", b"abc")})
    assert closed == ["a.jpg"]


def test_upload_openapi_requires_the_file_and_adds_fields():
    spec = upload_openapi(("label", {"type": "string"}))["requestBody"]
    assert spec["required"] is True
    schema = spec["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"] and set(schema["properties"]) == {"file", "label"}


# ---------------------------------------------------------------------------- k and label


@pytest.mark.parametrize("raw,want", [(None, 7), ("", 7), ("1", 1), (5, 5), ("20", 20)])
def test_parse_k_accepts_1_to_max_k_and_defaults_when_empty(raw, want):
    assert parse_k(raw, 7, 20) == want


@pytest.mark.parametrize("raw", ["0", "21", "-1", "three", "2.5", " "])
def test_parse_k_refuses_out_of_range_and_non_integers(raw):
    with pytest.raises(ApiError) as err:
        parse_k(raw, 7, 20)
    assert (err.value.status, err.value.code) == (422, "invalid_parameter")


@pytest.mark.parametrize("raw,want", [(None, None), ("", None), ("   ", None), ("  cat \n", "cat"),
                                      ("a b", "a b"), ("x" * MAX_LABEL_CHARS, "x" * MAX_LABEL_CHARS),
                                      (" " + "x" * MAX_LABEL_CHARS + " ", "x" * MAX_LABEL_CHARS)])
def test_parse_label_strips_and_keeps_up_to_200_characters(raw, want):
    assert MAX_LABEL_CHARS == 200
    assert parse_label(raw) == want


@pytest.mark.parametrize("raw", ["x" * (MAX_LABEL_CHARS + 1), "a\x00b", "tab\there"])
def test_parse_label_refuses_long_or_unprintable_labels(raw):
    with pytest.raises(ApiError) as err:
        parse_label(raw)
    assert (err.value.status, err.value.code) == (422, "invalid_parameter")


# ---------------------------------------------------------------------------- decoding


def test_uploads_are_draft_decoded_like_the_index_decodes_files():
    """A large JPEG is decoded at a reduced DCT scale by default, exactly as the batch job's
    ``Preprocess.load(jpeg_draft=True)`` does, so a query of an indexed file finds it at 1.0."""
    card = ModelCard(backbone="tiny", embedding_dim=8, image_size=32, resize_size=36)
    pre = Preprocess(card)
    data = imagegen.jpeg(3, size=(640, 480))
    drafted = pre.load(data, limits=DEFAULT_LIMITS, jpeg_draft=True)
    full = pre.load(data, limits=DEFAULT_LIMITS, jpeg_draft=False)
    assert not np.array_equal(drafted, full)  # the test can tell the two apart
    got = decode_to_input(data, pre, DEFAULT_LIMITS)
    assert got.shape == (3, 32, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got, drafted)
    np.testing.assert_array_equal(decode_to_input(data, pre, DEFAULT_LIMITS, jpeg_draft=False), full)



def test_only_starlettes_400_becomes_bad_multipart(monkeypatch):
    """Inside an app Starlette reports a malformed body as HTTPException(400); any other status
    from the form parser is passed on untouched, not relabelled as a malformed body."""
    from starlette.exceptions import HTTPException

    async def form(self, **kw):
        raise HTTPException(status_code=413, detail="too big")

    monkeypatch.setattr(Request, "form", form)
    with pytest.raises(HTTPException) as err:
        asyncio.run(read_upload(_bare_request(b"", "multipart/form-data; boundary=B"), LIMIT))
    assert err.value.status_code == 413
