"""Inference backends: one interface, three implementations giving the same embeddings.

* :class:`TorchBackend` — eager PyTorch, channels_last, optional bf16 autocast.
* :class:`OnnxBackend` — ONNX Runtime on a model exported by :func:`models.export.export_onnx`.
  Needs no torch: a serving install can run with onnxruntime, numpy and PIL alone.
* :class:`OpenVinoBackend` — OpenVINO's CPU plugin on the same ``model.onnx``, fp32 (its default
  on CPUs with bf16 would be bf16; fp32 is asked for so it embeds like the others). Runs on
  Intel and AMD x86 CPUs; optional (the ``openvino`` extra).

Which one a machine should use is measured, not guessed: see :mod:`models.backend_choice`.

Both take preprocessed (N, 3, S, S) float32 arrays (from :class:`models.preprocess.Preprocess`,
the single preprocessing definition) and return (N, D) float32 unit-norm embeddings.

Threading: backends are not thread-safe by contract; build and call one from a single
thread (the service keeps a dedicated inference thread: a torch forward called from a
different thread than the one that initialised torch was measured 1.7x slower here).
:meth:`InferenceBackend.set_threads` changes the intra-op thread count between calls (torch:
``torch.set_num_threads``; ONNX Runtime and OpenVINO fix it per session, so they keep one
session per thread count asked for, built on first use).
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
BACKENDS = ("torch", "onnx", "openvino")


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

    #: intra-op threads of the next call (see :meth:`set_threads`)
    threads: int = 1

    def set_threads(self, n: int) -> None:
        """Intra-op threads for the following calls (call from the thread that runs the backend)."""
        self.threads = max(1, int(n))

    def fork(self) -> "InferenceBackend | None":
        """Another handle on this model for a second inference thread, to run at the same time as
        this one (its own thread count and runtime requests, the same weights), or None when
        this runtime gains nothing from it (torch: a forward pass run from another thread than
        the one that built the model was measured 1.7x slower, see :mod:`service.batching`)."""
        return None


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
            "native_bf16": cpu_bf16(), **({"isa_limited_by": limits} if limits else {})}


def cpu_summary(info: dict | None = None) -> str:
    """One line naming the CPU for bench headers and README tables, e.g.
    ``AMD EPYC 9R45 (2 cores; avx2 avx512f avx512_bf16; ISA limited: ATEN_CPU_CAPABILITY=avx2)``."""
    info = cpu_info() if info is None else info
    flags = " ".join(f for f, on in info["flags"].items() if on) or "no avx2"
    limited = info.get("isa_limited_by")
    extra = "; ISA limited: " + " ".join(f"{k}={v}" for k, v in limited.items()) if limited else ""
    return f"{info['model']} ({info['cores']} cores; {flags}{extra})"


def bf16_supported() -> bool:
    """True when this CPU has native bf16 (AVX512-BF16 or AMX), or a CUDA GPU supports it.

    ``ATEN_CPU_CAPABILITY=avx2`` / ``ONEDNN_MAX_CPU_ISA=AVX2`` (PyTorch's and oneDNN's own
    switches, which make a bf16 CPU run like an AVX2-only one) count as "no native bf16".
    """
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16()


def cpu_bf16() -> bool:
    """The CPU part of :func:`bf16_supported`, without importing torch."""
    import os

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
        self.threads = torch.get_num_threads()

    def set_threads(self, n: int) -> None:
        import torch

        n = max(1, int(n))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.threads = n

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


def _onnx_model_files(model_dir: str | Path) -> tuple[Path, ModelCard]:
    """(model.onnx path, card) of a model or run directory, without importing torch."""
    import json

    from models.card import CARD_FILE

    d = Path(model_dir)
    if (d / "model" / CARD_FILE).is_file():
        d = d / "model"
    onnx_path = d / ONNX_FILE
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no ONNX export; run `lookalike export --onnx {d}`")
    return onnx_path, ModelCard.from_dict(json.loads((d / CARD_FILE).read_text()))


#: ONNX Runtime graph optimisation levels by name (``OnnxBackend(opt_level=...)``).
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")


class OnnxBackend(InferenceBackend):
    """ONNX Runtime inference (CPU provider); torch is not imported.

    ``opt_level``: ONNX Runtime graph optimisation (``all`` by default; bench_backends.py
    measures the others). ``spin``: let idle intra-op threads spin-wait (ORT's default); off,
    they sleep, which keeps a second pool from stealing the core another thread needs.
    """

    name = "onnx"

    def __init__(self, model_dir: str | Path, *, threads: int = 1, opt_level: str = "all",
                 spin: bool = False, onnx_path: str | Path | None = None) -> None:
        if opt_level not in ORT_OPT_LEVELS:
            raise ValueError(f"unknown opt_level {opt_level!r}; allowed: {list(ORT_OPT_LEVELS)}")
        default_path, card = _onnx_model_files(model_dir)
        super().__init__(card)
        self.onnx_path = Path(onnx_path) if onnx_path is not None else default_path
        self.opt_level, self.spin = opt_level, spin
        self._sessions: dict[int, object] = {}
        self.set_threads(threads)
        meta = self._session().get_modelmeta().custom_metadata_map
        if meta.get("fingerprint") and meta["fingerprint"] != card.fingerprint:
            raise ValueError(
                f"{self.onnx_path}: exported from model {meta['fingerprint'][:16]}… but the card is "
                f"{card.fingerprint[:16]}…; re-export with `lookalike export --onnx`"
            )
        self._input = self._session().get_inputs()[0].name

    def _session(self):
        session = self._sessions.get(self.threads)
        if session is None:
            import onnxruntime as ort

            levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                      "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                      "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                      "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = levels[self.opt_level]
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
            session = ort.InferenceSession(str(self.onnx_path), opts, providers=["CPUExecutionProvider"])
            self._sessions[self.threads] = session
        return session

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        (out,) = self._session().run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return l2_normalize(out)

    def fork(self) -> "OnnxBackend":
        """A handle with its own thread count and its own sessions (ONNX Runtime's ``run`` is
        thread-safe, but a session runs on its own intra-op pool, which two threads would share)."""
        import copy

        twin = copy.copy(self)
        twin._sessions = {}
        twin._session()
        return twin


class OpenVinoBackend(InferenceBackend):
    """OpenVINO CPU inference of ``model.onnx`` in fp32 (``precision="bf16"`` where native).

    One compiled model per thread count (latency mode: one stream, no core pinning, which on
    a shared machine would fight other processes for the pinned cores), and beside it one
    compiled for a single image with the batch dimension fixed at 1, which the service sends
    most: identical output and 8-11% faster (Lite0 at 224 px, 1 thread, AMD EPYC Zen 3 AVX2:
    17.5-18.3 ms against 19.4-19.8 ms with the dynamic batch; ``docs/design.md``).
    """

    name = "openvino"

    def __init__(self, model_dir: str | Path, *, threads: int = 1, precision: str = "f32") -> None:
        import openvino as ov

        if precision not in ("f32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}; allowed: ['f32', 'bf16']")
        self.onnx_path, card = _onnx_model_files(model_dir)
        super().__init__(card)
        self.precision = precision
        self._core = ov.Core()
        self._model = self._core.read_model(str(self.onnx_path))
        self._single = self._single_image_model()
        self._requests: dict[tuple[int, bool], object] = {}
        self.set_threads(threads)
        self._warm()

    def _single_image_model(self):
        """``self._model`` with its batch dimension fixed at 1, or None when the other input
        dimensions are not static (then single images take the dynamic model)."""
        shape = self._model.inputs[0].get_partial_shape()
        rest = [] if shape.rank.is_dynamic else list(shape)[1:]
        if not rest or any(d.is_dynamic for d in rest):
            return None
        single = self._model.clone()  # not a second read of the file
        single.reshape({0: [1, *(d.get_length() for d in rest)]})
        return single

    def _warm(self) -> None:
        """Compile both models at the current thread count now, not at the first query."""
        self._request(single=False)
        if self._single is not None:
            self._request(single=True)

    def _request(self, single: bool = False):
        single = single and self._single is not None
        req = self._requests.get((self.threads, single))
        if req is None:
            compiled = self._core.compile_model(self._single if single else self._model, "CPU", {
                "INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": self.threads,
                "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False})
            req = self._requests[(self.threads, single)] = compiled.create_infer_request()
        return req

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._request(single=len(batch) == 1).infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return l2_normalize(np.array(out, copy=True))

    def fork(self) -> "OpenVinoBackend":
        """A handle with its own compiled models and infer requests (one stream each: a compiled
        model with one stream runs one inference at a time, whichever thread asks)."""
        import copy

        twin = copy.copy(self)
        twin._requests = {}
        twin._warm()
        return twin


def load_backend(model_dir: str | Path, name: str = "torch", **kwargs) -> InferenceBackend:
    """Build a backend by name (``torch``, ``onnx``, ``openvino``) for a model/run directory.

    ``auto`` is resolved first by :func:`models.backend_choice.choose_backend` (measured on this
    CPU); keyword arguments a backend does not take (``bf16`` for ONNX) are dropped then.
    """
    if name == "auto":
        from models.backend_choice import choose_backend

        name = choose_backend(model_dir)
        if name != "torch":
            kwargs.pop("bf16", None)
        elif kwargs.get("bf16") is None:
            kwargs["bf16"] = False  # auto is fp32 (see models.backend_choice)
    if name == "torch":
        return TorchBackend(model_dir, **kwargs)
    if name == "onnx":
        return OnnxBackend(model_dir, **kwargs)
    if name == "openvino":
        return OpenVinoBackend(model_dir, **kwargs)
    raise ValueError(f"unknown backend {name!r}; allowed: {['auto', *BACKENDS]}")
