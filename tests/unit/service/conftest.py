"""Fixtures for the service tests: a tiny seeded model, a folder of images, a real index.

Everything is real (models.TorchBackend, index.IndexStore); only the sizes are tiny
(resnet18 at 64 px, 32-d embeddings, a dozen images) so the suite stays fast.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import API_KEY

N_IMAGES = 12
LABELS = ("crow", "finch", "gull")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from tests.helpers import save_seeded_model

    return save_seeded_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="session")
def images_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        label = LABELS[i % len(LABELS)]
        (root / label).mkdir(exist_ok=True)
        (root / label / f"{i:03d}.jpg").write_bytes(imagegen.jpeg(100 + i))
    return root


def embed_files(model_dir: Path, paths: list[Path]) -> np.ndarray:
    from models import decode_image
    from models.backends import TorchBackend

    backend = TorchBackend(model_dir, bf16=False)
    return backend.embed_images([decode_image(p, draft_size=backend.preprocess.draft_size()) for p in paths])


@pytest.fixture(scope="session")
def template_index(tmp_path_factory, model_dir, images_root) -> Path:
    """An index of the images under ``images_root`` (Flat), built once; copy it before writing."""
    import hashlib

    from index import IndexStore
    from models import load_card

    d = tmp_path_factory.mktemp("template") / "idx"
    paths = sorted(images_root.rglob("*.jpg"))
    vectors = embed_files(model_dir, paths)
    store = IndexStore.create(d, card=load_card(model_dir), images_root=images_root)
    store.add(vectors, [
        {"path": p.relative_to(images_root).as_posix(), "label": p.parent.name,
         "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
         "mtime": p.stat().st_mtime, "source": "folder"}
        for p in paths
    ])
    store.checkpoint()
    store.close()
    return d


@pytest.fixture()
def index_dir(template_index, tmp_path) -> Path:
    d = tmp_path / "idx"
    shutil.copytree(template_index, d)
    return d


@pytest.fixture()
def make_settings(model_dir, index_dir):
    from service.settings import Settings

    def make(**overrides) -> Settings:
        base = dict(model_dir=model_dir, index_dir=index_dir, api_key=API_KEY, backend="torch", bf16=False,
                    decode_threads=1)
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture()
def make_client(make_settings):
    """``with make_client(**settings) as client:`` runs the app's lifespan (model + index loaded)."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    @contextlib.contextmanager
    def make(raise_server_exceptions: bool = True, backend_factory=None, index_opener=None, **overrides):
        app = create_app(make_settings(**overrides), backend_factory=backend_factory, index_opener=index_opener)
        with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
            yield client

    return make


@pytest.fixture()
def client(make_client):
    with make_client() as c:
        yield c



@pytest.fixture(scope="module")
def ro_client(model_dir, template_index):
    """A read-only app over the shared template index, one per test module (fast)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    s = Settings(model_dir=model_dir, index_dir=template_index, writes_enabled=False, backend="torch", bf16=False,
                 decode_threads=1)
    with TestClient(create_app(s)) as c:
        yield c
