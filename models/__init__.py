"""lookalike.models: pixels -> (N, D) float32 unit vectors.

Torch-free names (decode, card, preprocess, ONNX backend) import without torch so a
serving install can run with ONNX Runtime alone; torch-backed names load lazily.
"""

from models.card import CARD_FILE, WEIGHTS_FILE, ModelCard, compute_fingerprint
from models.decode import DEFAULT_LIMITS, DecodeLimits, ImageDecodeError, decode_image
from models.lazy import lazy_getattr
from models.preprocess import Preprocess

_LAZY = {
    "EmbeddingNet": "models.net",
    "ACTIVATIONS": "models.registry",
    "build_activation": "models.net",
    "build_backbone": "models.backbones",
    "available_backbones": "models.registry",
    "save_model": "models.io",
    "load_model": "models.io",
    "load_card": "models.io",
    "resolve_model_dir": "models.io",
    "refuse_pickle": "models.io",
    "UnsafeCheckpointError": "models.io",
    "InferenceBackend": "models.backends",
    "TorchBackend": "models.backends",
    "OnnxBackend": "models.backends",
    "load_backend": "models.backends",
    "l2_normalize": "models.backends",
    "bf16_supported": "models.backends",
    "export_onnx": "models.export",
}

__getattr__ = lazy_getattr("models", _LAZY)


__all__ = [
    "CARD_FILE", "WEIGHTS_FILE", "ModelCard", "compute_fingerprint", "DEFAULT_LIMITS", "DecodeLimits",
    "ImageDecodeError", "decode_image", "Preprocess", *_LAZY,
]
