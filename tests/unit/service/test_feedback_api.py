"""``/v1/feedback``: auth like the other writes, 404/422, marks by indexed query and by upload
(validated like a search upload), listing, and marks readable by index.feedback.read_feedback
after the service stopped and on reopening."""

from __future__ import annotations

import hashlib

import pytest

from index.feedback import read_feedback
from tests.unit.service import imagegen
from tests.unit.service.apihelpers import API_KEY, assert_error, auth, search

QUERY = imagegen.jpeg(4242, (120, 90))


def _post(c, headers=None, files=None, **fields):
    data = {k: str(v) for k, v in fields.items()}
    return c.post("/v1/feedback", data=data, files=files, headers=headers)


def _upload(data: bytes = QUERY, name: str = "q.jpg", ctype: str = "image/jpeg") -> dict:
    return {"file": (name, data, ctype)}


def _ids(c) -> dict[str, int]:
    """path -> id of the indexed images."""
    store = c.app.state.lookalike.store
    return {r.path: r.id for r in store.db.get_many(range(1, 100)).values()}


def test_mark_by_query_id_round_trip(client, index_dir, images_root):
    ids = _ids(client)
    q, r = ids["crow/000.jpg"], ids["finch/001.jpg"]
    resp = _post(client, auth(), verdict="wrong", result_id=r, query_id=q)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body == {"id": body["id"], "verdict": "wrong", "query_id": q, "result_id": r}
    resp = _post(client, auth(), verdict="right", result_id=ids["crow/003.jpg"], query_id=q)
    assert resp.status_code == 201 and resp.json()["id"] > body["id"]
    listed = client.get("/v1/feedback", headers=auth()).json()
    assert listed["total"] == 2 and [i["verdict"] for i in listed["items"]] == ["wrong", "right"]
    first = listed["items"][0]
    assert (first["query_id"], first["query_label"], first["result_id"], first["result_label"],
            first["result_path"]) == (q, "crow", r, "finch", "finch/001.jpg")
    assert first["query_sha256"] == hashlib.sha256((images_root / "crow/000.jpg").read_bytes()).hexdigest()
    # the trainer's view, read while the server still holds the index open for writing
    recs = read_feedback(index_dir)
    assert [(x.verdict, x.query_id, x.result_id) for x in recs] == [("wrong", q, r), ("right", q, ids["crow/003.jpg"])]
    assert recs[0].query_image == (images_root / "crow/000.jpg").resolve() and recs[0].query_image.is_file()
    assert recs[0].result_image == (images_root / "finch/001.jpg").resolve() and recs[0].result_label == "finch"


def test_mark_with_uploaded_query(client, index_dir):
    r = _ids(client)["gull/002.jpg"]
    resp = _post(client, auth(), files=_upload(), verdict="wrong", result_id=r)
    assert resp.status_code == 201, resp.text
    assert resp.json()["query_id"] is None and resp.json()["result_id"] == r
    stored = index_dir / "feedback" / f"{hashlib.sha256(QUERY).hexdigest()}.jpg"
    assert stored.read_bytes() == QUERY
    (rec,) = read_feedback(index_dir)
    assert rec.query_image == stored.resolve() and rec.query_label is None and rec.result_label == "gull"
    assert len(client.app.state.lookalike.store) == 12  # a mark indexes nothing


@pytest.mark.parametrize("method", ["post", "get"])
def test_auth(client, method):
    r = _ids(client)["gull/002.jpg"]

    def call(headers):
        if method == "get":
            return client.get("/v1/feedback", headers=headers)
        return _post(client, headers, verdict="wrong", result_id=r, query_id=r - 1)

    resp = call(None)
    assert_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert_error(call({"Authorization": f"Basic {API_KEY}"}), 401, "unauthorized")
    for wrong in ("x" * len(API_KEY), API_KEY[:-1], API_KEY + "x"):
        assert_error(call(auth(wrong)), 403, "forbidden")
    assert read_feedback(client.app.state.lookalike.store.directory) == []  # nothing stored
    assert call(auth()).status_code in (200, 201)


def test_auth_is_checked_before_the_body_is_read(client):
    assert_error(_post(client, None, files=_upload(imagegen.truncated_jpeg()), verdict="wrong", result_id=1), 401)


@pytest.mark.parametrize("method", ["post", "get"])
def test_read_only_service_refuses(make_client, method):
    with make_client(writes_enabled=False, api_key=None) as c:
        for headers in (None, auth()):
            resp = (c.get("/v1/feedback", headers=headers) if method == "get"
                    else _post(c, headers, verdict="wrong", result_id=1, query_id=2))
            assert_error(resp, 403, "writes_disabled")


def test_unknown_ids_are_404(client, index_dir):
    known = _ids(client)["crow/000.jpg"]
    err = assert_error(_post(client, auth(), verdict="wrong", result_id=99999, query_id=known), 404, "not_found")
    assert "99999" in err["message"]
    err = assert_error(_post(client, auth(), verdict="wrong", result_id=known, query_id=88888), 404, "not_found")
    assert "88888" in err["message"]
    assert_error(_post(client, auth(), files=_upload(), verdict="right", result_id=77777), 404, "not_found")
    assert read_feedback(index_dir) == []


@pytest.mark.parametrize("fields, needle", [
    ({"verdict": "maybe", "result_id": 1, "query_id": 2}, "verdict"),
    ({"result_id": 1, "query_id": 2}, "verdict"),
    ({"verdict": "wrong", "query_id": 2}, "result_id"),
    ({"verdict": "wrong", "result_id": "one", "query_id": 2}, "result_id"),
    ({"verdict": "wrong", "result_id": -1, "query_id": 2}, "result_id"),
    ({"verdict": "wrong", "result_id": 1, "query_id": "2.5"}, "query_id"),
    ({"verdict": "wrong", "result_id": 1}, "exactly one"),
    ({"verdict": "wrong", "result_id": 1, "query_id": 1}, "same image"),
])
def test_bad_parameters_are_422(client, fields, needle):
    err = assert_error(_post(client, auth(), **fields), 422, "invalid_parameter")
    assert needle in err["message"]


def test_query_id_and_file_together_is_422(client):
    err = assert_error(_post(client, auth(), files=_upload(), verdict="wrong", result_id=1, query_id=2), 422)
    assert "exactly one" in err["message"]


@pytest.mark.parametrize("data", [imagegen.truncated_jpeg(), imagegen.tiff(), imagegen.random_bytes(),
                                  imagegen.png_bomb()], ids=["truncated", "tiff", "random", "bomb"])
def test_upload_is_validated_like_search(client, index_dir, data):
    expected = search(client, data)
    assert expected.status_code in (400, 413, 415), expected.text
    resp = _post(client, auth(), files=_upload(data), verdict="wrong", result_id=1)
    assert_error(resp, expected.status_code, expected.json()["error"]["code"])
    assert read_feedback(index_dir) == [] and not (index_dir / "feedback").exists()


def test_upload_over_the_limit_is_413(make_client):
    with make_client(max_upload_bytes=len(QUERY) - 1) as c:
        assert_error(_post(c, auth(), files=_upload(), verdict="wrong", result_id=1), 413, "too_large")


def test_not_a_form_is_415(client):
    resp = client.post("/v1/feedback", json={"verdict": "wrong", "result_id": 1, "query_id": 2}, headers=auth())
    assert_error(resp, 415, "unsupported_media_type")


def test_list_pages(client):
    ids = sorted(_ids(client).values())
    made = [_post(client, auth(), verdict="wrong", result_id=i, query_id=ids[0]).json()["id"] for i in ids[1:6]]
    page = client.get("/v1/feedback", params={"limit": 2, "offset": 1}, headers=auth()).json()
    assert page["total"] == 5 and (page["limit"], page["offset"]) == (2, 1)
    assert [i["id"] for i in page["items"]] == made[1:3]
    assert client.get("/v1/feedback", params={"offset": 5}, headers=auth()).json()["items"] == []
    assert_error(client.get("/v1/feedback", params={"limit": 100000}, headers=auth()), 422, "invalid_parameter")
    assert_error(client.get("/v1/feedback", params={"offset": -1}, headers=auth()), 422, "invalid_parameter")


def test_marks_survive_a_restart(make_client, index_dir):
    with make_client() as c:
        ids = _ids(c)
        a = _post(c, auth(), verdict="wrong", result_id=ids["finch/001.jpg"], query_id=ids["crow/000.jpg"]).json()
        b = _post(c, auth(), files=_upload(), verdict="right", result_id=ids["crow/003.jpg"]).json()
    assert [r.id for r in read_feedback(index_dir)] == [a["id"], b["id"]]
    with make_client() as c:
        listed = c.get("/v1/feedback", headers=auth()).json()
        assert [i["id"] for i in listed["items"]] == [a["id"], b["id"]]
        # deleting a marked image keeps the older marks readable
        assert c.delete(f"/v1/images/{ids['finch/001.jpg']}", headers=auth()).status_code == 200
        assert c.get("/v1/feedback", headers=auth()).json()["items"][0]["result_label"] == "finch"
        assert_error(_post(c, auth(), verdict="wrong", result_id=ids["finch/001.jpg"], query_id=ids["crow/000.jpg"]),
                     404, "not_found")
    recs = read_feedback(index_dir)
    assert [(r.verdict, r.result_label) for r in recs] == [("wrong", "finch"), ("right", "crow")]
