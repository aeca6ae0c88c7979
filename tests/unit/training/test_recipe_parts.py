"""Config validation, P×K sampler, schedules, optimizers, aux head, collapse monitor."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from training.config import TrainConfig, load_config, parse_override
from training.data import PKSampler, make_splits
from training.trainer import OPTIMIZERS, AuxClassifier, CollapseMonitor, build_optimizer, lr_lambda_factory


from tests.helpers import make_image_folder


def test_config_defaults_valid_and_digest_stable():
    a, b = load_config(), TrainConfig()
    assert a.digest() == b.digest()
    assert load_config(overrides={"loss.margin": 0.3}).digest() != a.digest()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"loss.margin": -1}, "loss.margin"),
        ({"data.p": 1}, "data.p"),
        ({"optim.name": "lbfgs"}, "optim.name"),
        ({"model.backbone": "resnet9"}, "allowed"),
        ({"model.image_size": 128, "model.resize_size": 64}, "resize_size"),
        ({"amp": "fp8"}, "amp"),
    ],
)
def test_config_rejects_bad_values(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(overrides=overrides)


def test_config_unknown_key_names_allowed_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\n  warmup: 3\n")
    with pytest.raises(ValueError, match=r"optim.warmup: unknown key; allowed: \[.*'warmup_epochs'"):
        load_config(f)
    with pytest.raises(ValueError, match="unknown config field 'optim.warmup'"):
        parse_override("optim.warmup=3")
    f.write_text("- just a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(f)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.yaml")


def test_sampler_exact_pk_whole_classes():
    labels = [c for c in range(10) for _ in range(3 + c)]  # classes of 3..12 images
    s = PKSampler(labels, p=4, k=3, batches_per_epoch=50, seed=1)
    seen = Counter()
    for batch in s:
        assert len(batch) == 12
        per_class = Counter(labels[i] for i in batch)
        assert len(per_class) == 4 and set(per_class.values()) == {3}
        for c in per_class:  # whole classes: K distinct images when the class has >= K
            assert len({i for i in batch if labels[i] == c}) == 3
        seen.update(batch)
    assert len(seen) == len(labels)  # every image is visited
    s.set_epoch(1)
    first_e1 = next(iter(s))
    s.set_epoch(0)
    assert next(iter(s)) != first_e1 and next(iter(s)) == next(iter(s))  # seeded per epoch


def test_sampler_small_classes_and_errors():
    labels = [0, 0, 1, 1, 2]  # class 2 has one image: excluded
    s = PKSampler(labels, p=2, k=3, batches_per_epoch=5)
    for batch in s:
        assert len(batch) == 6 and 4 not in batch
    with pytest.raises(ValueError, match="only 2 classes"):
        PKSampler(labels, p=3, k=2)


def test_splits_are_class_disjoint(tmp_path):
    root = make_image_folder(tmp_path / "d", n_classes=10, per_class=3)
    s = make_splits(root, train_classes=None, test_classes=None, test_fraction=0.3, val_fraction=0.25, seed=0)
    names = [set(s[k].classes) for k in ("train", "val", "test")]
    assert sum(map(len, names)) == 10 and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    (tmp_path / "test.txt").write_text("class_00\nclass_01\n")
    s2 = make_splits(root, train_classes=None, test_classes=str(tmp_path / "test.txt"))
    assert s2["test"].classes == ["class_00", "class_01"] and len(s2["train"].classes) == 8
    (tmp_path / "bad.txt").write_text("class_99\n")
    with pytest.raises(ValueError, match="do not exist"):
        make_splits(root, train_classes=None, test_classes=str(tmp_path / "bad.txt"))


def test_lr_schedule_warmup_then_cosine_to_zero():
    f = lr_lambda_factory(schedule="cosine", total_steps=100, warmup_steps=10, steps_per_epoch=10, step_size=3, gamma=0.1)
    assert f(0) == pytest.approx(0.01) and f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-9)
    assert all(f(i) >= f(i + 1) for i in range(10, 99))
    g = lr_lambda_factory(schedule="step", total_steps=100, warmup_steps=0, steps_per_epoch=10, step_size=3, gamma=0.1)
    assert g(29) == 1.0 and g(30) == pytest.approx(0.1) and g(60) == pytest.approx(0.01)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_by_name_steps(name):
    w = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(name, [{"params": [w]}], lr=0.1, weight_decay=0.0)
    (w**2).sum().backward()
    opt.step()
    assert not torch.equal(w.detach(), torch.ones(3))
    assert type(opt).__module__.startswith("torch.optim")


def test_unknown_optimizer_names_allowed():
    with pytest.raises(ValueError, match="allowed"):
        build_optimizer("lion", [{"params": [torch.nn.Parameter(torch.ones(1))]}], lr=0.1, weight_decay=0)


@pytest.mark.parametrize("kind", ["softmax", "hinge"])
def test_aux_head_learns(kind):
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    labels = torch.arange(32) % 4
    head = AuxClassifier(8, 4, kind)
    opt = torch.optim.Adam(head.parameters(), 0.05)
    first = float(head(emb, labels).detach())
    for _ in range(100):
        opt.zero_grad()
        loss = head(emb, labels)
        loss.backward()
        opt.step()
    assert float(loss) < first * 0.7


def test_collapse_monitor():
    same = torch.nn.functional.normalize(torch.ones(16, 8) + 1e-4 * torch.randn(16, 8), dim=1)
    m = CollapseMonitor(0.95)
    m.update(same, same * 3, 1.0)
    assert m.collapsed() and m.summary()["embedding_norm"] == pytest.approx(3, rel=1e-3)
    rand = torch.nn.functional.normalize(torch.randn(256, 64), dim=1)
    assert abs(CollapseMonitor.mean_pairwise_cosine(rand)) < 0.05
    # O(N·D) formula equals the explicit matrix
    g = rand @ rand.T
    explicit = (g.sum() - g.diagonal().sum()) / (256 * 255)
    assert CollapseMonitor.mean_pairwise_cosine(rand) == pytest.approx(float(explicit), abs=1e-5)
    m2 = CollapseMonitor(0.95)
    m2.update(rand, rand, 0.5)
    assert not m2.collapsed() and not math.isnan(m2.summary()["active_fraction"])
