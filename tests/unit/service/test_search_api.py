"""Search API features: label filters, pagination, batch and mean ("more like these") queries.

Rankings are checked against a numpy brute force over the vectors stored in the index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import assert_error, search
from tests.unit.service.conftest import LABELS


@pytest.fixture(scope="module")
def stored(template_index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (N,) int64, vectors (N, D) float32, labels (N,) object) of the served index."""
    from index import IndexStore
    from index.metadata import MetadataDB

    with IndexStore.open(template_index) as store:
        with store.db.snapshot() as con:
            ids, vecs = MetadataDB.all_vectors(con, store.dim)
        labels = np.asarray([store.get(int(i)).label for i in ids], dtype=object)
    return ids, vecs, labels


def _oracle(q: np.ndarray, stored, mask: np.ndarray, k: int) -> list[int]:
    ids, vecs, _ = stored
    s = vecs[mask] @ q
    return ids[mask][np.argsort(-s, kind="stable")[:k]].tolist()


def _ids(body: dict) -> list[int]:
    return [h["id"] for h in body["results"]]


def _file(images_root: Path, label: str, i: int) -> bytes:
    return sorted((images_root / label).glob("*.jpg"))[i].read_bytes()


# ---- filters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", LABELS)
def test_similar_label_filter_keeps_exactly_k_and_matches_bruteforce(ro_client, stored, label):
    ids, vecs, labels = stored
    me = int(ids[0])
    body = ro_client.get(f"/v1/images/{me}/similar", params={"k": 3, "label": label}).json()
    assert len(body["results"]) == 3 and {h["label"] for h in body["results"]} == {label}
    assert _ids(body) == _oracle(vecs[0], stored, (labels == label) & (ids != me), 3)
    # fewer matches than k: all of them, nothing else
    body = ro_client.get(f"/v1/images/{me}/similar", params={"k": 10, "label": label}).json()
    assert sorted(_ids(body)) == sorted(ids[(labels == label) & (ids != me)].tolist())


def test_similar_exclude_label_matches_bruteforce(ro_client, stored):
    ids, vecs, labels = stored
    me = int(ids[1])
    body = ro_client.get(f"/v1/images/{me}/similar", params={"k": 6, "exclude_label": "crow"}).json()
    assert len(body["results"]) == 6 and "crow" not in {h["label"] for h in body["results"]}
    assert _ids(body) == _oracle(vecs[1], stored, (labels != "crow") & (ids != me), 6)


def test_search_label_filter_keeps_exactly_k_of_that_label(ro_client, images_root, stored):
    ids, vecs, labels = stored
    data = _file(images_root, "finch", 0)
    plain = search(ro_client, data, k=1).json()["results"][0]
    q = vecs[ids == plain["id"]][0]  # the uploaded image is indexed: its stored vector is the query
    assert plain["score"] == pytest.approx(1.0, abs=1e-4)
    for label in ("crow", "gull"):
        resp = ro_client.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")},
                              data={"k": "3", "label": label})
        body = resp.json()
        assert resp.status_code == 200 and len(body["results"]) == 3
        assert {h["label"] for h in body["results"]} == {label}
        assert _ids(body) == _oracle(q, stored, labels == label, 3)
    body = ro_client.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")},
                          data={"k": "8", "exclude_label": "finch"}).json()
    assert _ids(body) == _oracle(q, stored, labels != "finch", 8)


def test_unknown_label_gives_no_results_and_bad_filters_are_422(ro_client):
    assert ro_client.get("/v1/images/1/similar", params={"label": "no such"}).json()["results"] == []
    assert_error(ro_client.get("/v1/images/1/similar", params={"label": "x" * 201}), 422, "invalid_parameter")
    err = assert_error(ro_client.post("/v1/search", files={"file": ("q.jpg", imagegen.jpeg(1), "image/jpeg")},
                                      data={"exclude_label": "bad\x00label"}), 422, "invalid_parameter")
    assert err["message"].startswith("exclude_label:")


# ---- pagination ---------------------------------------------------------------------------------
def test_search_pages_concatenate_to_the_top_k(ro_client, images_root):
    data = _file(images_root, "gull", 1)
    top = search(ro_client, data, k=12).json()
    pages = []
    for off in (0, 5, 10):
        resp = ro_client.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")},
                              data={"k": "5", "offset": str(off)})
        assert resp.json()["offset"] == off and resp.json()["k"] == 5
        pages.append(resp.json()["results"])
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [h["id"] for p in pages for h in p] == _ids(top)
    assert [h["score"] for p in pages for h in p] == pytest.approx([h["score"] for h in top["results"]], abs=1e-5)


def test_similar_pages_with_a_filter_concatenate_to_the_filtered_top_k(ro_client, stored):
    ids, _, labels = stored
    me = int(ids[2])
    params = {"exclude_label": "gull"}
    top = _ids(ro_client.get(f"/v1/images/{me}/similar", params={"k": 7, **params}).json())
    pages = [_ids(ro_client.get(f"/v1/images/{me}/similar", params={"k": 3, "offset": o, **params}).json())
             for o in (0, 3, 6)]
    assert sum(pages, []) == top and len(top) == 7 == int((labels != "gull").sum()) - 1


def test_offset_is_bounded_by_max_k(make_client, images_root):
    with make_client(max_k=10) as c:
        assert c.get("/v1/images/1/similar", params={"k": 4, "offset": 6}).status_code == 200
        err = assert_error(c.get("/v1/images/1/similar", params={"k": 4, "offset": 7}), 422, "invalid_parameter")
        assert "max_k=10" in err["message"]
        assert_error(c.get("/v1/images/1/similar", params={"offset": -1}), 422, "invalid_parameter")
        assert_error(c.post("/v1/search", files={"file": ("q.jpg", _file(images_root, "crow", 0), "image/jpeg")},
                            data={"k": "5", "offset": "six"}), 422, "invalid_parameter")


# ---- batch --------------------------------------------------------------------------------------
def _batch(client, files: list[tuple[str, bytes]], **fields):
    return client.post("/v1/search/batch", files=[("file", (n, d, "image/jpeg")) for n, d in files],
                       data={k: str(v) for k, v in fields.items()})


@pytest.mark.parametrize("params", [{"k": 4}, {"k": 3, "offset": 2}, {"k": 3, "label": "crow"},
                                    {"k": 5, "exclude_label": "finch"}])
def test_batch_equals_the_single_queries(ro_client, images_root, params):
    files = [(f"{lab}.jpg", _file(images_root, lab, i)) for i, lab in enumerate(LABELS)]
    files.append(("pattern.jpg", imagegen.jpeg(77)))  # not indexed
    resp = _batch(ro_client, files, **params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["items"]) == len(files) and body["k"] == params["k"]
    assert body["offset"] == params.get("offset", 0)
    for (name, data), item in zip(files, body["items"]):
        single = ro_client.post("/v1/search", files={"file": (name, data, "image/jpeg")},
                                data={k: str(v) for k, v in params.items()}).json()
        assert item["filename"] == name and item["status"] == 200 and "error" not in item
        assert [h["id"] for h in item["results"]] == _ids(single)
        assert [h["score"] for h in item["results"]] == pytest.approx([h["score"] for h in single["results"]],
                                                                      abs=1e-5)
        assert [h["image_url"] for h in item["results"]] == [h["image_url"] for h in single["results"]]


def test_batch_answers_each_bad_image_with_its_own_error(make_client, images_root):
    good = _file(images_root, "crow", 0)
    with make_client(max_upload_bytes=200_000) as c:
        files = [("ok.jpg", good), ("cut.jpg", imagegen.truncated_jpeg()), ("scan.tif", imagegen.tiff()),
                 ("big.jpg", good + b"\0" * 200_000), ("ok2.jpg", good)]
        resp = _batch(c, files, k=2)
        assert resp.status_code == 200, resp.text
        items = resp.json()["items"]
        assert [i["status"] for i in items] == [200, 400, 415, 413, 200]
        assert [i["error"]["code"] for i in items[1:4]] == ["truncated", "unsupported_format", "too_large"]
        assert all(set(i["error"]) == {"code", "message"} and "results" not in i for i in items[1:4])
        assert items[0]["results"] == items[4]["results"] and len(items[0]["results"]) == 2
        single = search(c, imagegen.truncated_jpeg())
        assert single.json()["error"]["code"] == items[1]["error"]["code"] == "truncated"


def test_batch_request_errors(ro_client, images_root):
    from service.routers.search import MAX_BATCH_IMAGES

    no_file = ro_client.post("/v1/search/batch", data={"k": "2"},
                             files={"other": ("x", b"", "application/octet-stream")})  # multipart, no 'file'
    assert_error(no_file, 422, "invalid_parameter")
    assert_error(ro_client.post("/v1/search/batch", content=b"{}", headers={"content-type": "application/json"}),
                 415, "unsupported_media_type")
    small = imagegen.jpeg(5, size=(40, 32))
    err = assert_error(_batch(ro_client, [(f"{i}.jpg", small) for i in range(MAX_BATCH_IMAGES + 1)]),
                       422, "invalid_parameter")
    assert str(MAX_BATCH_IMAGES) in err["message"]
    assert_error(_batch(ro_client, [("a.jpg", small)], k=0), 422, "invalid_parameter")
    assert len(_batch(ro_client, [(f"{i}.jpg", small) for i in range(MAX_BATCH_IMAGES)], k=1).json()["items"]) \
        == MAX_BATCH_IMAGES


# ---- mean ("more like these") -------------------------------------------------------------------
def test_mean_of_indexed_ids_matches_bruteforce_and_excludes_them(ro_client, stored):
    ids, vecs, labels = stored
    pick = [0, 3, 7]
    mean = vecs[pick].mean(axis=0)
    mean /= np.linalg.norm(mean)
    resp = ro_client.post("/v1/search/mean", data={"id": [str(int(ids[i])) for i in pick], "k": "5"})
    assert resp.status_code == 200, resp.text
    assert _ids(resp.json()) == _oracle(mean, stored, ~np.isin(ids, ids[pick]), 5)
    resp = ro_client.post("/v1/search/mean", data={"id": [str(int(ids[i])) for i in pick], "k": "3",
                                                   "label": "gull"})
    assert _ids(resp.json()) == _oracle(mean, stored, ~np.isin(ids, ids[pick]) & (labels == "gull"), 3)


def test_mean_of_one_upload_equals_the_single_search(ro_client, images_root):
    data = _file(images_root, "crow", 1)
    single = search(ro_client, data, k=5).json()
    mean = ro_client.post("/v1/search/mean", files=[("file", ("q.jpg", data, "image/jpeg"))], data={"k": "5"}).json()
    assert _ids(mean) == _ids(single)
    assert [h["score"] for h in mean["results"]] == pytest.approx([h["score"] for h in single["results"]], abs=1e-5)


def test_mean_of_uploads_and_ids_is_the_renormalised_mean(ro_client, images_root, stored):
    ids, vecs, _ = stored
    a, b = _file(images_root, "finch", 0), _file(images_root, "gull", 0)
    va = vecs[ids == search(ro_client, a, k=1).json()["results"][0]["id"]][0]
    vb = vecs[ids == search(ro_client, b, k=1).json()["results"][0]["id"]][0]
    mean = va + vb + vecs[5]
    mean /= np.linalg.norm(mean)
    resp = ro_client.post("/v1/search/mean", files=[("file", ("a.jpg", a, "image/jpeg")),
                                                    ("file", ("b.jpg", b, "image/jpeg"))],
                          data={"id": str(int(ids[5])), "k": "6"})
    assert resp.status_code == 200, resp.text
    assert _ids(resp.json()) == _oracle(mean, stored, ids != ids[5], 6)


def test_mean_errors(ro_client, images_root):
    good = _file(images_root, "crow", 0)
    err = assert_error(ro_client.post("/v1/search/mean", files=[("file", ("ok.jpg", good, "image/jpeg")),
                                                                 ("file", ("cut.jpg", imagegen.truncated_jpeg(),
                                                                           "image/jpeg"))]), 400, "truncated")
    assert err["message"].startswith("file 2 (cut.jpg):")
    assert_error(ro_client.post("/v1/search/mean", data={"id": "999999"}), 404, "not_found")
    assert_error(ro_client.post("/v1/search/mean", data={"id": "abc"}), 422, "invalid_parameter")
    assert_error(ro_client.post("/v1/search/mean", data={"k": "3"}), 422, "invalid_parameter")


def test_openapi_documents_the_new_routes(ro_client):
    spec = ro_client.get("/openapi.json").json()
    for path in ("/v1/search/batch", "/v1/search/mean"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert {"file", "k", "offset", "label", "exclude_label"} <= set(body["properties"])
    params = {p["name"] for p in spec["paths"]["/v1/images/{image_id}/similar"]["get"]["parameters"]}
    assert {"k", "offset", "label", "exclude_label"} <= params
    assert "BatchSearchResponse" in spec["components"]["schemas"]
    assert "offset" in spec["components"]["schemas"]["SearchResponse"]["properties"]
