"""The names ``models`` accepts, importable without torch (config validation and ``--help``
list them from here). Each registry is the only definition of its names."""

from __future__ import annotations

from models.lazy import Registry
from models.pretrained import SHIPPED

#: Projection heads: ``none`` embeds the backbone's pooled features themselves (D = feature_dim),
#: which is what a pretrained backbone's zero-shot embedding is.
HEADS = ("none", "linear", "mlp")

#: Head activations, by name.
ACTIVATIONS = Registry("activation", {
    "relu": "torch.nn:ReLU",
    "leaky_relu": "torch.nn:LeakyReLU",
    "prelu": "torch.nn:PReLU",
    "relu6": "torch.nn:ReLU6",
    "softplus": "torch.nn:Softplus",
    "gelu": "torch.nn:GELU",
})

#: torchvision backbones: name -> (builder in torchvision.models, its weights enum, how its
#: classifier is removed: "fc", "classifier_last", "efficientnet" or "vit").
TORCHVISION_BACKBONES: dict[str, tuple[str, str, str]] = {
    "resnet18": ("resnet18", "ResNet18_Weights", "fc"),
    "resnet34": ("resnet34", "ResNet34_Weights", "fc"),
    "resnet50": ("resnet50", "ResNet50_Weights", "fc"),
    "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights", "efficientnet"),
    "mobilenet_v3_large": ("mobilenet_v3_large", "MobileNet_V3_Large_Weights", "classifier_last"),
    "mobilenet_v3_small": ("mobilenet_v3_small", "MobileNet_V3_Small_Weights", "classifier_last"),
    "convnext_tiny": ("convnext_tiny", "ConvNeXt_Tiny_Weights", "classifier_last"),
    "vit_b_16": ("vit_b_16", "ViT_B_16_Weights", "vit"),
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`models.build_backbone`: torchvision's and those with shipped weights."""
    return sorted([*TORCHVISION_BACKBONES, *SHIPPED])
