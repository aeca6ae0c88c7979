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
