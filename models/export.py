"""ONNX export of an EmbeddingNet, verified against torch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.backends import ONNX_FILE, OnnxBackend, TorchBackend
from models.io import load_model, resolve_model_dir

log = logging.getLogger(__name__)


def export_onnx(model_dir: str | Path, *, opset: int = 17, verify_batch: np.ndarray | None = None,
                atol: float = 1e-4) -> tuple[Path, float]:
    """Export ``model_dir``'s model to ``model.onnx`` beside its weights and verify it.

    The graph outputs un-normalised (N, D) embeddings (normalised by the backend) with a
    dynamic batch axis. Verification runs both backends in fp32 on ``verify_batch``
    ((N, 3, S, S) float32; random if None) and raises if the max abs difference of the unit
    vectors exceeds ``atol``.

    Returns:
        (path of the .onnx file, measured max abs difference).
    """
    import torch

    d = resolve_model_dir(model_dir)
    model = load_model(d).eval()
    card = model.card

    class _Raw(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_raw(x)

    s = card.image_size
    dummy = torch.zeros(2, 3, s, s)
    out = d / ONNX_FILE
    tmp = d / (ONNX_FILE + ".tmp")
    torch.onnx.export(
        _Raw(model), (dummy,), str(tmp), input_names=["images"], output_names=["embeddings"],
        dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, opset_version=opset, dynamo=False,
    )
    import onnx

    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "fingerprint", card.fingerprint
    onnx.save(proto, str(tmp))
    tmp.replace(out)

    if verify_batch is None:
        verify_batch = np.random.default_rng(0).standard_normal((4, 3, s, s)).astype(np.float32)
    ref = TorchBackend(d, bf16=False, channels_last=False, model=model).embed_array(verify_batch)
    got = OnnxBackend(d).embed_array(verify_batch)
    diff = float(np.abs(ref - got).max())
    if diff > atol:
        out.unlink(missing_ok=True)
        raise RuntimeError(f"ONNX export differs from torch by {diff:.2e} > {atol:.0e}; export removed")
    log.info("exported %s (max abs diff vs torch %.2e)", out, diff)
    return out, diff
