"""Backbone registry over torchvision.

``build_backbone(name, *, weights=None)`` returns ``(module, feature_dim)`` where the module
maps (N, 3, S, S) float32 to (N, feature_dim) pooled features.

``weights`` is ``None`` (random init), a torchvision weights name (``"DEFAULT"``,
``"IMAGENET1K_V1"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``; torchvision downloads it on the
user's machine when first asked, never in tests), or a local ``.safetensors`` file holding the
torchvision state dict of that backbone. Pickle files are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Spec:
    builder: Callable[..., nn.Module]
    weights_enum: type
    strip: Callable[[nn.Module], int]  # removes the classifier in place, returns feature dim


def _strip_fc(m: nn.Module) -> int:
    dim = m.fc.in_features
    m.fc = nn.Identity()
    return dim


def _strip_classifier_last(m: nn.Module) -> int:
    last = m.classifier[-1]
    dim = last.in_features
    m.classifier[-1] = nn.Identity()
    # drop the dropout too: embeddings should be deterministic in eval and features intact
    return dim


def _strip_efficientnet(m: nn.Module) -> int:
    dim = m.classifier[-1].in_features
    m.classifier = nn.Identity()
    return dim


def _strip_vit(m: nn.Module) -> int:
    dim = m.heads.head.in_features
    m.heads = nn.Identity()
    return dim


tvm = torchvision.models
_REGISTRY: dict[str, _Spec] = {
    "resnet18": _Spec(tvm.resnet18, tvm.ResNet18_Weights, _strip_fc),
    "resnet34": _Spec(tvm.resnet34, tvm.ResNet34_Weights, _strip_fc),
    "resnet50": _Spec(tvm.resnet50, tvm.ResNet50_Weights, _strip_fc),
    "efficientnet_b0": _Spec(tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights, _strip_efficientnet),
    "mobilenet_v3_large": _Spec(tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights, _strip_classifier_last),
    "mobilenet_v3_small": _Spec(tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights, _strip_classifier_last),
    "convnext_tiny": _Spec(tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights, _strip_classifier_last),
    "vit_b_16": _Spec(tvm.vit_b_16, tvm.ViT_B_16_Weights, _strip_vit),
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(_REGISTRY)


def _resolve_weights(name: str, spec: _Spec, weights: str):
    enum = spec.weights_enum
    key = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
    if key == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[key]
    except KeyError:
        allowed = ["DEFAULT", *(w.name for w in enum)]
        raise ValueError(
            f"unknown weights {weights!r} for backbone {name!r}; allowed: {allowed} or a local .safetensors file"
        ) from None


def build_backbone(name: str, *, weights: str | None = None, image_size: int = 224) -> tuple[nn.Module, int]:
    """Build a torchvision backbone without its classifier.

    Args:
        name: one of :func:`available_backbones`.
        weights: ``None``, a torchvision weights name, or a path to a ``.safetensors`` file.
        image_size: input side; only ViT needs it at construction time.

    Returns:
        ``(module, feature_dim)``; module maps (N, 3, S, S) float32 -> (N, feature_dim).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; allowed: {available_backbones()}")
    spec = _REGISTRY[name]
    kwargs: dict = {}
    local: Path | None = None
    if weights is not None and (weights.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")) or Path(weights).exists()):
        local = Path(weights)
    if name == "vit_b_16" and (weights is None or local is not None):
        kwargs["image_size"] = image_size
    if weights is not None and local is None:
        w = _resolve_weights(name, spec, weights)
        log.info("building %s with torchvision weights %s (downloaded if not cached)", name, w)
        model = spec.builder(weights=w, **kwargs)
    else:
        model = spec.builder(weights=None, **kwargs)
    if local is not None:
        from models.io import load_safetensors_state

        state = load_safetensors_state(local)
        missing, unexpected = model.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "heads."))]
        if real_missing:
            raise ValueError(f"{local}: weights do not fit {name}: missing {real_missing[:5]}")
        log.info("loaded backbone weights from %s (%d unexpected keys ignored)", local, len(unexpected))
    dim = spec.strip(model)
    return model, dim
