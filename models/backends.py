"""Inference backends: one interface, two implementations giving the same embeddings.

* :class:`TorchBackend` — eager PyTorch, channels_last, optional bf16 autocast.
* :class:`OnnxBackend` — ONNX Runtime on a model exported by :func:`models.export.export_onnx`.
  Needs no torch: a serving install can run with onnxruntime, numpy and PIL alone.

Both take preprocessed (N, 3, S, S) float32 arrays (from :class:`models.preprocess.Preprocess`,
the single preprocessing definition) and return (N, D) float32 unit-norm embeddings.

Threading: backends are not thread-safe by contract; build and call one from a single
thread (the service keeps a dedicated inference thread: a torch forward called from a
different thread than the one that initialised torch was measured 1.7x slower here).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from models.card import ModelCard
from models.preprocess import Preprocess

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
BACKENDS = ("torch", "onnx")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-normalise an (N, D) array to unit norm, float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class InferenceBackend(ABC):
    """Maps preprocessed images to embeddings. ``card`` describes the model."""

    name: str = ""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.preprocess = Preprocess(card)

    @abstractmethod
    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, D) float32 unit norm."""

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """List of RGB PIL images -> (N, D) float32 unit norm."""
        return self.embed_array(self.preprocess.batch(images))

    @property
    def dim(self) -> int:
        return self.card.embedding_dim


def cpu_info() -> dict:
    """This machine's CPU, for speed figures: model name, cores, the SIMD flags that matter, native bf16."""
    import os

    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    limits = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    return {"model": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in wanted},
            "native_bf16": bf16_supported(), **({"isa_limited_by": limits} if limits else {})}


def bf16_supported() -> bool:
    """True when this CPU has native bf16 (AVX512-BF16 or AMX), or a CUDA GPU supports it.

    ``ATEN_CPU_CAPABILITY=avx2`` / ``ONEDNN_MAX_CPU_ISA=AVX2`` (PyTorch's and oneDNN's own
    switches, which make a bf16 CPU run like an AVX2-only one) count as "no native bf16".
    """
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if aten in ("default", "avx2") or (isa and not ("AVX512_CORE_BF16" in isa or "AMX" in isa or isa == "ALL")):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


class TorchBackend(InferenceBackend):
    """Eager PyTorch inference under ``torch.inference_mode``, channels_last, optional bf16."""

    name = "torch"

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", bf16: bool | None = None,
                 channels_last: bool = True, model=None) -> None:
        import torch

        from models.io import load_model

        self.model = model if model is not None else load_model(model_dir, map_location=device)
        super().__init__(self.model.card)
        self.device = torch.device(device)
        self.model = self.model.to(self.device).eval()
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.bf16 = bf16_supported() if bf16 is None else bf16

    def embed_tensor(self, x):
        """(N, 3, S, S) float32 torch tensor -> (N, D) float32 unit-norm torch tensor (CPU)."""
        import torch

        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                raw = self.model.forward_raw(x)
            return torch.nn.functional.normalize(raw.float(), dim=1).cpu()

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_tensor(torch.from_numpy(np.ascontiguousarray(batch))).numpy()


class OnnxBackend(InferenceBackend):
    """ONNX Runtime inference (CPU provider); torch is not imported."""

    name = "onnx"

    def __init__(self, model_dir: str | Path, *, threads: int = 1) -> None:
        import onnxruntime as ort

        from models.card import CARD_FILE
        import json

        d = Path(model_dir)
        if (d / "model" / CARD_FILE).is_file():
            d = d / "model"
        onnx_path = d / ONNX_FILE
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path}: no ONNX export; run `lookalike export --onnx {d}`")
        card = ModelCard.from_dict(json.loads((d / CARD_FILE).read_text()))
        super().__init__(card)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("fingerprint") and meta["fingerprint"] != card.fingerprint:
            raise ValueError(
                f"{onnx_path}: exported from model {meta['fingerprint'][:16]}… but the card is "
                f"{card.fingerprint[:16]}…; re-export with `lookalike export --onnx`"
            )
        self._input = self.session.get_inputs()[0].name

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        (out,) = self.session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return l2_normalize(out)


def load_backend(model_dir: str | Path, name: str = "torch", **kwargs) -> InferenceBackend:
    """Build a backend by name (``torch`` or ``onnx``) for a model/run directory."""
    if name == "torch":
        return TorchBackend(model_dir, **kwargs)
    if name == "onnx":
        return OnnxBackend(model_dir, **kwargs)
    raise ValueError(f"unknown backend {name!r}; allowed: {list(BACKENDS)}")
