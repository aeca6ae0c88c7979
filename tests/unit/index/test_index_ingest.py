"""The batch job on tiny generated images with a tiny real model, and the CLI around it."""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import pytest

from index import IndexStore, ModelMismatchError
from index.ingest import Embedder, index_folder, walk_images
from tests.unit.index.helpers import make_card, write_images


@pytest.fixture(scope="module")
def embedder(tiny_model):
    return Embedder.load(tiny_model, bf16=False)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    write_images(root, {"crow": 5, "finch": 4, "gull": 3})
    (root / "crow" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)  # JPEG header, no data
    (root / "gull" / "empty.png").write_bytes(b"")
    (root / "gull" / "doc.tiff").write_bytes(b"II*\x00" + b"\x00" * 64)
    (root / "finch" / "readme.txt").write_text("not an image")
    shutil.copy(root / "crow" / "1.jpg", root / "finch" / "same-as-crow-1.jpg")
    return root


def _create(tmp_path, embedder, root):
    return IndexStore.create(tmp_path / "ix", card=embedder.card, images_root=root)


def test_counts_labels_failures_and_log(tmp_path, embedder, tree):
    store = _create(tmp_path, embedder, tree)
    rep = index_folder(store, embedder, tree, labels_from_folders=True, batch_size=4, workers=0, progress=False)
    assert (rep.added, rep.unchanged, rep.duplicates, rep.failed, rep.ignored) == (12, 0, 1, 3, 1)
    reasons = {rel: code for rel, code, _ in rep.failures}
    assert reasons == {"crow/broken.jpg": reasons["crow/broken.jpg"], "gull/empty.png": "empty",
                       "gull/doc.tiff": "unsupported_format"}
    assert reasons["crow/broken.jpg"] in ("truncated", "undecodable")
    text = rep.log_path.read_text()
    assert "FAILED\tgull/doc.tiff\tunsupported_format" in text and "DUPLICATE\tfinch/same-as-crow-1.jpg" in text
    assert len(store) == 12
    labels = {}
    for rid in range(1, 40):
        r = store.get(rid)
        if r is not None:
            labels[r.path] = r.label
    assert labels["crow/0.png"] == "crow" and labels["gull/2.jpg"] == "gull" and len(labels) == 12
    # each indexed image finds itself first with cosine ~1 when embedded again
    rec = store.get_by_path("finch/2.jpg")
    from models import decode_image

    q = embedder.backend.embed_images([decode_image(tree / "finch" / "2.jpg",
                                                    draft_size=embedder.preprocess.draft_size())])
    top = store.search(q, 3)[0][0]
    assert top.id == rec.id and top.score == pytest.approx(1.0, abs=1e-4)
    assert rep.generation is not None and store.generation == rep.generation
    store.close()


def test_second_run_adds_nothing_and_changed_files_are_replaced(tmp_path, embedder, tree):
    store = _create(tmp_path, embedder, tree)
    index_folder(store, embedder, tree, batch_size=5, workers=0, progress=False)
    ids_before = {store.get_by_path(p).id for p in ("crow/1.jpg", "gull/1.jpg")}
    rep = index_folder(store, embedder, tree, batch_size=5, workers=0, progress=False)
    assert (rep.added, rep.unchanged, rep.duplicates, rep.failed) == (0, 12, 1, 3)
    assert len(store) == 12
    # touch without changing bytes: unchanged; rewrite with other pixels: replaced under a new id
    os.utime(tree / "crow" / "1.jpg", (1e9, 1e9))
    write_images(tree / "_tmp", {"g": 2}, seed=99)
    shutil.copy(tree / "_tmp" / "g" / "1.jpg", tree / "gull" / "1.jpg")
    shutil.rmtree(tree / "_tmp")
    rep = index_folder(store, embedder, tree, batch_size=5, workers=0, progress=False)
    assert (rep.added, rep.replaced, rep.unchanged) == (1, 1, 11)
    assert len(store) == 12
    ids_after = {store.get_by_path(p).id for p in ("crow/1.jpg", "gull/1.jpg")}
    assert len(ids_before & ids_after) == 1  # crow/1 kept its id, gull/1 got a new one
    store.close()


def test_workers_and_include_subset(tmp_path, embedder, tree):
    store = _create(tmp_path, embedder, tree)
    rep = index_folder(store, embedder, tree, include=["gull"], batch_size=2, workers=2, progress=False)
    assert (rep.added, rep.failed) == (3, 2) and len(store) == 3
    sub = index_folder(store, embedder, tree / "crow", batch_size=8, workers=2, progress=False)
    assert sub.added == 5 and store.get_by_path("crow/0.png") is not None  # paths stay relative to the root
    store.close()


def test_refusals(tmp_path, embedder, tree):
    store = _create(tmp_path, embedder, tree)
    with pytest.raises(ValueError, match="outside the index's images root"):
        index_folder(store, embedder, tmp_path, workers=0, progress=False)
    store.close()
    other = IndexStore.create(tmp_path / "other", card=make_card("c", dim=32), images_root=tree)
    with pytest.raises(ModelMismatchError, match=embedder.card.fingerprint):
        index_folder(other, embedder, tree, workers=0, progress=False)
    other.close()
    with pytest.raises(FileNotFoundError):
        walk_images(tree / "nope")


def _cli(argv: list[str]) -> int:
    from index import cli

    parser = argparse.ArgumentParser(prog="lookalike")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_build_info_search_remove(tmp_path, tiny_model, tree, capsys):
    out = tmp_path / "ix"
    common = ["--labels-from-folders", "--workers", "0", "--no-progress", "--no-bf16"]
    assert _cli(["index", "build", "--model", str(tiny_model), "--images", str(tree), "--out", str(out), *common]) == 0
    text = capsys.readouterr().out
    assert "added 12, unchanged 0, duplicates 1, failed 3" in text and "gull/doc.tiff" in text
    assert _cli(["index", "build", "--model", str(tiny_model), "--images", str(tree), "--out", str(out), *common]) == 0
    assert "added 0, unchanged 12" in capsys.readouterr().out
    assert _cli(["index", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ntotal" in text and "12" in text and "exact search" in text
    assert _cli(["index", "search", str(out), str(tree / "gull" / "2.jpg"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "1" and lines[1].split()[3] == "gull/2.jpg" and float(lines[1].split()[1]) > 0.999
    assert _cli(["index", "remove", str(out), "--path", "gull/2.jpg"]) == 0
    assert "removed 1 of 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already exists"):
        _cli(["index", "build", "--model", str(tiny_model), "--images", str(tmp_path), "--out", str(out), *common])
    with pytest.raises(FileNotFoundError, match="not a lookalike index"):
        _cli(["index", "info", str(tmp_path / "none")])
