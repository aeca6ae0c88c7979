"""Sharded indexing: stable shard assignment, the merge equals one process, mismatches refused."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from index import IndexStore, ann
from index.shards import (check_shards, merge, parse_shard, shard_dir, shard_from_env, shard_of, train_quantizer,
                          walk_key)
from lookalike.cli import main
from tests.unit.index.helpers import clustered, make_card, unit, write_images


# ---------------------------------------------------------------------- assignment
def test_shard_assignment_is_stable_and_partitions():
    paths = [f"class_{c}/img_{i}.jpg" for c in range(20) for i in range(50)]
    n = 4
    first = [shard_of(p, n) for p in paths]
    assert first == [shard_of(p, n) for p in reversed(paths)][::-1]  # order-independent
    # pinned: a re-run, a resumed job or another release keeps each image in its shard
    assert [shard_of("a.jpg", 3), shard_of("birds/crow/0001.jpg", 3), shard_of("birds/crow/0001.jpg", 16)] == \
        [int.from_bytes(__import__("hashlib").sha256(p.encode()).digest()[:8], "big") % m
         for p, m in (("a.jpg", 3), ("birds/crow/0001.jpg", 3), ("birds/crow/0001.jpg", 16))]
    counts = np.bincount(first, minlength=n)
    assert counts.sum() == len(paths) and counts.min() > 200  # every path in one shard, roughly balanced
    assert shard_of("x/y.jpg", 1) == 0


def test_parse_shard_and_torchrun_env():
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="i/N"):
            parse_shard(bad)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert shard_from_env({"WORLD_SIZE": "4"}) is None
    assert shard_dir("out", (3, 4)).as_posix() == "out/shard-003-of-004"


def test_walk_key_is_the_walk_order(tmp_path):
    from index.ingest import walk_images

    for rel in ("b.jpg", "a/z.jpg", "a/b/c.jpg", "a/a.jpg", "ab/x.jpg", "a.jpg", "a/b.jpg/d.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    walked = [p.relative_to(tmp_path).as_posix() for p in walk_images(tmp_path)[0]]
    assert walked == sorted(walked, key=walk_key)
    assert walked[:2] == ["a.jpg", "b.jpg"]


# ---------------------------------------------------------------------- Flat: the CLI, real images
@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    write_images(root, {"crow": 9, "finch": 8, "gull": 7, "owl": 6})
    (root / "gull" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    shutil.copy(root / "crow" / "1.jpg", root / "owl" / "same-as-crow-1.jpg")  # a duplicate, later in walk order
    shutil.copy(root / "finch" / "2.jpg", root / "crow" / "zz-same-as-finch-2.jpg")  # a duplicate, earlier
    return root


def _records(store: IndexStore) -> dict[int, tuple]:
    with store.db.snapshot() as con:
        rows = con.execute("SELECT id, path, label, sha256, size FROM images ORDER BY id").fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def test_three_shards_merged_equal_one_process_flat(tmp_path, tiny_model, tree, rng):
    common = ["--model", str(tiny_model), "--images", str(tree), "--labels-from-folders", "--workers", "0",
              "--no-progress"]
    assert main(["index", "build", *common, "--out", str(tmp_path / "one")]) == 0
    for i in range(3):
        assert main(["index", "build", *common, "--out", str(tmp_path / "shards"), "--shard", f"{i}/3"]) == 0
    shards = sorted((tmp_path / "shards").iterdir())
    assert [d.name for d in shards] == ["shard-000-of-003", "shard-001-of-003", "shard-002-of-003"]
    assert main(["index", "merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0

    with IndexStore.open(tmp_path / "one") as one, IndexStore.open(tmp_path / "merged") as merged:
        assert len(one) == 30 and merged.info()["factory"] == "Flat"
        assert _records(merged) == _records(one)  # same ids, paths, labels, sha256
        # the same vectors, up to float rounding (an image is embedded in another batch)
        np.testing.assert_allclose(merged.vector(7), one.vector(7), atol=1e-5)
        q = unit(rng, 100, one.dim)
        hits_one, hits_merged = one.search(q, 10), merged.search(q, 10)
        assert [[h.id for h in hits] for hits in hits_merged] == [[h.id for h in hits] for hits in hits_one]
        np.testing.assert_allclose([[h.score for h in hits] for hits in hits_merged],
                                   [[h.score for h in hits] for hits in hits_one], atol=1e-5)
    # re-running a shard's build resumes it: nothing is added twice
    with IndexStore.open(shards[1]) as s1:
        before = len(s1)
    assert main(["index", "build", *common, "--out", str(tmp_path / "shards"), "--shard", "1/3"]) == 0
    with IndexStore.open(shards[1]) as s1:
        assert len(s1) == before


def test_torchrun_env_picks_the_shard(tmp_path, tiny_model, tree, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["index", "build", "--model", str(tiny_model), "--images", str(tree), "--out", str(tmp_path / "s"),
                 "--workers", "0", "--no-progress"]) == 0
    with IndexStore.open(tmp_path / "s" / "shard-001-of-002") as s:
        paths = [r[0] for r in _records(s).values()]
    assert paths and all(shard_of(p, 2) == 1 for p in paths)


# ---------------------------------------------------------------------- IVF: one trained index, merge_from
def _recs(paths: list[str]) -> list[dict]:
    import hashlib

    return [{"path": p, "label": p.split("/")[0], "sha256": hashlib.sha256(p.encode()).hexdigest(), "size": 1,
             "mtime": 1.0, "source": "folder"} for p in paths]


def _vector_shards(tmp_path, vecs, paths, n, trained, *, card=None, factory="auto"):
    card = card or make_card(dim=vecs.shape[1])
    dirs = []
    for i in range(n):
        rows = [j for j, p in enumerate(paths) if shard_of(p, n) == i]
        d = shard_dir(tmp_path / "shards", (i, n))
        with IndexStore.create(d, card=card, images_root=tmp_path, factory=factory, trained_from=trained,
                               extra={"shard": {"index": i, "count": n, "labels_from_folders": True}}) as s:
            for start in range(0, len(rows), 1000):  # batches, as the job commits them
                chunk = rows[start:start + 1000]
                s.add(vecs[chunk], _recs([paths[j] for j in chunk]))
            s.checkpoint()
        dirs.append(d)
    return dirs


def test_three_ivf_shards_merge_list_by_list_like_one_process(tmp_path, rng):
    n, d = 6_000, 16
    vecs = clustered(rng, n, d)
    paths = [f"c{j % 40:02d}/{j:05d}.jpg" for j in range(n)]
    order = sorted(range(n), key=lambda j: walk_key(paths[j]))
    vecs, paths = vecs[order], [paths[j] for j in order]  # as one job walking the folder adds them
    trained = tmp_path / "trained.faiss"
    meta = train_quantizer(vecs, "IVF32,PQ8", trained, fingerprint=make_card().fingerprint, n_planned=n)
    assert json.loads((tmp_path / "trained.faiss.json").read_text())["sha256"] == meta["sha256"]

    with IndexStore.create(tmp_path / "one", card=make_card(dim=d), images_root=tmp_path, trained_from=trained) as one:
        for start in range(0, n, 1000):
            one.add(vecs[start:start + 1000], _recs(paths[start:start + 1000]))
        one.checkpoint()
    dirs = _vector_shards(tmp_path, vecs, paths, 3, trained)
    report = merge(dirs, tmp_path / "merged")
    assert report.images == n and report.factory == "IVF32,PQ8"

    with IndexStore.open(tmp_path / "one") as one, IndexStore.open(tmp_path / "merged") as merged:
        assert _records(merged) == _records(one)
        q = vecs[rng.choice(n, 200, replace=False)] + 0.05 * unit(rng, 200, d)
        truth = ann.exact_topk(q, vecs, 10) + 1  # ids are rows + 1 in walk order
        nprobe = {"nprobe": 8}
        recalls = []
        for s in (one, merged):
            ann.set_params(s._index, nprobe)
            found = np.array([[h.id for h in hits] for hits in s.search(q, 10)])
            recalls.append(ann.recall_at(found, truth))
        assert recalls[0] > 0.6 and abs(recalls[0] - recalls[1]) <= 0.005
        # the merged lists are the single process's lists: same ids in every list
        a, b = faiss.extract_index_ivf(one._index).invlists, faiss.extract_index_ivf(merged._index).invlists
        for lst in range(0, 32, 5):
            ia = faiss.rev_swig_ptr(a.get_ids(lst), a.list_size(lst))
            ib = faiss.rev_swig_ptr(b.get_ids(lst), b.list_size(lst))
            assert sorted(ia.tolist()) == sorted(ib.tolist())


# ---------------------------------------------------------------------- refusals
@pytest.fixture
def small_shards(tmp_path, rng):
    vecs = unit(rng, 300, 16)
    paths = [f"c{j % 5}/{j:04d}.jpg" for j in range(300)]
    return tmp_path, vecs, paths, _vector_shards(tmp_path, vecs, paths, 3, None)


def test_merge_refuses_another_models_shard(small_shards):
    tmp_path, vecs, paths, dirs = small_shards
    rows = [j for j, p in enumerate(paths) if shard_of(p, 3) == 2]
    shutil.rmtree(dirs[2])
    with IndexStore.create(dirs[2], card=make_card("b"), images_root=tmp_path,
                           extra={"shard": {"index": 2, "count": 3, "labels_from_folders": True}}) as s:
        s.add(vecs[rows], _recs([paths[j] for j in rows]))
        s.checkpoint()
    with pytest.raises(ValueError, match=f"{dirs[2]}: model fingerprint 'bbbb.*differs from {dirs[0]}"):
        merge(dirs, tmp_path / "merged")
    assert not (tmp_path / "merged" / "store.json").exists()


def test_merge_refuses_missing_repeated_or_foreign_shards(small_shards):
    tmp_path, vecs, paths, dirs = small_shards
    with pytest.raises(ValueError, match="shards 1/3 are missing"):
        check_shards([dirs[0], dirs[2]])
    with pytest.raises(ValueError, match="given twice"):
        check_shards([dirs[0], dirs[0], dirs[2]])
    with pytest.raises(ValueError, match="not a shard"):
        with IndexStore.create(tmp_path / "plain", card=make_card(), images_root=tmp_path):
            pass
        check_shards([tmp_path / "plain", dirs[1]])
    # a record that belongs to another shard (e.g. a shard built with another N, then renamed)
    wrong = next(p for p in (f"x/{j}.jpg" for j in range(100)) if shard_of(p, 3) != 0)
    with IndexStore.open(dirs[0], writable=True) as s:
        s.add(unit(np.random.default_rng(0), 1, 16), _recs([wrong]))
        s.checkpoint()
    with pytest.raises(ValueError, match=f"{dirs[0]}: {wrong} belongs to shard {shard_of(wrong, 3)}/3, not 0/3"):
        merge(dirs, tmp_path / "merged")


def test_merge_refuses_an_unfinished_shard_and_a_changed_label_mode(small_shards):
    tmp_path, vecs, paths, dirs = small_shards
    with IndexStore.open(dirs[1], writable=True) as s:
        s.remove([1])  # not checkpointed: the shard's job did not finish
    with pytest.raises(ValueError, match=f"{dirs[1]}: shard 1/3 is unfinished"):
        merge(dirs, tmp_path / "merged")
    cfg = json.loads((dirs[2] / "store.json").read_text())
    cfg["shard"]["labels_from_folders"] = False
    (dirs[2] / "store.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--labels-from-folders is False, but"):
        check_shards(dirs)


def test_trained_index_must_match_the_model(tmp_path, rng):
    vecs = unit(rng, 2000, 16)
    train_quantizer(vecs, "IVF16,Flat", tmp_path / "t.faiss", fingerprint=make_card("a").fingerprint, n_planned=1)
    from index import ModelMismatchError

    with pytest.raises(ModelMismatchError, match="trained for model fingerprint"):
        IndexStore.create(tmp_path / "ix", card=make_card("b"), images_root=None, trained_from=tmp_path / "t.faiss")
    with pytest.raises(ValueError, match="only IVF indexes"):
        train_quantizer(vecs, "Flat", tmp_path / "f.faiss", fingerprint="a" * 64, n_planned=1)


def test_cli_train_quantizer_then_ivf_shards_merge_like_one_build(tmp_path, tiny_model, tree, rng):
    common = ["--model", str(tiny_model), "--images", str(tree), "--workers", "0", "--no-progress"]
    trained = tmp_path / "trained.faiss"
    # too few images for an IVF: auto is exact, and the command says so (exit 2, no traceback)
    _expect_error(["index", "train-quantizer", *common, "--out", str(trained)], "need no trained index")
    assert main(["index", "train-quantizer", *common, "--out", str(trained), "--factory", "IVF4,Flat"]) == 0
    assert json.loads((tmp_path / "trained.faiss.json").read_text())["sample"] == 32  # every decodable file (duplicates too)
    assert main(["index", "build", *common, "--out", str(tmp_path / "one"), "--trained-from", str(trained)]) == 0
    for i in range(2):
        assert main(["index", "build", *common, "--out", str(tmp_path / "s"), "--shard", f"{i}/2",
                     "--trained-from", str(trained), "--on-disk"]) == 0
    shards = sorted((tmp_path / "s").iterdir())
    assert main(["index", "merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0
    with IndexStore.open(tmp_path / "one", mmap=False) as one, IndexStore.open(tmp_path / "merged") as merged:
        assert merged.info()["factory"] == one.info()["factory"] == "IVF4,Flat"
        assert merged.on_disk and merged._mmapped  # --on-disk travels from the shards to the merge
        assert _records(merged) == _records(one)
        q = unit(rng, 20, one.dim)
        ann.set_params(one._index, {"nprobe": 4})
        ann.set_params(merged._index, {"nprobe": 4})
        assert [[h.id for h in x] for x in merged.search(q, 5)] == [[h.id for h in x] for x in one.search(q, 5)]


def _expect_error(argv: list[str], text: str) -> int:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc == 2 and text in err.getvalue(), err.getvalue()
    return rc
