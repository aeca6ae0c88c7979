"""The train loop on a tiny generated dataset: learns, writes its artifacts, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import load_config
from training.trainer import train

from tests.helpers import make_image_folder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), n_classes=8, per_class=10, size=36, kind="pattern")


def _cfg(data: Path, out: Path, **over):
    base = {
        "data.root": str(data), "data.train_classes": None, "data.test_classes": None, "data.test_fraction": 0.25,
        "data.p": 3, "data.k": 4, "data.batches_per_epoch": 4, "model.image_size": 32, "model.embedding_dim": 16,
        "epochs": 3, "amp": "none", "eval_every": 1, "out": str(out), "threads": 1, "loss.aux": "softmax",
    }
    return load_config(overrides=base | over)


def test_train_writes_run_and_learns(tiny_data, tmp_path):
    res = train(_cfg(tiny_data, tmp_path / "run", epochs=4), progress=False)
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "eval.json", "model/card.json", "model/model.safetensors",
              "checkpoint/state.safetensors", "checkpoint/state.json"):
        assert (run / f).is_file(), f
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3, 4]
    assert {"train/loss", "train/mean_pairwise_cosine", "train/active_fraction", "train/embedding_norm",
            "test/recall@1", "test/map@r"} <= set(hist[-1])
    # the loss falls on the training classes (whether that generalises to unseen classes is measured on
    # real data in tests/integration/test_train_cub100.py; tiny synthetic classes are too noisy for it)
    assert hist[-1]["train/loss"] < 0.8 * hist[1]["train/loss"]
    r1 = res["final"]["test/recall@1"]
    assert res["final"]["test/num_queries"] == 20 and r1 * 20 == pytest.approx(round(r1 * 20))  # k of 20 queries
    card = json.loads((run / "model/card.json").read_text())
    assert card["config_digest"] == _cfg(tiny_data, tmp_path / "run", epochs=4).digest()
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(tiny_data, run), progress=False)


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "a"), progress=False)
    train(_cfg(tiny_data, tmp_path / "b"), progress=False, stop_after=1)
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2  # untrained + 1 epoch
    train(_cfg(tiny_data, tmp_path / "b"), progress=False, resume=True)
    a = load_file(str(tmp_path / "a/model/model.safetensors"))
    b = load_file(str(tmp_path / "b/model/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_without_checkpoint_is_clear(tmp_path, tiny_data):
    with pytest.raises(FileNotFoundError, match="no resumable checkpoint"):
        train(_cfg(tiny_data, tmp_path / "none"), resume=True)


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    from lookalike.cli import main

    rc = main(["train", "--out", str(tmp_path / "x"), "--loss.margin", "-2"])
    err = capsys.readouterr().err
    assert rc == 2 and "lookalike: error:" in err and "loss.margin" in err and "Traceback" not in err
    rc = main(["train", "--out", str(tmp_path / "x"), "--data.root", str(tmp_path / "nope")])
    assert rc == 2 and "dataset directory not found" in capsys.readouterr().err
