"""Index the 42 cub100 test classes with a real (seeded, untrained) model and query every image.

Each indexed image, decoded and embedded again through the same pipeline, must come back first
with cosine ~1; labels come from the ImageFolder layout; a re-run adds nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index import IndexStore
from index.ingest import Embedder, index_folder

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tests.helpers import save_seeded_model

    return save_seeded_model(tmp_path_factory.mktemp("cubmodel") / "m", embedding_dim=128, image_size=112,
                             resize_size=128)


def test_index_cub100_test_classes_and_find_every_image_first(cub100, model_dir, tmp_path):
    from models import decode_image

    classes = [c.strip() for c in (cub100 / "splits" / "cub_test_classes.txt").read_text().splitlines() if c.strip()]
    assert len(classes) == 42
    files = sorted(p for c in classes for p in (cub100 / "images" / c).iterdir() if p.suffix == ".jpg")
    embedder = Embedder.load(model_dir)
    store = IndexStore.create(tmp_path / "ix", card=embedder.card, images_root=cub100 / "images",
                              model_dir=model_dir)
    rep = index_folder(store, embedder, cub100 / "images", include=classes, labels_from_folders=True,
                       workers=2, progress=False)
    assert (rep.added, rep.failed, rep.duplicates) == (len(files), 0, 0) == (2474, 0, 0)
    assert len(store) == 2474 and store.info()["factory"] == "Flat"
    store.close()

    store = IndexStore.open(tmp_path / "ix", card=embedder.card)
    rels = [f.relative_to(cub100 / "images").as_posix() for f in files]
    recs = [store.get_by_path(r) for r in rels]
    assert all(r is not None and r.label == Path(r.path).parent.name for r in recs)
    # every image, decoded and embedded again (other batch compositions), finds itself first
    draft = embedder.preprocess.draft_size()
    for start in range(0, len(files), 128):
        chunk = files[start:start + 128]
        q = embedder.backend.embed_images([decode_image(f, draft_size=draft) for f in chunk])
        for rec, hits in zip(recs[start:start + 128], store.search(q, 5)):
            assert hits[0].id == rec.id, (rec.path, hits[:2])
            assert hits[0].score == pytest.approx(1.0, abs=1e-3)
            assert hits[0].score > hits[1].score
    store.close()

    store = IndexStore.open(tmp_path / "ix", card=embedder.card, writable=True)
    again = index_folder(store, embedder, cub100 / "images", include=classes, workers=0, progress=False)
    assert (again.added, again.unchanged) == (0, 2474)
    store.close()
