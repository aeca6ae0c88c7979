"""torchrun training on 2 gloo ranks equals one process on the global batch.

Global mining (:func:`training.distributed.global_batch`): the loss, the miner's tuples (global
indices) and the parameter gradients of a 2-rank DDP step equal one process on the whole
batch. A 2-rank run of the trainer (interrupted and resumed) ends with the weights and the
evaluation of the one-process run. The distributed P×K sampler splits each global batch into
disjoint per-rank blocks of whole classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.data import PKSampler
from training.distributed import RankBatches, shard_range

from tests.distributed_helpers import batchnorm_step, global_batch_step, global_batch_worker, spawn, train_worker
from tests.helpers import make_feedback_index, make_image_folder

CASES = [("contrastive", None), ("contrastive", "batch_hard"), ("contrastive", "semi_hard"),
         ("triplet", "batch_hard"), ("triplet", "semi_hard")]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed 4×4 P×K batch: rank 0 gets classes 5 and 1, rank 1 classes 9 and 3."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 8, generator=g), torch.tensor([5] * 4 + [1] * 4 + [9] * 4 + [3] * 4)


def test_two_ranks_mine_and_differentiate_the_global_batch_like_one_process(tmp_path):
    x, labels = _batch()
    ranks = spawn(global_batch_worker, tmp_path, x, labels, CASES)
    for loss, miner in CASES:
        ref = global_batch_step(x, labels, loss, miner, ddp=False)
        assert ref["tuples"] is None or len(ref["tuples"][0]) > 0, "the case must select something"
        for r, out in enumerate(ranks):
            got = out[f"{loss}/{miner}"]
            where = f"{loss}/{miner} rank {r}"
            torch.testing.assert_close(got["emb"], ref["emb"], rtol=0, atol=1e-6, msg=where)
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=1e-6, msg=where)
            if miner is not None:
                assert set(zip(*(t.tolist() for t in got["tuples"]))) == \
                    set(zip(*(t.tolist() for t in ref["tuples"]))), where
            for k, grad in ref["grads"].items():
                torch.testing.assert_close(got["grads"][k], grad, rtol=0, atol=1e-6, msg=f"{where} grad {k}")
    bn = batchnorm_step(x, ddp=False)
    for r, out in enumerate(ranks):  # synchronised BatchNorm: one BatchNorm over the global batch
        got = out["batchnorm"]
        assert got["type"] == "GlobalBatchNorm"
        for key in ("y", "running_mean", "running_var"):
            torch.testing.assert_close(got[key], bn[key], rtol=0, atol=1e-5, msg=f"rank {r} {key}")
        for k, grad in bn["grads"].items():
            torch.testing.assert_close(got["grads"][k], grad, rtol=1e-5, atol=1e-5, msg=f"rank {r} grad {k}")
    full = np.arange(13 * 3, dtype=np.float32).reshape(13, 3)
    for out in ranks:  # sharded rows of unequal sizes come back whole, in order, on every rank
        np.testing.assert_array_equal(out["gathered"], full)


def test_rank_batches_split_each_global_batch_into_disjoint_whole_classes():
    labels = [c for c in range(10) for _ in range(7)]
    world, p, k = 2, 4, 3
    base = PKSampler(labels, p, k, batches_per_epoch=6, seed=1)
    ranks = [RankBatches(PKSampler(labels, p, k, batches_per_epoch=6, seed=1), rank_=r, world=world)
             for r in range(world)]
    for epoch in (0, 1):
        base.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert per_rank == [list(s) for s in ranks], "deterministic for an epoch"
        for step, whole in enumerate(base):
            parts = [b[step] for b in per_rank]
            assert sum(parts, []) == whole, "the ranks' blocks make up the one-process batch"
            assert not set(parts[0]) & set(parts[1]), "ranks see disjoint images"
            for part in parts:
                classes = [labels[i] for i in part]
                assert len(part) == p // world * k
                assert all(classes.count(c) == k for c in set(classes)), "K images per class"
            assert not {labels[i] for i in parts[0]} & {labels[i] for i in parts[1]}, "a class on one rank only"
        assert len(ranks[0]) == len(base) == 6
    ranks[0].set_epoch(0)
    first = list(ranks[0])
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != first, "another epoch, another plan"
    with pytest.raises(ValueError, match="data.p=3 .* multiple of 2"):
        RankBatches(PKSampler(labels, 3, k), rank_=0, world=2)


def test_shard_range_covers_every_row_once():
    for n in (0, 1, 7, 13):
        rows = [i for r in range(3) for i in shard_range(n, rank_=r, world=3)]
        assert rows == list(range(n))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), n_classes=8, per_class=10, size=36, kind="pattern")


def _overrides(data: Path, out: Path) -> dict:
    # cached trunk features with one view: no random augmentation, so the runs are comparable;
    # BatchNorm trains in the top stage and the neck (synchronised over the ranks)
    return {"data.root": str(data), "data.train_classes": None, "data.test_classes": None,
            "data.test_fraction": 0.25, "data.val_fraction": 0.0, "data.p": 4, "data.k": 4,
            "data.batches_per_epoch": 3, "data.cached_views": 1, "model.backbone": "resnet18", "model.weights": None,
            "model.trainable_stages": 1, "model.freeze_bn": False, "model.neck_bn": True, "model.head": "linear",
            "model.image_size": 32, "model.embedding_dim": 16, "loss.miner": "semi_hard", "loss.aux": "softmax",
            "epochs": 2, "amp": "none", "budget": None, "eval_every": 1, "threads": 1, "out": str(out)}


def test_two_rank_run_interrupted_and_resumed_equals_one_process(tiny_data, tmp_path):
    from training.config import load_config
    from training.trainer import train

    one = train(load_config(overrides=_overrides(tiny_data, tmp_path / "one")), progress=False)
    two = spawn(train_worker, tmp_path / "spawn", _overrides(tiny_data, tmp_path / "two"),
                [{"stop_after": 1}, {"resume": True}])
    a = load_file(str(tmp_path / "one/model/model.safetensors"))
    b = load_file(str(tmp_path / "two/model/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert two[0]["fingerprint"] == two[1]["fingerprint"] and two[0]["processes"] == 2
    # sharded evaluation gathers to the one-process metrics; rank 0 alone wrote one line per epoch
    hist_one = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    hist_two = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist_two] == [0, 1, 2]
    for h1, h2 in zip(hist_one, hist_two):
        for key in ("test/recall@1", "test/map@r", "test/r_precision"):
            assert h2[key] == pytest.approx(h1[key], abs=1e-9), (h1["epoch"], key)
        if h1["epoch"]:
            assert h2["train/metric_loss"] == pytest.approx(h1["train/metric_loss"], abs=1e-5)
    assert one["final"] == pytest.approx(two[0]["final"], abs=1e-9)


def test_lr_find_and_eval_refuse_torchrun(monkeypatch, capsys):
    from lookalike.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["lr-find", "--steps", "2"]) == 2
    assert "lr-find runs in one process" in capsys.readouterr().err
    assert main(["eval", "--model", "nowhere"]) == 2
    assert "eval runs in one process" in capsys.readouterr().err


def test_two_rank_run_with_every_batch_option_of_the_default_recipe(tiny_data, tmp_path):
    # confusable-class batches, cross-batch memory, a time budget and best-epoch selection on 2 ranks:
    # every rank ends with the same plan and model
    over = _overrides(tiny_data, tmp_path / "run") | {
        "data.sampler": "confusable", "data.confusable_group": 2, "loss.memory_size": 64, "loss.miner": "none",
        "budget": "2m", "data.val_fraction": 0.25, "select_best": True, "model.freeze_bn": True, "epochs": 2}
    res = spawn(train_worker, tmp_path / "spawn", over, [{}])
    assert res[0]["plan"] == res[1]["plan"] and res[0]["steps_run"] == res[1]["steps_run"] > 0
    assert res[0]["fingerprint"] == res[1]["fingerprint"] and res[0]["epoch_chosen"] == res[1]["epoch_chosen"]
    hist = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1, 2] and "train/confused_pairs" in hist[1]


@pytest.mark.slow
def test_torchrun_cli_smoke_writes_one_run_and_resumes(tiny_data, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    over = _overrides(tiny_data, out)
    flags = [f"--{k}={'null' if v is None else v}" for k, v in over.items() if k != "out"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lookalike",
           "train", "--no-progress", "--out", str(out), *flags]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count('"fingerprint"') == 1, "rank 0 alone prints the result"
    assert "distributed: 2 processes (gloo)" in first.stderr
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["state.json", "state.safetensors"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2], "one line per epoch, by rank 0"
    weights = load_file(str(out / "model/model.safetensors"))
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stderr and (out / "metrics.jsonl").read_text().splitlines() == lines
    resumed = load_file(str(out / "model/model.safetensors"))
    for k in weights:
        torch.testing.assert_close(resumed[k], weights[k], rtol=0, atol=0, msg=k)


def test_two_rank_run_with_relevance_feedback_equals_one_process(tmp_path):
    # the feedback pair loss is the same on every rank: DDP's average keeps its gradient as in one process
    from index.feedback import read_feedback
    from training.config import load_config
    from training.feedback import set_feedback_reader
    from training.trainer import train

    data = make_image_folder(tmp_path / "data", n_classes=8, per_class=6, size=40, kind="pattern")
    make_feedback_index(tmp_path, data)

    def over(out: Path) -> dict:
        return _overrides(data, out) | {"data.feedback": str(tmp_path / "idx"), "loss.miner": "none", "epochs": 1}

    set_feedback_reader(read_feedback)  # what the lookalike command wires in; the forked ranks inherit it
    try:
        train(load_config(overrides=over(tmp_path / "one")), progress=False)
        spawn(train_worker, tmp_path / "spawn", over(tmp_path / "two"), [{}])
    finally:
        set_feedback_reader(None)
    hist = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert any(h["train/extra_loss"] > 0 for h in hist[1:])
    one = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert hist[1]["train/extra_loss"] == pytest.approx(one[1]["train/extra_loss"], rel=1e-5)
    assert hist[1]["test/map@r"] == pytest.approx(one[1]["test/map@r"], abs=1e-9)
    a = load_file(str(tmp_path / "one/model/model.safetensors"))
    b = load_file(str(tmp_path / "two/model/model.safetensors"))
    for k in a:  # Adam turns float-level differences of near-zero gradients into steps of up to lr
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
