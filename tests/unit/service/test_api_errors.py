"""Every error status the API documents, always as {"error": {"code", "message"}}."""

from __future__ import annotations

import threading
import time

import pytest

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import assert_error, search


class GatedBackend:
    """The real torch backend, whose forward pass waits on ``gate`` (to hold a query in flight)."""

    name = "torch"

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner, self.gate = inner, gate
        self.card, self.preprocess = inner.card, inner.preprocess
        self.calls = 0

    def embed_array(self, batch):
        self.calls += 1
        assert self.gate.wait(30), "gate never opened"
        return self.inner.embed_array(batch)


def torch_backend(model_dir):
    from models.backends import TorchBackend

    return TorchBackend(model_dir, bf16=False)


# ---- 404 / 405 ------------------------------------------------------------------------------
def test_unknown_route_and_method(ro_client):
    assert_error(ro_client.get("/v1/nothing"), 404, "not_found")
    assert_error(ro_client.get("/v1/search"), 405, "method_not_allowed")
    assert_error(ro_client.put("/v1/index"), 405)


def test_unknown_image_id(ro_client):
    assert_error(ro_client.get("/v1/images/999999"), 404, "not_found")
    assert_error(ro_client.get("/v1/images/999999/similar"), 404, "not_found")


# ---- 422 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", ["0", "-3", "abc", "101", "1.5"])
def test_bad_k_on_search(ro_client, k):
    resp = ro_client.post("/v1/search", files={"file": ("a.jpg", imagegen.jpeg(1), "image/jpeg")}, data={"k": k})
    assert "k" in assert_error(resp, 422, "invalid_parameter")["message"]


@pytest.mark.parametrize("query", ["k=0", "k=101", "k=x"])
def test_bad_k_on_similar(ro_client, query):
    assert_error(ro_client.get(f"/v1/images/1/similar?{query}"), 422, "invalid_parameter")


@pytest.mark.parametrize("path", ["/v1/images/abc", "/v1/images/-1", "/v1/images/1.5/similar",
                                  "/v1/images/99999999999999999999999"])
def test_bad_image_id(ro_client, path):
    assert_error(ro_client.get(path), 422, "invalid_parameter")


def test_missing_file_field(ro_client):
    resp = ro_client.post("/v1/search", files={"other": ("a.jpg", imagegen.jpeg(1), "image/jpeg")})
    assert "file" in assert_error(resp, 422, "invalid_parameter")["message"]
    resp = ro_client.post("/v1/search", data={"k": "3"}, files={"x": ("", b"", "text/plain")})
    assert_error(resp, 422, "invalid_parameter")


def test_k_default_and_max(ro_client):
    body = search(ro_client, imagegen.jpeg(1)).json()
    assert body["k"] == 10 and len(body["results"]) == 10
    body = search(ro_client, imagegen.jpeg(1), k=100).json()
    assert body["k"] == 100 and len(body["results"]) == 12  # fewer than k indexed


# ---- 413 ------------------------------------------------------------------------------------
def test_413_by_content_length_before_reading(make_client):
    with make_client(max_upload_bytes=20_000, multipart_overhead_bytes=2048) as c:
        big = b"\xff\xd8\xff" + b"\0" * 30_000
        assert_error(search(c, big), 413, "too_large")
        assert c.get("/healthz").status_code == 200


def test_413_streamed_without_content_length(make_client):
    with make_client(max_upload_bytes=20_000, multipart_overhead_bytes=2048) as c:
        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
            for _ in range(100):
                yield b"\0" * 1000

        resp = c.post("/v1/search", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert_error(resp, 413, "too_large")


def test_413_file_part_over_upload_limit(make_client):
    with make_client(max_upload_bytes=20_000, multipart_overhead_bytes=8192) as c:
        data = imagegen.encode(imagegen.pattern(5, (400, 400)), "PNG")[:20_001]
        assert 20_000 < len(data) and len(data) + 500 < 28_000
        assert_error(search(c, data), 413, "too_large")


# ---- 503 ------------------------------------------------------------------------------------
def test_503_overloaded_answers_at_once_with_retry_after(make_client, model_dir):
    gate = threading.Event()
    gate.set()
    holder = {}

    def factory():
        holder["b"] = GatedBackend(torch_backend(model_dir), gate)
        return holder["b"]

    with make_client(backend_factory=factory, max_pending=1, retry_after_s=3) as c:
        gate.clear()
        base = holder["b"].calls  # warm-up and start-up self-check
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", search(c, imagegen.jpeg(1), k=2)))
        t.start()
        deadline = time.monotonic() + 20
        while holder["b"].calls <= base and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder["b"].calls == base + 1  # the first query is inside the forward pass
        second = {}  # answered while the first still holds the forward pass (the gate is shut)
        t2 = threading.Thread(target=lambda: second.setdefault("r", search(c, imagegen.jpeg(2), k=2)))
        t2.start()
        t2.join(60)
        assert not t2.is_alive(), "the over-capacity query waited instead of being refused"
        resp = second["r"]
        assert_error(resp, 503, "unavailable")
        assert resp.headers["Retry-After"] == "3"
        gate.set()
        t.join(30)
        assert first["r"].status_code == 200
        assert search(c, imagegen.jpeg(2), k=2).status_code == 200  # admitted again once drained
        metrics = c.get("/metrics").text
        assert 'lookalike_rejected_total{reason="overloaded"} 1.0' in metrics


def test_503_while_loading_then_ready(make_client, model_dir):
    gate = threading.Event()

    def factory():
        assert gate.wait(30)
        return torch_backend(model_dir)

    with make_client(backend_factory=factory, load_in_background=True, retry_after_s=2) as c:
        assert c.get("/healthz").status_code == 200
        for resp in (c.get("/readyz"), search(c, imagegen.jpeg(1)), c.get("/v1/index"),
                     c.get("/v1/images/1"), c.get("/v1/images/1/similar")):
            assert_error(resp, 503, "unavailable")
            assert resp.headers["Retry-After"] == "2"
        gate.set()
        deadline = time.monotonic() + 30
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200
        assert search(c, imagegen.jpeg(1)).status_code == 200


def test_failed_background_load_stays_unready_without_leaking_paths(make_client, tmp_path):
    import torch

    from models import ModelCard, save_model
    from models.net import EmbeddingNet

    torch.manual_seed(1)
    other = tmp_path / "other-model"
    save_model(EmbeddingNet(ModelCard(backbone="resnet18", embedding_dim=32, image_size=64, resize_size=72)), other)
    with make_client(model_dir=other, load_in_background=True) as c:
        deadline = time.monotonic() + 30
        state = c.app.state.lookalike
        while state.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "ModelMismatchError" in state.error
        err = assert_error(c.get("/readyz"), 503, "unavailable")
        assert "failed" in err["message"]


def test_mismatched_model_refuses_to_start(make_client, tmp_path):
    import torch

    from index import ModelMismatchError
    from models import ModelCard, save_model
    from models.net import EmbeddingNet

    torch.manual_seed(2)
    other = tmp_path / "other-model"
    save_model(EmbeddingNet(ModelCard(backbone="resnet18", embedding_dim=32, image_size=64, resize_size=72)), other)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        with make_client(model_dir=other):
            pass


# ---- 500 ------------------------------------------------------------------------------------
class LeakyStore:
    """The real store, except that ``info`` fails with an error naming a server path."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def info(self):
        raise OSError(f"{self._inner.directory}/meta.sqlite: disk I/O error")


def test_500_hides_the_exception(make_client, index_dir, caplog):
    from index import IndexStore

    def opener(card, writable):
        return LeakyStore(IndexStore.open(index_dir, card=card, writable=writable))

    with make_client(index_opener=opener, raise_server_exceptions=False) as c:
        resp = c.get("/v1/index")
        err = assert_error(resp, 500, "internal")
        assert err["message"] == "internal server error"
        assert c.get("/healthz").status_code == 200
    assert any("disk I/O error" in r.getMessage() or (r.exc_info and "disk I/O" in str(r.exc_info[1]))
               for r in caplog.records)  # the detail goes to the log, not to the client
