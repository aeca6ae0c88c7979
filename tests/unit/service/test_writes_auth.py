"""Writes: the auth matrix on every mutating route; add then search finds it first; delete then
search never returns it; durability across a reopen (in-process; the process restart is e2e)."""

from __future__ import annotations

import pytest

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import API_KEY, assert_error, auth, search

NEW = imagegen.encode(imagegen.pattern(4242, (120, 90)), "PNG")


def _add(c, data=NEW, headers=None, label="new-bird"):
    return c.post("/v1/images", files={"file": ("n.png", data, "image/png")},
                  data={} if label is None else {"label": label}, headers=headers)


def _delete(c, image_id=1, headers=None):
    return c.delete(f"/v1/images/{image_id}", headers=headers)


ROUTES = {"add": _add, "delete": _delete}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_auth_matrix(client, route):
    call = ROUTES[route]
    size = len(client.app.state.lookalike.store)
    # no key
    resp = call(client, headers=None)
    assert_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    # not a bearer key
    assert_error(call(client, headers={"Authorization": f"Basic {API_KEY}"}), 401, "unauthorized")
    assert_error(call(client, headers={"Authorization": "Bearer "}), 401, "unauthorized")
    # wrong keys: another key, a prefix of the right one, the right one with extra bytes
    for wrong in ("x" * len(API_KEY), API_KEY[:-1], API_KEY + "x", API_KEY.upper()):
        assert_error(call(client, headers=auth(wrong)), 403, "forbidden")
    assert len(client.app.state.lookalike.store) == size  # nothing changed
    # right key
    resp = call(client, headers=auth())
    assert resp.status_code in (200, 201), resp.text
    assert len(client.app.state.lookalike.store) == size + (1 if route == "add" else -1)


def test_auth_is_checked_before_the_body_is_read(client):
    big = b"\xff\xd8\xff" + b"\0" * 1000
    assert_error(_add(client, data=big, headers=None), 401)  # not 400 for the bad image


def test_key_comparison_uses_compare_digest(client, monkeypatch):
    import hmac

    import service.deps as deps

    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    assert_error(_delete(client, headers=auth("y" * 24)), 403)
    assert seen and seen[-1][1] == API_KEY.encode()


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_read_only_service_refuses_writes(make_client, route):
    with make_client(writes_enabled=False, api_key=None) as c:
        for headers in (None, auth()):
            assert_error(ROUTES[route](c, headers=headers), 403, "writes_disabled")
        assert c.get("/v1/index").json()["writable"] is False


def test_add_then_search_finds_it_first(client):
    resp = _add(client, headers=auth())
    assert resp.status_code == 201, resp.text
    body = resp.json()
    new_id = body["image"]["id"]
    assert body["created"] is True and body["image"]["label"] == "new-bird" and body["image"]["source"] == "upload"
    assert body["image"]["image_url"] == f"/v1/images/{new_id}"
    assert body["index_size"] == 13
    hits = search(client, NEW, k=5).json()["results"]
    assert hits[0]["id"] == new_id and hits[0]["label"] == "new-bird"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # the stored image is served back byte for byte
    img = client.get(f"/v1/images/{new_id}")
    assert img.status_code == 200 and img.content == NEW and img.headers["content-type"] == "image/png"
    # similar-by-id excludes itself
    sim = client.get(f"/v1/images/{new_id}/similar?k=3").json()["results"]
    assert new_id not in [r["id"] for r in sim] and len(sim) == 3


def test_adding_the_same_bytes_twice_is_not_a_duplicate(client):
    first = _add(client, headers=auth())
    again = _add(client, headers=auth(), label="other")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["created"] is False
    assert again.json()["image"]["id"] == first.json()["image"]["id"]
    assert again.json()["index_size"] == first.json()["index_size"]


def test_add_validates_like_search(client):
    assert_error(_add(client, data=imagegen.truncated_jpeg(), headers=auth()), 400, "truncated")
    assert_error(_add(client, data=imagegen.tiff(), headers=auth()), 415, "unsupported_format")
    assert_error(_add(client, headers=auth(), label="x" * 201), 422, "invalid_parameter")
    assert_error(_add(client, headers=auth(), label="bad\x00label"), 422, "invalid_parameter")
    assert len(client.app.state.lookalike.store) == 12


def test_add_without_label(client):
    resp = _add(client, headers=auth(), label=None)
    assert resp.status_code == 201 and resp.json()["image"]["label"] is None


def test_delete_then_search_never_returns_it(client, images_root):
    query = (images_root / "crow" / "000.jpg").read_bytes()
    top = search(client, query, k=1).json()["results"][0]
    resp = _delete(client, top["id"], headers=auth())
    assert resp.status_code == 200 and resp.json() == {"id": top["id"], "deleted": True, "index_size": 11}
    for k in (1, 5, 100):
        assert top["id"] not in [r["id"] for r in search(client, query, k=k).json()["results"]]
    for other in client.app.state.lookalike.store.search(
            client.app.state.lookalike.store.vector(2)[None, :], 20)[0]:
        assert other.id != top["id"]
    assert top["id"] not in [r["id"] for r in client.get("/v1/images/2/similar?k=100").json()["results"]]
    assert_error(client.get(f"/v1/images/{top['id']}"), 404)
    assert_error(client.get(f"/v1/images/{top['id']}/similar"), 404)
    assert_error(_delete(client, top["id"], headers=auth()), 404, "not_found")  # already gone


def test_delete_uploaded_image_removes_its_file(client):
    new_id = _add(client, headers=auth()).json()["image"]["id"]
    path = client.app.state.lookalike.store.image_path(new_id)
    assert path.is_file()
    assert _delete(client, new_id, headers=auth()).status_code == 200
    assert not path.exists()
    assert new_id not in [r["id"] for r in search(client, NEW, k=20).json()["results"]]


def test_writes_survive_reopening_the_index(make_client):
    with make_client() as c:
        new_id = _add(c, headers=auth()).json()["image"]["id"]
        assert _delete(c, 1, headers=auth()).status_code == 200
    with make_client(checkpoint_every=0) as c:  # a fresh app over the same directory
        hits = search(c, NEW, k=20).json()["results"]
        assert hits[0]["id"] == new_id
        assert 1 not in [h["id"] for h in hits]


def test_checkpoint_every_n_writes_publishes_a_generation(make_client):
    with make_client(checkpoint_every=2) as c:
        gen0 = c.get("/v1/index").json()["generation"]
        assert _add(c, headers=auth()).status_code == 201
        assert c.get("/v1/index").json()["generation"] == gen0
        assert _delete(c, 2, headers=auth()).status_code == 200
        gen1 = c.get("/v1/index").json()["generation"]
        assert gen1 == gen0 + 1
        assert search(c, NEW, k=1).json()["index"] == gen1


def test_graceful_stop_checkpoints_pending_writes(make_client, index_dir):
    from index import IndexStore

    with make_client(checkpoint_every=0) as c:
        gen0 = c.get("/v1/index").json()["generation"]
        assert _add(c, headers=auth()).status_code == 201
    store = IndexStore.open(index_dir)
    try:
        assert store.generation == gen0 + 1 and len(store) == 13
        assert store.info()["pending_changes"] == 0
    finally:
        store.close()
