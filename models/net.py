"""EmbeddingNet: backbone -> (BN neck) -> linear/MLP head (or none) -> L2 normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_backbone, split_backbone
from models.card import ModelCard

#: Projection heads, by name: ``none`` embeds the backbone's pooled features themselves
#: (D = feature_dim), which is what a pretrained backbone's zero-shot embedding is.
HEADS = ("none", "linear", "mlp")

#: Head activations, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "relu6": nn.ReLU6,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
}


def build_activation(name: str) -> nn.Module:
    """Activation module by name; raises ValueError naming the allowed set."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class EmbeddingNet(nn.Module):
    """Maps (N, 3, S, S) float32 images to (N, D) float32 unit-norm embeddings.

    ``forward_raw`` returns the (N, D) embedding before normalisation (used to monitor the
    norm for collapse detection); ``forward`` returns it L2-normalised.

    For partial fine-tuning, :meth:`split` cuts the backbone into a frozen trunk and a
    trainable top; :meth:`forward_top_raw` then maps the trunk's (N, C, h, w) outputs to the
    same un-normalised embedding, so a trainer can cache trunk outputs once.
    """

    def __init__(self, card: ModelCard, *, backbone_weights: str | None = None) -> None:
        super().__init__()
        self.card = card
        self.backbone, feat_dim = build_backbone(card.backbone, weights=backbone_weights, image_size=card.image_size)
        self.feature_dim = feat_dim
        self.neck = nn.BatchNorm1d(feat_dim) if card.neck_bn else nn.Identity()
        if card.head == "none":
            if card.embedding_dim != feat_dim:
                raise ValueError(f"head 'none' embeds the {feat_dim}-d backbone features; embedding_dim is "
                                 f"{card.embedding_dim} (use {feat_dim}, or a linear head)")
            self.head = nn.Identity()
        elif card.head == "linear":
            self.head = nn.Linear(feat_dim, card.embedding_dim)
        elif card.head == "mlp":
            self.head = nn.Sequential(
                nn.Linear(feat_dim, card.head_hidden),
                build_activation(card.activation),
                nn.Linear(card.head_hidden, card.embedding_dim),
            )
        else:
            raise ValueError(f"unknown head {card.head!r}; allowed: {list(HEADS)}")
        self._parts: tuple[nn.Module, nn.Module] | None = None  # (trunk, top), not registered

    def split(self, trainable_stages: int) -> tuple[nn.Module, nn.Module]:
        """Freeze all but the last ``trainable_stages`` backbone stages; returns ``(trunk, top)``.

        The trunk's parameters stop requiring gradients and it stays in eval mode (its
        BatchNorm statistics are frozen), so its outputs can be computed once and cached.
        """
        trunk, top = split_backbone(self.backbone, trainable_stages)
        for p in trunk.parameters():
            p.requires_grad_(False)
        self._parts = (trunk, top)
        self.train(self.training)
        return trunk, top

    @property
    def trunk(self) -> nn.Module | None:
        """The frozen trunk after :meth:`split`, else None."""
        return self._parts[0] if self._parts else None

    def train(self, mode: bool = True) -> "EmbeddingNet":
        super().train(mode)
        if self._parts is not None:
            self._parts[0].eval()
        return self

    def forward_top_raw(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) trunk outputs -> (N, D) un-normalised embeddings (after :meth:`split`)."""
        if self._parts is None:
            raise RuntimeError("forward_top_raw needs split() first")
        return self.head(self.neck(self._parts[1](feats)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, feature_dim) backbone features after the neck."""
        return self.neck(self.backbone(x))

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, D) un-normalised embeddings."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float32 -> (N, D) float32 unit-norm embeddings."""
        return F.normalize(self.forward_raw(x).float(), dim=1)


def zero_shot_model(backbone: str, *, weights: str = "DEFAULT", image_size: int | None = None) -> EmbeddingNet:
    """A pretrained backbone as an embedding model with no training (eval mode).

    The embedding is the backbone's pooled features (head ``none``, no neck), L2-normalised;
    the card carries the normalisation and image size the weights expect, so indexing and
    serving it needs nothing else.

    Args:
        backbone: a backbone name (``efficientnet_lite0`` works offline).
        weights: pretrained weights name or ``.safetensors`` file.
        image_size: crop side (default: the resolution the weights were trained at).
    """
    from models.backbones import backbone_defaults, feature_dim

    pre = backbone_defaults(backbone)
    size = image_size or pre["image_size"]
    card = ModelCard(backbone=backbone, embedding_dim=feature_dim(backbone), image_size=size,
                     resize_size=int(round(size * 8 / 7)), mean=pre["mean"], std=pre["std"], head="none",
                     neck_bn=False, extra={"zero_shot": True, "weights": weights})
    return EmbeddingNet(card, backbone_weights=weights).eval()
