"""Several named collections in one server: isolated indexes, per-collection models and
fingerprints, a model shared (loaded once) by the collections that use it, the default routes
unchanged, unknown and bad names refused with 404 JSON.

Three collections: ``default`` (the service fixtures' index), ``birds`` (a copy of it, same
model) and ``other`` (half the images, indexed with another seeded model: a different
fingerprint and dimension).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from lookalike.client import Client, LookalikeError
from tests.unit.service import imagegen
from tests.unit.service.apihelpers import API_KEY, assert_error, auth, search


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    from tests.helpers import save_seeded_model

    return save_seeded_model(tmp_path_factory.mktemp("other-model") / "m", embedding_dim=16, seed=7)


@pytest.fixture(scope="module")
def other_template(tmp_path_factory, other_model, images_root) -> Path:
    """An index of every other image under ``images_root``, made with ``other_model``."""
    from index import IndexStore
    from models import load_card
    from tests.unit.service.conftest import embed_files

    paths = sorted(images_root.rglob("*.jpg"))[::2]
    d = tmp_path_factory.mktemp("other-index") / "idx"
    store = IndexStore.create(d, card=load_card(other_model), images_root=images_root)
    store.add(embed_files(other_model, paths), [
        {"path": p.relative_to(images_root).as_posix(), "label": p.parent.name,
         "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
         "mtime": p.stat().st_mtime, "source": "folder"} for p in paths])
    store.checkpoint()
    store.close()
    return d


@pytest.fixture()
def collection_dirs(template_index, other_template, other_model, tmp_path) -> dict:
    birds, other = tmp_path / "birds", tmp_path / "other"
    shutil.copytree(template_index, birds)
    shutil.copytree(other_template, other)
    # "birds" in the string shorthand (default model); "other" with its own model
    return {"birds": str(birds), "other": {"index_dir": str(other), "model_dir": str(other_model)}}


@pytest.fixture()
def multi(make_client, collection_dirs):
    with make_client(collections=collection_dirs) as c:
        yield c


@pytest.fixture(scope="module")
def ro(model_dir, template_index, other_template, other_model):
    """A read-only app over the templates (one per module: starting three collections costs)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    s = Settings(model_dir=model_dir, index_dir=template_index, writes_enabled=False, backend="torch", bf16=False,
                 decode_threads=1, collections={"birds": str(template_index),
                                                "other": {"index_dir": str(other_template),
                                                          "model_dir": str(other_model)}})
    with TestClient(create_app(s)) as c:
        yield c


def _ids(body: dict) -> list[int]:
    return [h["id"] for h in body["results"]]


def _stored(store) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) int64, vectors (N, D) float32) held by an open index."""
    from index.metadata import MetadataDB

    with store.db.snapshot() as con:
        return MetadataDB.all_vectors(con, store.dim)


def test_each_collection_searches_its_own_index_with_its_own_model(ro, images_root, model_dir, other_model):
    from models import load_card

    registry = ro.app.state.collections
    query = (images_root / "gull" / "002.jpg").read_bytes()
    fingerprints = {"default": load_card(model_dir).fingerprint, "birds": load_card(model_dir).fingerprint,
                    "other": load_card(other_model).fingerprint}
    assert fingerprints["other"] != fingerprints["default"]
    for name, fp in fingerprints.items():
        store = registry.get(name).store
        r = ro.post(f"/v1/collections/{name}/search", files={"file": ("q.jpg", query, "image/jpeg")},
                       data={"k": "5"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == fp and len(body["results"]) == 5
        top = body["results"][0]
        assert top["path"] == "gull/002.jpg" and top["score"] > 0.999
        assert top["id"] == next(i for i in _stored(store)[0].tolist() if store.get(i).path == "gull/002.jpg")
        assert all(h["image_url"] == f"/v1/collections/{name}/images/{h['id']}" for h in body["results"])
        # "more like this" by the stored vector: the ranking is the brute force over this collection alone
        ids, vecs = _stored(store)
        q = vecs[ids.tolist().index(top["id"])]
        others = ids != top["id"]
        want = ids[others][np.argsort(-(vecs[others] @ q), kind="stable")[:4]].tolist()
        mean = ro.post(f"/v1/collections/{name}/search/mean", data={"id": str(top["id"]), "k": "4"}).json()
        assert _ids(mean) == want and mean["model"] == fp
        info = ro.get(f"/v1/collections/{name}/index").json()
        assert info["model"] == fp and info["size"] == len(store)
    assert ro.get("/v1/collections/other/index").json()["dim"] == 16
    assert ro.get("/v1/collections/other/index").json()["size"] == 6
    assert ro.get("/v1/index").json()["size"] == 12


def test_default_routes_are_the_default_collection(ro, images_root):
    query = (images_root / "crow" / "000.jpg").read_bytes()
    plain = search(ro, query, k=4).json()
    named = ro.post("/v1/collections/default/search", files={"file": ("q.jpg", query, "image/jpeg")},
                       data={"k": "4"}).json()
    assert _ids(plain) == _ids(named) and plain["model"] == named["model"]
    assert all(h["image_url"].startswith("/v1/images/") for h in plain["results"])
    assert ro.get("/v1/index").json() == ro.get("/v1/collections/default/index").json()
    assert ro.get("/v1/images/3/similar?k=3").json()["results"] == \
        [dict(h, image_url=f"/v1/images/{h['id']}") for h in
         ro.get("/v1/collections/default/images/3/similar?k=3").json()["results"]]


def test_writes_to_one_collection_are_invisible_in_the_others(multi):
    new = imagegen.jpeg(4242, (96, 80))
    r = multi.post("/v1/collections/birds/images", files={"file": ("new.jpg", new, "image/jpeg")},
                   data={"label": "heron"}, headers=auth())
    assert r.status_code == 201, r.text
    new_id = r.json()["image"]["id"]
    assert r.json()["image"]["image_url"] == f"/v1/collections/birds/images/{new_id}"
    assert r.json()["index_size"] == 13
    # birds finds it, and serves its bytes
    hits = multi.post("/v1/collections/birds/search", files={"file": ("q.jpg", new, "image/jpeg")},
                      data={"k": "3"}).json()["results"]
    assert hits[0]["id"] == new_id and hits[0]["label"] == "heron"
    assert multi.get(f"/v1/collections/birds/images/{new_id}").content == new
    # the default collection (same model, same starting index) and "other" do not have it
    for prefix in ("/v1", "/v1/collections/other"):
        assert "heron" not in {h["label"] for h in multi.post(
            f"{prefix}/search", files={"file": ("q.jpg", new, "image/jpeg")}, data={"k": "12"}).json()["results"]}
        assert_error(multi.get(f"{prefix}/images/{new_id}"), 404, "not_found")
    assert multi.get("/v1/index").json()["size"] == 12
    # a delete in the default collection leaves birds' copy of that image
    registry = multi.app.state.collections
    victim = int(_stored(registry.get("default").store)[0][0])
    assert multi.delete(f"/v1/images/{victim}", headers=auth()).status_code == 200
    assert_error(multi.get(f"/v1/images/{victim}/similar"), 404, "not_found")
    assert multi.get(f"/v1/collections/birds/images/{victim}/similar?k=2").status_code == 200
    assert multi.get("/v1/collections/birds/index").json()["size"] == 13
    # each collection's own store holds its own writes
    assert registry.get("birds").store.get(new_id).label == "heron"
    assert registry.get("default").store.get(victim) is None and registry.get("birds").store.get(victim) is not None


def test_a_model_used_by_two_collections_is_loaded_once(ro):
    registry = ro.app.state.collections
    default, birds, other = (registry.get(n) for n in ("default", "birds", "other"))
    assert len(registry.runtimes) == 2
    assert birds.runtime is default.runtime and birds.backend is default.backend
    assert other.runtime is not default.runtime and other.backend is not default.backend
    assert birds.batcher is default.batcher and birds.batcher.store is default.store  # one inference thread


@pytest.mark.parametrize("path", [
    "/v1/collections/nope/search", "/v1/collections/nope/index", "/v1/collections/nope",
    "/v1/collections/nope/images/1/similar", "/v1/collections/-bad/index",
    "/v1/collections/" + "x" * 65 + "/index", "/v1/collections/a%20b/index", "/v1/collections/..%2F..%2Fetc/index",
])
def test_unknown_or_bad_collection_names_get_404_json(ro, path):
    if path.endswith("/search"):
        r = ro.post(path, files={"file": ("q.jpg", imagegen.jpeg(1), "image/jpeg")})
    else:
        r = ro.get(path)
    err = assert_error(r, 404)
    assert err["code"] in ("collection_not_found", "not_found"), err


def test_unknown_collection_names_the_served_ones(ro):
    err = assert_error(ro.get("/v1/collections/nope/index"), 404, "collection_not_found")
    assert "nope" in err["message"] and "birds" in err["message"] and "other" in err["message"]
    assert_error(ro.post("/v1/collections/nope/images", files={"file": ("a.jpg", imagegen.jpeg(2), "image/jpeg")},
                            headers=auth()), 404, "collection_not_found")


def test_listing_readiness_and_metrics_per_collection(multi):
    listed = multi.get("/v1/collections").json()["collections"]
    assert [c["name"] for c in listed] == ["default", "birds", "other"]
    assert {c["status"] for c in listed} == {"ready"}
    assert {c["name"]: c["index_size"] for c in listed} == {"default": 12, "birds": 12, "other": 6}
    assert multi.get("/v1/collections/other").json() == listed[2]
    ready = multi.get("/readyz").json()
    assert ready["status"] == "ready" and ready["collections"] == listed
    multi.post("/v1/collections/birds/images", files={"file": ("n.jpg", imagegen.jpeg(77), "image/jpeg")},
               headers=auth())
    text = multi.get("/metrics").text
    assert re.search(r'^lookalike_collection_index_size\{collection="birds"\} 13\.0$', text, re.M)
    assert re.search(r'^lookalike_collection_index_size\{collection="other"\} 6\.0$', text, re.M)
    assert re.search(r'^lookalike_collection_ready\{collection="other"\} 1\.0$', text, re.M)
    assert re.search(r"^lookalike_index_size 12\.0$", text, re.M)  # the default collection, as before
    assert re.search(r'route="/v1/collections/\{collection\}/images",status="201"', text)


def test_openapi_documents_the_collection_routes(ro):
    paths = ro.get("/openapi.json").json()["paths"]
    assert {"/v1/search", "/v1/collections/{collection}/search", "/v1/collections/{collection}/images/{image_id}",
            "/v1/collections/{collection}/search/mean", "/v1/collections", "/v1/collections/{collection}"} <= set(paths)
    params = paths["/v1/collections/{collection}/images/{image_id}/similar"]["get"]["parameters"]
    assert {"collection", "image_id", "k"} <= {p["name"] for p in params}


def test_a_collection_that_fails_to_load(make_client, collection_dirs, tmp_path):
    broken = dict(collection_dirs, broken=str(tmp_path / "missing"))
    # in the foreground the server does not start, and says which collection failed
    with pytest.raises(Exception, match="not a lookalike index"):
        with make_client(collections=broken):
            pass
    # in the background the others serve; that one answers 503 and is listed as failed
    with make_client(collections=broken, load_in_background=True) as c:
        registry = c.app.state.collections
        _wait_loaded(registry)
        assert registry.get("birds").ready and registry.get("other").ready and not registry.get("broken").ready
        assert "broken" in registry.error
        assert search(c, imagegen.jpeg(3)).status_code == 200
        assert_error(c.get("/v1/collections/broken/index"), 503, "unavailable")
        assert c.get("/v1/collections/broken").json()["status"] == "failed"
        assert_error(c.get("/readyz"), 503)
        text = c.get("/metrics").text
        assert re.search(r'^lookalike_collection_ready\{collection="broken"\} 0\.0$', text, re.M)
        assert re.search(r"^lookalike_ready 0\.0$", text, re.M)


def _wait_loaded(registry, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not all(s.ready or s.error for s in registry.states.values()):
        assert time.monotonic() < deadline, "collections did not finish loading"
        time.sleep(0.05)


def test_client_speaks_to_one_collection(multi, images_root):
    query = images_root / "finch" / "001.jpg"
    with Client(http=multi, api_key=API_KEY, collection="other") as other:
        res = other.search(query, k=3)
        assert all(h.image_url.startswith("/v1/collections/other/") for h in res.hits)
        assert other.index_info().dim == 16 and res.model == other.index_info().model
        added = other.add(imagegen.jpeg(99), label="owl")
        assert added.created and added.index_size == 7
        default = other.in_collection(None)
        assert default.index_info().size == 12 and default.index_info().model != res.model
        assert [c.name for c in default.collections()] == ["default", "birds", "other"]
        with pytest.raises(LookalikeError) as exc:
            other.in_collection("nope").search(query)
        assert (exc.value.status, exc.value.code) == (404, "collection_not_found")


def test_settings_refuse_bad_collection_names(model_dir, tmp_path):
    from service.settings import Settings

    base = dict(model_dir=model_dir, index_dir=tmp_path, writes_enabled=False)
    with pytest.raises(ValidationError, match="reserved"):
        Settings(**base, collections={"default": str(tmp_path)})
    for bad in ("a b", "../x", "", "-x", "x" * 65):
        with pytest.raises(ValidationError, match="not allowed"):
            Settings(**base, collections={bad: str(tmp_path)})
    with pytest.raises(ValidationError, match="LOOKALIKE_MODEL_DIR is not set"):
        Settings(index_dir=tmp_path, writes_enabled=False, collections={"a": str(tmp_path)})
    with pytest.raises(ValidationError, match="extra"):
        Settings(**base, collections={"a": {"index_dir": str(tmp_path), "modle_dir": "x"}})


def test_collections_from_the_environment(monkeypatch, model_dir, tmp_path):
    from service.settings import Settings

    monkeypatch.setenv("LOOKALIKE_COLLECTIONS",
                       f'{{"birds": "{tmp_path / "b"}", "cars": {{"index_dir": "{tmp_path / "c"}", '
                       f'"model_dir": "{tmp_path / "m"}"}}}}')
    s = Settings(model_dir=model_dir, writes_enabled=False)
    assert s.collections["birds"].index_dir == tmp_path / "b" and s.collections["birds"].model_dir is None
    assert s.collections["cars"].model_dir == tmp_path / "m"


def test_serve_flag_and_start_up_checks(model_dir, template_index, tmp_path):
    from service.cli import _parse_collections
    from service.server import load_settings

    assert _parse_collections(["birds=a/b", "cars=/c"]) == {"birds": "a/b", "cars": "/c"}
    for bad in (["birds"], ["=x"], ["birds="], ["a=x", "a=y"]):
        with pytest.raises(ValueError, match="--collection"):
            _parse_collections(bad)
    s = load_settings(model_dir=model_dir, index_dir=template_index, writes_enabled=False,
                      collections=_parse_collections([f"birds={template_index}"]))
    assert s.collections["birds"].index_dir == template_index
    with pytest.raises(FileNotFoundError, match="collection 'cars'"):
        load_settings(model_dir=model_dir, index_dir=template_index, writes_enabled=False,
                      collections={"cars": str(tmp_path / "missing")})
