"""The model card: everything needed to turn pixels into the model's embeddings.

It is saved as ``card.json`` beside ``model.safetensors``. Preprocessing is built from it
(:mod:`models.preprocess`), so callers never re-type mean/std or image sizes. The
fingerprint is the sha256 of the weights file bytes plus the canonical card JSON (without
the fingerprint itself); an index built with one model refuses another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
CARD_VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelCard:
    """Describes a trained embedding model.

    Attributes:
        backbone: registry name (see :func:`models.available_backbones`).
        embedding_dim: D, the output size; outputs are (N, D) float32 unit vectors.
        image_size: side of the square crop fed to the network.
        resize_size: the shorter side is resized to this before the centre crop.
        mean, std: per-channel normalisation of [0, 1] RGB.
        metric: always ``"cosine"`` (unit vectors, inner product).
        head: ``"none"`` (pooled features), ``"linear"`` or ``"mlp"``; ``head_hidden`` its hidden width; ``activation``
            the head's activation; ``neck_bn`` whether a BatchNorm sits before the
            projection.
        config_digest: sha256 of the resolved training config (empty if untrained).
        fingerprint: sha256 of weights + card; filled in by :func:`models.save_model`.
    """

    backbone: str
    embedding_dim: int
    image_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    metric: str = "cosine"
    head: str = "linear"
    head_hidden: int = 512
    activation: str = "relu"
    neck_bn: bool = True
    config_digest: str = ""
    version: int = CARD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.metric != "cosine":
            raise ValueError(f"metric {self.metric!r} is not supported; allowed: 'cosine'")
        if self.embedding_dim < 2:
            raise ValueError(f"embedding_dim must be >= 2, got {self.embedding_dim}")
        if self.image_size < 16 or self.resize_size < self.image_size:
            raise ValueError(
                f"need 16 <= image_size <= resize_size, got image_size={self.image_size}, "
                f"resize_size={self.resize_size}"
            )
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def canonical_json(self, *, with_fingerprint: bool = False) -> str:
        d = self.to_dict()
        if not with_fingerprint:
            d.pop("fingerprint")
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown model card keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)

    @classmethod
    def load(cls, directory: str | Path) -> "ModelCard":
        path = Path(directory) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no model card (expected {CARD_FILE} beside {WEIGHTS_FILE})")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path}: invalid model card ({exc})") from None


def compute_fingerprint(weights_path: str | Path, card: ModelCard) -> str:
    """sha256 hex of the weights file bytes followed by the canonical card JSON."""
    h = hashlib.sha256()
    with open(weights_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    h.update(card.canonical_json().encode())
    return h.hexdigest()
