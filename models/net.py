"""EmbeddingNet: backbone -> (BN neck) -> linear/MLP head -> L2 normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_backbone
from models.card import ModelCard

#: Head activations, by name (from the seed lecture).
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
    """

    def __init__(self, card: ModelCard, *, backbone_weights: str | None = None) -> None:
        super().__init__()
        self.card = card
        self.backbone, feat_dim = build_backbone(card.backbone, weights=backbone_weights, image_size=card.image_size)
        self.feature_dim = feat_dim
        self.neck = nn.BatchNorm1d(feat_dim) if card.neck_bn else nn.Identity()
        if card.head == "linear":
            self.head = nn.Linear(feat_dim, card.embedding_dim)
        elif card.head == "mlp":
            self.head = nn.Sequential(
                nn.Linear(feat_dim, card.head_hidden),
                build_activation(card.activation),
                nn.Linear(card.head_hidden, card.embedding_dim),
            )
        else:
            raise ValueError(f"unknown head {card.head!r}; allowed: ['linear', 'mlp']")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, feature_dim) backbone features after the neck."""
        return self.neck(self.backbone(x))

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, D) un-normalised embeddings."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float32 -> (N, D) float32 unit-norm embeddings."""
        return F.normalize(self.forward_raw(x).float(), dim=1)
