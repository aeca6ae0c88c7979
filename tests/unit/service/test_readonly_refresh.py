"""A read-only server picks up adds and deletes that another writer commits, without a restart."""

from __future__ import annotations

import shutil
import time

import numpy as np


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_readonly_server_follows_another_writer(model_dir, template_index, tmp_path):
    from fastapi.testclient import TestClient

    from index import IndexStore
    from models import load_card
    from service.app import create_app
    from service.settings import Settings

    idx = tmp_path / "idx"
    shutil.copytree(template_index, idx)
    s = Settings(model_dir=model_dir, index_dir=idx, writes_enabled=False, backend="torch", bf16=False,
                 decode_threads=1, refresh_interval_s=0.1)
    with TestClient(create_app(s)) as client:
        size0 = client.get("/v1/index").json()["size"]
        writer = IndexStore.open(idx, card=load_card(model_dir), writable=True)
        try:
            v = np.zeros((1, writer.dim), np.float32)
            v[0, 0] = 1.0
            (new_id,) = writer.add(v, [{"path": "elsewhere/new.jpg", "label": "new", "sha256": "f" * 64,
                                        "size": 1, "mtime": 1.0, "source": "folder"}])
            assert _wait(lambda: client.get("/v1/index").json()["size"] == size0 + 1)
            assert client.get(f"/v1/images/{new_id}/similar?k=1").status_code == 200
            writer.remove([new_id])
            assert _wait(lambda: client.get("/v1/index").json()["size"] == size0)
            assert client.get(f"/v1/images/{new_id}/similar?k=1").status_code == 404
        finally:
            writer.close()


def test_readonly_server_hot_swaps_memory_mapped_generations(model_dir, tmp_path):
    """An ``--on-disk`` IVF index: the replica maps each generation's lists and swaps to the next."""
    import faiss
    from fastapi.testclient import TestClient

    from index import IndexStore
    from models import load_card
    from service.app import create_app
    from service.settings import Settings

    card = load_card(model_dir)
    rng = np.random.default_rng(0)

    def unit(n):
        v = rng.standard_normal((n, card.embedding_dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def recs(start, n):
        return [{"path": f"c/{i}.jpg", "label": "c", "sha256": f"{i:064x}", "size": 1, "mtime": 1.0,
                 "source": "folder"} for i in range(start, start + n)]

    idx = tmp_path / "idx"
    writer = IndexStore.create(idx, card=card, images_root=None, factory="IVF16,Flat", on_disk=True)
    try:
        writer.add(unit(1000), recs(0, 1000))
        writer.checkpoint()
        s = Settings(model_dir=model_dir, index_dir=idx, writes_enabled=False, backend="torch", bf16=False,
                     decode_threads=1, refresh_interval_s=0.1)
        app = create_app(s)
        with TestClient(app) as client:
            store = app.state.lookalike.store
            inv = faiss.extract_index_ivf(store._index).invlists
            assert isinstance(faiss.downcast_InvertedLists(inv), faiss.OnDiskInvertedLists)
            gen0 = client.get("/v1/index").json()["generation"]
            new = writer.add(unit(50), recs(1000, 50))
            gen1 = writer.checkpoint()
            assert _wait(lambda: client.get("/v1/index").json()["generation"] == gen1 > gen0)
            assert client.get("/v1/index").json()["size"] == 1050
            assert app.state.lookalike.store._mmapped
            hits = client.get(f"/v1/images/{new[0]}/similar?k=3").json()["results"]
            assert len(hits) == 3
            writer.remove(new[:10])  # past the generation: applied to a RAM copy
            assert _wait(lambda: client.get("/v1/index").json()["size"] == 1040)
            assert client.get(f"/v1/images/{new[0]}/similar?k=1").status_code == 404
    finally:
        writer.close()
