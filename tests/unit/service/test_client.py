"""lookalike.client against the real app (FastAPI TestClient is an httpx.Client)."""

from __future__ import annotations

import io

import httpx
import pytest

from lookalike.client import AddResult, BatchItem, Client, Hit, IndexInfo, LookalikeError, SearchResult
from tests.unit.service import imagegen
from tests.unit.service.apihelpers import API_KEY, search


@pytest.fixture()
def api(client):
    with Client(http=client, api_key=API_KEY) as c:
        yield c


def _query(images_root):
    return images_root / "gull" / "002.jpg"


def test_search_from_path_bytes_and_file_equals_the_raw_http_answer(api, client, images_root):
    path = _query(images_root)
    raw = search(client, path.read_bytes(), k=4).json()
    want = [(h["id"], h["path"], h["label"], h["image_url"]) for h in raw["results"]]
    for image in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        res = api.search(image, k=4)
        assert isinstance(res, SearchResult) and all(isinstance(h, Hit) for h in res.hits)
        assert [(h.id, h.path, h.label, h.image_url) for h in res.hits] == want
        assert [h.score for h in res.hits] == pytest.approx([h["score"] for h in raw["results"]], abs=1e-5)
        assert res.k == 4 and res.offset == 0 and res.model == raw["model"] and res.index == raw["index"]


def test_filters_and_pages_pass_through(api, images_root):
    path = _query(images_root)
    crows = api.search(path, k=3, label="crow")
    assert len(crows.hits) == 3 and {h.label for h in crows.hits} == {"crow"}
    assert "gull" not in {h.label for h in api.search(path, k=8, exclude_label="gull").hits}
    top = api.search(path, k=6).hits
    assert api.search(path, k=3).hits + api.search(path, k=3, offset=3).hits == top
    me = top[0].id
    sim = api.similar(me, k=4, offset=1, label="gull")
    assert sim.offset == 1 and me not in {h.id for h in sim.hits} and {h.label for h in sim.hits} == {"gull"}
    assert [h.id for h in api.similar(me, k=2).hits + api.similar(me, k=2, offset=2).hits] == \
        [h.id for h in api.similar(me, k=4).hits]


def test_batch_and_mean(api, images_root):
    a, b = images_root / "crow" / "000.jpg", images_root / "finch" / "001.jpg"
    items = api.search_batch([a, imagegen.truncated_jpeg(), b], k=3)
    assert [type(i) for i in items] == [BatchItem] * 3 and [i.ok for i in items] == [True, False, True]
    assert [h.id for h in items[0].hits] == [h.id for h in api.search(a, k=3).hits]
    assert [h.id for h in items[2].hits] == [h.id for h in api.search(b, k=3).hits]
    err = items[1].error
    assert isinstance(err, LookalikeError) and (err.status, err.code) == (400, "truncated") and items[1].hits is None
    assert items[0].filename == "000.jpg"
    one = api.search_mean([a], k=3)
    assert [h.id for h in one.hits] == [h.id for h in api.search(a, k=3).hits]
    ids = [h.id for h in api.search(a, k=2).hits]
    by_ids = api.search_mean(ids=ids, k=3)
    assert len(by_ids.hits) == 3 and not {h.id for h in by_ids.hits} & set(ids)
    with pytest.raises(ValueError):
        api.search_mean()
    with pytest.raises(ValueError):
        api.search_batch([])


def test_add_delete_and_index_info(api, images_root):
    info = api.index_info()
    assert isinstance(info, IndexInfo) and info.size == 12 and info.factory == "Flat" and info.writable
    data = imagegen.jpeg(4242)
    added = api.add(data, label="mine")
    assert isinstance(added, AddResult) and added.created and added.index_size == 13
    assert added.image.label == "mine" and added.image.source == "upload" and added.image.size == len(data)
    assert api.add(data, label="mine").created is False
    assert api.image(added.image.id) == data
    assert api.search(data, k=1, label="mine").hits[0].id == added.image.id
    gone = api.delete(added.image.id)
    assert gone.deleted and gone.id == added.image.id and gone.index_size == 12
    assert api.index_info().size == 12


def test_errors_are_typed_with_the_service_code_and_message(api, client):
    with pytest.raises(LookalikeError) as e:
        api.search(imagegen.truncated_jpeg())
    assert (e.value.status, e.value.code) == (400, "truncated") and e.value.message
    with pytest.raises(LookalikeError) as e:
        api.similar(999_999)
    assert (e.value.status, e.value.code) == (404, "not_found") and "999999" in e.value.message
    with pytest.raises(LookalikeError) as e:
        api.search(imagegen.jpeg(1), k=0)
    assert (e.value.status, e.value.code) == (422, "invalid_parameter")
    with pytest.raises(LookalikeError) as e:
        api.delete(999_999)
    assert e.value.status == 404
    with pytest.raises(LookalikeError) as e:
        Client(http=client, api_key="wrong-key-0123456789").add(imagegen.jpeg(2))
    assert (e.value.status, e.value.code) == (403, "forbidden")
    with pytest.raises(LookalikeError) as e:
        Client(http=client, api_key="").add(imagegen.jpeg(2))
    assert e.value.status is None and e.value.code == "unauthorized"
    with pytest.raises(TypeError):
        api.search(12345)  # type: ignore[arg-type]


def test_503_carries_retry_after_and_transport_errors_are_typed():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/v1/index"):
            return httpx.Response(503, headers={"Retry-After": "7"},
                                  json={"error": {"code": "unavailable", "message": "not ready: loading"}})
        if request.url.path.endswith("/v1/images/1/similar"):
            return httpx.Response(502, text="<html>bad gateway</html>")
        raise httpx.ConnectError("connection refused", request=request)

    with httpx.Client(base_url="http://proxy.example/lookalike", transport=httpx.MockTransport(handler)) as http:
        api = Client(http=http)
        with pytest.raises(LookalikeError) as e:
            api.index_info()
        assert (e.value.status, e.value.code, e.value.retry_after) == (503, "unavailable", 7.0)
        with pytest.raises(LookalikeError) as e:
            api.similar(1)
        assert (e.value.status, e.value.code) == (502, "http_502") and "bad gateway" in e.value.message
        with pytest.raises(LookalikeError) as e:
            api.image(3)
        assert e.value.status is None and e.value.code == "transport_error"
