"""End-to-end fixtures: a real ``lookalike serve`` process (uvicorn) over a real index.

The index holds a small cub100 subset when the dataset is present (so the page shows birds),
otherwise generated images; the model is an untrained seeded resnet18 at 64 px.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, cub100_path
from tests.unit.service import imagegen
from tests.unit.service.apihelpers import API_KEY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def e2e_model(tmp_path_factory) -> Path:
    from tests.helpers import save_seeded_model

    return save_seeded_model(tmp_path_factory.mktemp("e2e-model") / "m")


@pytest.fixture(scope="session")
def e2e_images(tmp_path_factory) -> tuple[Path, list[Path]]:
    """(images root, files to index): 4 images of each of 8 cub100 test classes, or 24 generated."""
    cub = cub100_path()
    classes_file = cub / "splits" / "cub_test_classes.txt"
    if (cub / "images").is_dir() and classes_file.is_file():
        root = cub / "images"
        classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()][:8]
        files = [p for c in classes for p in sorted((root / c).glob("*.jpg"))[:4]]
        if files:
            return root, files
    root = tmp_path_factory.mktemp("e2e-images")
    files = []
    for i in range(24):
        d = root / f"class_{i % 6}"
        d.mkdir(exist_ok=True)
        p = d / f"{i:03d}.jpg"
        p.write_bytes(imagegen.jpeg(300 + i, (160, 120)))
        files.append(p)
    return root, files


def build_index(model_dir: Path, images: tuple[Path, list[Path]], d: Path) -> Path:
    """Index ``images`` (root, files) with the model in ``model_dir`` into a new directory ``d``."""
    from index import IndexStore
    from models import decode_image, load_card
    from models.backends import TorchBackend

    root, files = images
    backend = TorchBackend(model_dir, bf16=False)
    # JPEG draft decoding, as `lookalike index build` and the service do
    vectors = backend.embed_images([decode_image(p, draft_size=backend.preprocess.draft_size()) for p in files])
    store = IndexStore.create(d, card=load_card(model_dir), images_root=root)
    store.add(vectors, [{"path": p.relative_to(root).as_posix(), "label": p.parent.name,
                         "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                         "mtime": p.stat().st_mtime, "source": "folder"} for p in files])
    store.checkpoint()
    store.close()
    return d


@pytest.fixture(scope="session")
def e2e_template_index(tmp_path_factory, e2e_model, e2e_images) -> Path:
    return build_index(e2e_model, e2e_images, tmp_path_factory.mktemp("e2e-index") / "idx")


class ServerProcess:
    """``python -m lookalike serve`` in a subprocess on 127.0.0.1; logs go to ``log_path``."""

    def __init__(self, model_dir: Path, index_dir: Path, log_path: Path, **settings: str) -> None:
        self.model_dir, self.index_dir, self.log_path = model_dir, index_dir, log_path
        self.settings = settings
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "ServerProcess":
        env = dict(os.environ)
        env.update({
            "LOOKALIKE_MODEL_DIR": str(self.model_dir), "LOOKALIKE_INDEX_DIR": str(self.index_dir),
            "LOOKALIKE_API_KEY": API_KEY, "LOOKALIKE_PORT": str(self.port), "LOOKALIKE_HOST": "127.0.0.1",
            "LOOKALIKE_BACKEND": "torch", "LOOKALIKE_BF16": "false", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        })
        env.update({f"LOOKALIKE_{k.upper()}": str(v) for k, v in self.settings.items()})
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "lookalike", "serve"], cwd=REPO, env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture()
def e2e_index(e2e_template_index, tmp_path) -> Path:
    d = tmp_path / "idx"
    shutil.copytree(e2e_template_index, d)
    return d


@pytest.fixture()
def start_server(e2e_model, e2e_index, tmp_path):
    servers: list[ServerProcess] = []

    def start(**settings: str) -> ServerProcess:
        s = ServerProcess(e2e_model, e2e_index, tmp_path / f"server{len(servers)}.log", **settings).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop(signal.SIGKILL)


@pytest.fixture()
def server(start_server) -> ServerProcess:
    return start_server()
