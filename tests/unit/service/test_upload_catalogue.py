"""The catalogue of awkward uploads: each gets the right answer and the server stays up."""

from __future__ import annotations


import numpy as np
import pytest

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import assert_error, search


def _alive(client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "name,make,status,code",
    [
        ("empty", lambda: b"", 400, "empty"),
        ("random bytes", imagegen.random_bytes, 400, "undecodable"),
        ("truncated jpeg", imagegen.truncated_jpeg, 400, "truncated"),
        ("png bomb over the pixel limit", lambda: imagegen.png_bomb(7000, 7000), 413, "too_many_pixels"),
        ("png over the side limit", lambda: imagegen.png_bomb(9000, 16), 413, "too_many_pixels"),
        ("png over the full-decode limit (4 MP)", lambda: imagegen.png_bomb(2100, 2000), 413, "too_many_pixels"),
        ("tiff renamed .jpg", imagegen.tiff, 415, "unsupported_format"),
        ("eps renamed .jpg", imagegen.eps, 415, "unsupported_format"),
        ("psd renamed .jpg", imagegen.psd, 415, "unsupported_format"),
        ("bmp renamed .jpg", imagegen.bmp, 415, "unsupported_format"),
    ],
)
def test_refused_uploads(ro_client, name, make, status, code):
    resp = search(ro_client, make(), filename="photo.jpg", content_type="image/jpeg")
    err = assert_error(resp, status, code)
    assert err["message"]
    _alive(ro_client)


@pytest.mark.parametrize(
    "name,make",
    [
        ("1x1 png", lambda: imagegen.encode(imagegen.pattern(1, (1, 1)), "PNG")),
        ("16-bit png", imagegen.png16),
        ("cmyk jpeg", imagegen.cmyk_jpeg),
        ("palette png with transparency", imagegen.palette_transparent_png),
        ("animated gif", imagegen.animated_gif),
        ("webp", lambda: imagegen.encode(imagegen.pattern(13), "WEBP")),
        ("grey jpeg", lambda: imagegen.encode(imagegen.pattern(14).convert("L"), "JPEG")),
    ],
)
def test_valid_but_unusual_images_succeed(ro_client, name, make):
    resp = search(ro_client, make(), k=3, filename="x.jpg")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["results"]) == 3
    assert all(-1.0 <= r["score"] <= 1.0 for r in body["results"])
    _alive(ro_client)


def test_exif_rotated_jpeg_equals_its_upright_twin(ro_client):
    up, rot, rot_plain = imagegen.exif_rotated_pair()
    k = 12
    a = search(ro_client, up, k=k).json()["results"]
    b = search(ro_client, rot, k=k).json()["results"]
    c = search(ro_client, rot_plain, k=k).json()["results"]
    sa = {r["id"]: r["score"] for r in a}
    sb = {r["id"]: r["score"] for r in b}
    sc = {r["id"]: r["score"] for r in c}
    assert set(sa) == set(sb)
    diff_exif = max(abs(sa[i] - sb[i]) for i in sa)
    diff_plain = max(abs(sa[i] - sc[i]) for i in sa)
    assert diff_exif < 2e-3, diff_exif
    # control: the same pixels without the EXIF tag are a different picture to the model
    assert diff_plain > 5 * diff_exif, (diff_plain, diff_exif)


def test_format_decided_by_content_not_filename_or_part_type(ro_client):
    png = imagegen.encode(imagegen.pattern(20), "PNG")
    ok1 = search(ro_client, png, k=2, filename="notes.txt", content_type="text/plain")
    ok2 = search(ro_client, png, k=2, filename="photo.jpg", content_type="image/jpeg")
    assert ok1.status_code == ok2.status_code == 200
    assert ok1.json()["results"] == ok2.json()["results"]
    tif = search(ro_client, imagegen.tiff(), filename="photo.png", content_type="image/png")
    assert_error(tif, 415, "unsupported_format")


def test_wrong_request_content_type(ro_client):
    data = imagegen.jpeg(1)
    assert_error(ro_client.post("/v1/search", content=data, headers={"Content-Type": "image/jpeg"}),
                 415, "unsupported_media_type")
    assert_error(ro_client.post("/v1/search", json={"file": "x"}), 415, "unsupported_media_type")
    assert_error(ro_client.post("/v1/search", content=b""), 415, "unsupported_media_type")
    _alive(ro_client)


def _multipart(preamble: bytes, data: bytes, boundary: str = "bNdRy") -> tuple[bytes, dict]:
    body = (preamble + f"\r\n--{boundary}\r\n".encode()
            + b'Content-Disposition: form-data; name="file"; filename="q.jpg"\r\n'
            + b"Content-Type: image/jpeg\r\n\r\n" + data + f"\r\n--{boundary}--\r\n".encode())
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_huge_multipart_preamble(ro_client):
    """Line breaks before the first boundary (the python-multipart CVE-2024-53981 shape) are
    skipped quickly; other preamble bytes are refused as malformed; over the limit is 413."""
    data = imagegen.jpeg(2)
    body, headers = _multipart(b"\r\n" * (512 * 1024), data)
    resp = ro_client.post("/v1/search", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    body, headers = _multipart(b"x" * (1024 * 1024), data)
    assert_error(ro_client.post("/v1/search", content=body, headers=headers), 400, "bad_multipart")
    limit = ro_client.app.state.settings.max_body_bytes
    body, headers = _multipart(b"\r\n" * (limit // 2 + 1), data)
    assert_error(ro_client.post("/v1/search", content=body, headers=headers), 413, "too_large")
    _alive(ro_client)


def test_malformed_multipart(ro_client):
    headers = {"Content-Type": "multipart/form-data; boundary=abc"}
    resp = ro_client.post("/v1/search", content=b"--abc\r\nContent-Disposition: form-data\r\n\r\nx\r\n--abc--\r\n",
                          headers=headers)
    assert_error(resp, 400, "bad_multipart")  # a part without a name
    assert_error(ro_client.post("/v1/search", content=b"garbage", headers={"Content-Type": "multipart/form-data"}),
                 400, "bad_multipart")
    _alive(ro_client)


def test_two_files_refused(ro_client):
    data = imagegen.jpeg(3)
    resp = ro_client.post("/v1/search", files=[("file", ("a.jpg", data, "image/jpeg")),
                                               ("file", ("b.jpg", data, "image/jpeg"))])
    assert_error(resp, 400, "bad_multipart")


def test_decoded_identically_to_the_models_path(ro_client, model_dir, images_root):
    """The service's embedding of an indexed file equals the index's (score 1, first)."""
    for p in sorted(images_root.rglob("*.jpg"))[:3]:
        body = search(ro_client, p.read_bytes(), k=1).json()
        assert body["results"][0]["path"] == p.relative_to(images_root).as_posix()
        assert np.isclose(body["results"][0]["score"], 1.0, atol=1e-4)
