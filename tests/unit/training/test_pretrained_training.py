"""Fine-tuning from a pretrained start on a tiny generated dataset: cached trunk features,
zero-shot as epoch 0, best-on-validation selection, the time-budget planner, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.budget import plan_steps
from training.config import load_config, parse_duration
from training.trainer import train

from tests.helpers import make_image_folder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), n_classes=10, per_class=8, size=40, kind="pattern")


def _cfg(data: Path, out: Path, **over):
    base = {
        "data.root": str(data), "data.train_classes": None, "data.test_classes": None, "data.test_fraction": 0.3,
        "data.val_fraction": 0.3, "data.p": 3, "data.k": 4, "data.batches_per_epoch": 3, "data.cached_views": 2,
        "model.backbone": "efficientnet_lite0", "model.weights": "DEFAULT", "model.head": "none",
        "model.neck_bn": False, "model.image_size": 32, "model.trainable_stages": 1, "model.freeze_bn": True,
        "loss.aux": "softmax", "loss.aux_init": "centroids", "optim.lr": 1e-4, "optim.head_lr_mult": 10,
        "epochs": 3, "amp": "none", "eval_every": 1, "out": str(out), "threads": 1,
    }
    return load_config(overrides=base | over)


def _zero_shot_state(cfg) -> dict[str, torch.Tensor]:
    from models.net import EmbeddingNet
    from training.trainer import card_from_config

    return EmbeddingNet(card_from_config(cfg), backbone_weights="DEFAULT").state_dict()


def test_partial_finetune_trains_only_the_top_and_reports_zero_shot_first(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "run", select_best=False)
    res = train(cfg, progress=False)
    hist = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert res["untrained"] == {k: v for k, v in hist[0].items() if k != "epoch"}
    assert {"val/recall@1", "test/recall@1"} <= set(hist[0])
    saved = load_file(str(tmp_path / "run/model/model.safetensors"))
    start = _zero_shot_state(cfg)
    trunk_keys = [k for k in start if k.startswith(("backbone.conv_stem", "backbone.blocks.0.", "backbone.blocks.5."))]
    top_keys = [k for k in start if k.startswith(("backbone.blocks.6.", "backbone.conv_head")) and "weight" in k]
    assert trunk_keys and top_keys
    for k in trunk_keys:  # frozen: weights and BN statistics unchanged
        torch.testing.assert_close(saved[k], start[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(saved[k], start[k]) for k in top_keys)
    assert res["epoch_chosen"] == 3 and res["selected_on"] == "last epoch"


def test_a_run_that_only_hurts_returns_the_zero_shot_model(tmp_path):
    """Colour classes are retrieved perfectly zero-shot; a loss that pulls other classes
    together and pushes a class apart can only tie or lose on validation classes, so epoch 0
    is kept and saved."""
    data = make_image_folder(tmp_path / "data", n_classes=10, per_class=8, size=40, kind="colour")
    cfg = _cfg(data, tmp_path / "run", **{"loss.aux": "none", "optim.lr": 3e-2, "optim.warmup_epochs": 0})

    def inverted(emb, labels, tuples=None):
        same = (labels[:, None] == labels[None, :]).float()
        cos = emb @ emb.T
        return (cos * same).sum() / same.sum() - (cos * (1 - same)).sum() / (1 - same).sum()

    res = train(cfg, progress=False, loss_fn=inverted)
    hist = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert hist[0]["val/recall@1"] == 1.0
    assert min(h["val/map@r"] for h in hist[1:]) < hist[0]["val/map@r"]  # it did get worse
    assert res["epoch_chosen"] == 0 and res["selected_on"] == "val/recall@1"
    assert res["final"]["test/recall@1"] == res["untrained"]["test/recall@1"]
    saved = load_file(str(tmp_path / "run/model/model.safetensors"))
    for k, v in _zero_shot_state(cfg).items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)


def test_best_epoch_is_the_one_with_best_validation_score(tiny_data, tmp_path):
    res = train(_cfg(tiny_data, tmp_path / "run", epochs=4), progress=False)
    hist = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    best = max(hist, key=lambda h: (h["val/recall@1"], h["val/map@r"]))  # max keeps the first of equals
    assert res["epoch_chosen"] == best["epoch"]
    assert res["final"]["val/recall@1"] == best["val/recall@1"]


def test_budget_plans_the_schedule_to_its_end(tiny_data, tmp_path):
    res = train(_cfg(tiny_data, tmp_path / "run", budget="60s", epochs=50, **{"data.batches_per_epoch": 4}),
                progress=False)
    plan = res["plan"]
    assert plan is not None and plan["budget_s"] == 60 and plan["total_steps"] >= 8
    hist = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = sum(h.get("train/steps", 0) for h in hist)
    # ran exactly the scheduled steps (the plan, or fewer if a slow epoch made the trainer shorten it)
    assert steps == res["steps_run"] == res["steps_scheduled"] <= plan["total_steps"]
    assert hist[-1]["train/lr"] < 0.05 * 1e-4  # and the cosine schedule reached its end


def test_resume_of_a_cached_run_equals_uninterrupted(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "a"), progress=False)
    train(_cfg(tiny_data, tmp_path / "b"), progress=False, stop_after=1)
    res = train(_cfg(tiny_data, tmp_path / "b"), progress=False, resume=True)
    a = load_file(str(tmp_path / "a/model/model.safetensors"))
    b = load_file(str(tmp_path / "b/model/model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert res["epoch_chosen"] == json.loads((tmp_path / "a/eval.json").read_text())["epoch_chosen"]


def test_cached_views_are_limited_by_the_ram_budget(tiny_data, tmp_path):
    # 32 px, trainable_stages 1: the trunk output is 192x1x1 bfloat16 = 384 bytes per image and view;
    # 80 images: eval views 40 * 384, each train view 40 * 384 bytes
    from models.net import EmbeddingNet
    from training.trainer import card_from_config, splits_from_config, views_that_fit

    cfg = _cfg(tiny_data, tmp_path / "run")
    card = card_from_config(cfg)
    model = EmbeddingNet(card)
    model.split(1)
    splits = splits_from_config(cfg)
    per_view = len(splits["train"]) * 384
    n_eval = len(splits["val"]) + len(splits["test"])

    def fit(budget_bytes: int) -> int:
        return views_that_fit(model, card, splits, torch.device("cpu"), max_views=8, budget_mb=budget_bytes / 2**20)

    assert fit(n_eval * 384 + 3 * per_view) == 3
    assert fit(n_eval * 384 + 100 * per_view) == 8
    with pytest.raises(ValueError, match="cache_budget_mb"):
        fit(n_eval * 384 + per_view - 1)


def test_a_slow_epoch_shortens_the_schedule_to_hold_the_budget():
    import time

    from training.trainer import LRSchedule, _replan_if_late

    sched = LRSchedule("cosine", total_steps=100, warmup_steps=0, steps_per_epoch=10, step_size=1, gamma=1)
    t_start = time.perf_counter() - 50  # 50 s spent; 10 steps took 10 s: 1 s/step
    _replan_if_late(sched, 40, budget=100, t_start=t_start, epoch_seconds=10, steps=10, reserve_s=5)
    assert sched.total_steps in (40 + 44, 40 + 45)  # about 45 s left after the reserve, at 1 s/step
    before = sched.total_steps
    _replan_if_late(sched, 40, budget=1000, t_start=t_start, epoch_seconds=10, steps=10, reserve_s=5)
    assert sched.total_steps == before  # never lengthened
    _replan_if_late(sched, 80, budget=10, t_start=t_start, epoch_seconds=10, steps=10, reserve_s=5)
    assert sched.total_steps == 80  # out of time: stop after the steps already done


def test_plan_steps_arithmetic():
    p = plan_steps(budget_s=100, spent_s=20, step_s=0.5, eval_s=5, reserve_s=10, steps_per_epoch=10, max_epochs=99)
    # 70 s left, each step costs 0.5 + 5/10 = 1 s
    assert (p.total_steps, p.epochs, p.capped) == (70, 7, "")
    p = plan_steps(budget_s=100, spent_s=20, step_s=0.5, eval_s=5, reserve_s=10, steps_per_epoch=10, max_epochs=3)
    assert (p.total_steps, p.capped) == (30, "max epochs")
    p = plan_steps(budget_s=10, spent_s=20, step_s=0.5, eval_s=5, reserve_s=10, steps_per_epoch=10, max_epochs=3,
                   done_steps=8, min_steps=5)
    assert p.total_steps == 8 and p.capped.startswith("minimum")
    p = plan_steps(budget_s=100, spent_s=20, step_s=0.5, eval_s=0, reserve_s=0, steps_per_epoch=10, max_epochs=99,
                   done_steps=8)
    assert p.total_steps == 8 + 160
    with pytest.raises(ValueError):
        plan_steps(budget_s=1, spent_s=0, step_s=0, eval_s=0, reserve_s=0, steps_per_epoch=1, max_epochs=1)


@pytest.mark.parametrize("text,seconds", [("8m", 480), ("90s", 90), ("1h30m", 5400), ("2.5m", 150), ("45", 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "8 minutes", "-3", "0s", "1d"])
def test_bad_budget_is_refused_naming_the_form(text):
    with pytest.raises(ValueError, match="budget"):
        load_config(overrides={"budget": text})


def test_memory_and_confusable_batches_run_in_the_loop(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "run", **{"data.sampler": "confusable", "data.confusable_group": 2,
                                                 "loss.memory_size": 30, "loss.memory_warmup_steps": 2})
    res = train(cfg, progress=False)
    hist = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    pairs = hist[1]["train/confused_pairs"]
    names = set((tmp_path / "run/splits/train_classes.txt").read_text().split())
    assert pairs and all(a in names and b in names and a < b and v >= 1 for a, b, v in pairs)
    assert all(h["train/loss"] == h["train/loss"] for h in hist[1:])  # finite, no NaN
    assert res["epoch_chosen"] in range(len(hist))


def test_memory_needs_the_contrastive_loss():
    with pytest.raises(ValueError, match="memory_size needs loss.name contrastive"):
        load_config(overrides={"loss.memory_size": 64, "loss.name": "triplet"})
