"""`lookalike eval`, `lr-find` and `export` through the CLI on a tiny generated dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lookalike.cli import main

from tests.helpers import make_image_folder

TINY = ["--data.train_classes", "null", "--data.test_classes", "null", "--data.test_fraction", "0.34",
        "--data.p", "3", "--data.k", "3", "--model.image_size", "32", "--model.embedding_dim", "16",
        "--amp", "none", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data = make_image_folder(base / "data", n_classes=9, per_class=6, size=36, kind="pattern")
    rc = main(["train", "--data.root", str(data), *TINY, "--epochs", "2", "--data.batches_per_epoch", "2",
               "--eval_every", "1", "--out", str(base / "run"), "--no-progress"])
    assert rc == 0
    return base, data


def test_eval_writes_report(tiny_run, capsys):
    base, _ = tiny_run
    capsys.readouterr()
    assert main(["eval", "--model", str(base / "run"), "--fp32"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["metrics"]
    assert {"recall@1", "recall@8", "precision@1", "r_precision", "map@r"} <= set(m)
    assert m["num_queries"] == 18  # 3 held-out classes x 6 images
    # the run's own final evaluation (fp32 here vs the run's setting amp=none) gives the same numbers
    final = json.loads((base / "run/eval.json").read_text())["final"]
    assert m["recall@1"] == pytest.approx(final["test/recall@1"], abs=1e-9)
    for f in ("report.png", "report.html", "metrics.json"):
        assert (base / "run/report" / f).stat().st_size > 0
    assert (base / "run/report/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (base / "run/report/report.html").read_text()
    assert "Most confused classes" in page
    if m["recall@1"] < 1:  # some query's nearest neighbour is of another class: the pair is listed and shown
        confused = json.loads((base / "run/report/confused.json").read_text())
        classes = set((base / "run/splits/test_classes.txt").read_text().split())
        assert confused and all({c["class_a"], c["class_b"]} <= classes and c["votes"] >= 1 for c in confused)
        assert sum(c["votes"] for c in confused) == round((1 - m["recall@1"]) * m["num_queries"])
        assert (base / "run/report/confused.png").stat().st_size > 0


def test_eval_on_a_new_folder(tiny_run, capsys, tmp_path):
    base, _ = tiny_run
    other = make_image_folder(tmp_path / "other", n_classes=3, per_class=4, size=36, seed=5)
    capsys.readouterr()
    assert main(["eval", "--model", str(base / "run/model"), "--data", str(other), "--out", str(tmp_path / "rep")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["num_queries"] == 12
    assert (tmp_path / "rep/report.png").is_file()


def test_lr_find_plots_and_suggests(tiny_run, capsys, tmp_path):
    _, data = tiny_run
    capsys.readouterr()
    png = tmp_path / "lr.png"
    assert main(["lr-find", "--data.root", str(data), *TINY, "--steps", "25", "--min-lr", "1e-5", "--max-lr", "1",
                 "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert png.stat().st_size > 0
    # the rule: steepest descent, capped at a tenth of the LR of the lowest loss (when above min-lr)
    tenth = out["min_loss_lr"] / 10
    assert out["suggested_lr"] == (min(out["steepest_lr"], tenth) if tenth > 1e-5 else out["steepest_lr"])


def test_lr_find_steps_like_training_with_its_miner_and_clipping(tiny_run, monkeypatch):
    """Every swept step runs the configured miner and clips the gradients, as a training step
    does; the LRs swept are geometric from --min-lr."""
    import torch

    from training.config import TrainConfig
    from training.lr_find import lr_range_test
    from training.miners import BatchHardMiner

    _, data = tiny_run
    calls = {"mine": 0, "clip": 0}
    real_mine, real_clip = BatchHardMiner.mine, torch.nn.utils.clip_grad_norm_

    def mine(self, *a):
        calls["mine"] += 1
        return real_mine(self, *a)

    def clip(*a, **kw):
        calls["clip"] += 1
        return real_clip(*a, **kw)

    monkeypatch.setattr(BatchHardMiner, "mine", mine)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    cfg = TrainConfig.model_validate({
        "data": {"root": str(data), "train_classes": None, "test_classes": None, "test_fraction": 0.34,
                 "p": 3, "k": 3, "workers": 0},
        "model": {"image_size": 32, "embedding_dim": 16}, "amp": "none",
        "loss": {"miner": "batch_hard"}, "optim": {"grad_clip": 1.0}})
    res = lr_range_test(cfg, lr_min=1e-4, lr_max=1e-2, steps=12)
    n = len(res["lrs"])
    assert n == 12 and calls == {"mine": n, "clip": n}
    ratios = [b / a for a, b in zip(res["lrs"], res["lrs"][1:])]
    assert res["lrs"][0] == pytest.approx(1e-4) and ratios == pytest.approx([100 ** (1 / 11)] * 11)
    assert res["lrs"][-1] == pytest.approx(1e-2)


def test_export_onnx_verified(tiny_run, capsys):
    base, _ = tiny_run
    capsys.readouterr()
    assert main(["export", str(base / "run"), "--onnx"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_abs_diff_vs_torch"] <= 1e-4 and Path(out["onnx"]).is_file()


def test_eval_refuses_pickle(tmp_path, capsys):
    import torch

    torch.save({"w": torch.ones(1)}, tmp_path / "model.pt")
    assert main(["eval", "--model", str(tmp_path / "model.pt")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_zero_shot_model_indexes_and_searches_without_training(tmp_path, capsys):
    """A user without labels: export the pretrained backbone, index a folder, query it."""
    data = make_image_folder(tmp_path / "photos", n_classes=4, per_class=4, size=48, kind="colour")
    assert main(["export", "--pretrained", "efficientnet_lite0", "--image-size", "64", "--out",
                 str(tmp_path / "zs"), "--onnx"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["embedding_dim"] == 1280 and out["max_abs_diff_vs_torch"] <= 1e-4
    card = json.loads((tmp_path / "zs/card.json").read_text())
    assert card["head"] == "none" and card["mean"][0] == pytest.approx(127 / 255)
    assert main(["index", "build", "--model", str(tmp_path / "zs"), "--images", str(data), "--out",
                 str(tmp_path / "idx"), "--labels-from-folders", "--no-progress", "--workers", "0"]) == 0
    capsys.readouterr()
    query = next((data / "class_02").iterdir())
    assert main(["index", "search", str(tmp_path / "idx"), str(query), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    hits = hits["results"] if isinstance(hits, dict) else hits
    assert hits[0]["path"] == str(query.relative_to(data)) and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert hits[0]["label"] == "class_02" and len(hits) == 3


def test_export_pretrained_needs_out(capsys):
    assert main(["export", "--pretrained", "efficientnet_lite0"]) == 2
    assert "--out" in capsys.readouterr().err
