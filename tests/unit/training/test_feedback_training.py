"""Relevance feedback in training: the pair loss fixes marked pairs, still_wrong counts them, and
`lookalike train --feedback INDEX` / `lookalike eval --feedback INDEX` run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.feedback import FeedbackLoss, FeedbackPairs, still_wrong

from tests.helpers import make_feedback_index, make_image_folder


def _pairs() -> FeedbackPairs:
    # 6 images: 0,1,2 of label a; 3,4,5 of label b. Marks on query 0: 3 wrong, 1 right; on query 4: 2 wrong.
    return FeedbackPairs(images=[Path(f"{i}.jpg") for i in range(6)], labels=list("aaabbb"),
                         query=np.array([0, 0, 4]), result=np.array([3, 1, 2]), right=np.array([False, True, False]))


def test_still_wrong_counts_wrong_results_above_a_right_one():
    pairs = _pairs()
    emb = np.eye(6, dtype=np.float32)
    emb[3] = emb[0] * 0.9 + emb[3] * 0.1  # wrong result 3 close to query 0
    emb[1] = emb[0] * 0.5 + emb[1] * 0.5  # right result 1 less close
    emb[2] = emb[4] * 0.8 + emb[2] * 0.2  # wrong result 2 close to query 4
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # query 4 has no right mark: its nearest same-label image in the gallery (5) is the floor
    gallery, glabels = emb, np.array(list("aaabbb"))
    got = still_wrong(pairs, emb, gallery=gallery, gallery_labels=glabels)
    assert got == {"wrong_pairs": 2, "still_wrong": 2, "share": 1.0, "unscored": 0}
    assert still_wrong(pairs, emb)["unscored"] == 1  # without a gallery, query 4 cannot be scored
    emb2 = np.eye(6, dtype=np.float32)
    emb2[1] = emb2[0] * 0.9 + emb2[1] * 0.1  # now the right result outranks the wrong one
    emb2 /= np.linalg.norm(emb2, axis=1, keepdims=True)
    assert still_wrong(pairs, emb2)["still_wrong"] == 0


def test_the_pair_loss_pushes_wrong_apart_and_pulls_right_together():
    torch.manual_seed(0)
    pairs = _pairs()
    feats = torch.randn(6, 8)
    feats[3] = feats[0] + 0.3 * torch.randn(8)  # the wrong result starts close to its query
    proj = torch.nn.Linear(8, 8)
    loss_fn = FeedbackLoss(pairs, lambda idx: proj(feats[idx]), per_step=2, margin=0.5, seed=0)
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    emb = F.normalize(proj(feats), dim=1).detach()
    assert float(emb[0] @ emb[3]) <= 0.5 + 1e-3  # cosine distance >= margin
    assert float(emb[0] @ emb[1]) > 0.95
    assert float(loss_fn().detach()) < 1e-3
    assert still_wrong(pairs, emb.numpy())["still_wrong"] == 0


def test_train_and_eval_with_feedback_from_an_index(tmp_path, capsys):
    from lookalike.cli import main

    data = make_image_folder(tmp_path / "data", n_classes=8, per_class=6, size=40, kind="pattern")
    tiny = ["--data.root", str(data), "--data.train_classes", "null", "--data.test_classes", "null",
            "--data.test_fraction", "0.25", "--data.val_fraction", "0.25", "--data.p", "3", "--data.k", "3",
            "--data.batches_per_epoch", "3", "--data.cached_views", "1", "--model.image_size", "32",
            "--amp", "none", "--threads", "1", "--epochs", "2", "--budget", "null", "--no-progress"]
    make_feedback_index(tmp_path, data)
    capsys.readouterr()
    assert main(["train", *tiny, "--out", str(tmp_path / "run"), "--feedback", str(tmp_path / "idx")]) == 0
    hist = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(h["train/extra_loss"] >= 0 for h in hist[1:]) and any(h["train/extra_loss"] > 0 for h in hist[1:])
    import yaml

    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["data"]["feedback"] == str(tmp_path / "idx")
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--feedback", str(tmp_path / "idx"),
                 "--out", str(tmp_path / "report")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feedback"]["wrong_pairs"] == 1 and out["feedback"]["still_wrong"] in (0, 1)


def test_an_index_without_marks_is_a_clear_error(tmp_path):
    from index import IndexStore
    from index.feedback import read_feedback

    from tests.unit.index.helpers import make_card
    from training.feedback import load_feedback_pairs, pairs_from_records, set_feedback_reader

    IndexStore.create(tmp_path / "idx", card=make_card(), images_root=tmp_path).close()
    set_feedback_reader(None)
    with pytest.raises(ValueError, match="needs a reader"):
        load_feedback_pairs(tmp_path / "idx")
    set_feedback_reader(read_feedback)
    try:
        with pytest.raises(ValueError, match="no usable relevance feedback"):
            load_feedback_pairs(tmp_path / "idx")
    finally:
        set_feedback_reader(None)
    with pytest.raises(ValueError, match="no usable relevance feedback"):
        pairs_from_records([], source="x")
