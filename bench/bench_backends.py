"""Inference runtimes for the default model on this CPU: speed, and agreement with torch fp32.

Candidates (each on the same preprocessed images, measured in interleaved rounds):

* ``torch fp32`` — the reference; ``torch bf16`` — autocast, only where the CPU has native bf16;
* ``ort <level>`` — ONNX Runtime at each graph optimisation level (disable, basic, extended, all);
* ``ort int8 dyn`` — ``onnxruntime.quantization.quantize_dynamic`` (uint8 weights, ConvInteger);
* ``ort int8 static`` — ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations),
  calibrated on training-class images (never the test classes the quality is measured on);
* ``openvino f32`` — OpenVINO's CPU plugin on the same ONNX file, fp32; ``openvino bf16`` where
  the CPU has native bf16.

Quality, on cub100 test classes (``--per-class`` images of each of the 42): every image is a
query against the others; top-10 agreement = mean |top-10 ∩ torch fp32's top-10| / 10; R@1 by
class (leave-one-out). A candidate is *kept* when agreement >= 0.99 and R@1 within 0.3 points of
torch fp32.

Speed: ms per call on a batch of 1 and 8 with one intra-op thread (the busy service's setting),
and a batch of 1 with every core (an idle service), medians over interleaved rounds.

ISA: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/bench_backends.py`` makes
torch and OpenVINO (both oneDNN, which reads ONEDNN_MAX_CPU_ISA) run as on an AVX2-only CPU.
ONNX Runtime's kernels (MLAS) pick their code path from CPUID and have no such switch: its
rows stay at the native ISA (AVX-512 here), so on a real AVX2 CPU ONNX Runtime is slower than
these rows say.

    python bench/bench_backends.py                   # 10 images x 42 test classes (~4 min on 2 busy cores)
    python bench/bench_backends.py --per-class 4     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KEEP_AGREEMENT = 0.99
KEEP_R1_POINTS = 0.3


def class_images(root: Path, split: str, per_class: int) -> tuple[list[Path], list[str]]:
    """``per_class`` evenly spaced images of each class listed in ``splits/cub_{split}_classes.txt``."""
    classes = [c.strip() for c in (root / "splits" / f"cub_{split}_classes.txt").read_text().splitlines() if c.strip()]
    files, labels = [], []
    for c in classes:
        imgs = sorted(p for p in (root / "images" / c).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        step = max(1, len(imgs) // per_class)
        for p in imgs[::step][:per_class]:
            files.append(p)
            labels.append(c)
    return files, labels


def preprocess_all(card, files: list[Path]) -> np.ndarray:
    """(N, 3, S, S) float32 through the card's preprocessing (the single definition)."""
    from models import decode_image
    from models.preprocess import Preprocess

    pre = Preprocess(card)
    return np.stack([pre(decode_image(p)) for p in files]).astype(np.float32)


def quantize(onnx_path: Path, out: Path, calib: np.ndarray, static: bool) -> Path:
    """Write an int8 copy of ``onnx_path``: dynamic, or static QDQ calibrated on ``calib``."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepped = out.with_suffix(".pre.onnx")
    quant_pre_process(str(onnx_path), str(prepped))
    if not static:
        quantize_dynamic(str(prepped), str(out), weight_type=QuantType.QUInt8)
        return out

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calib[i:i + 8] for i in range(0, len(calib), 8)])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"images": b}

    quantize_static(str(prepped), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def candidates(model_dir: Path, work: Path, calib: np.ndarray) -> dict[str, Callable[[int], object]]:
    """name -> builder(threads) of an InferenceBackend (``set_threads`` changes it later)."""
    import importlib.util

    from models.backends import ONNX_FILE, OnnxBackend, OpenVinoBackend, TorchBackend, cpu_bf16

    def torch_b(bf16: bool):
        def build(threads: int):
            import torch

            torch.set_num_threads(threads)
            b = TorchBackend(model_dir, bf16=bf16)
            b.set_threads(threads)
            return b
        return build

    out: dict[str, Callable[[int], object]] = {"torch fp32": torch_b(False)}
    if cpu_bf16():
        out["torch bf16"] = torch_b(True)
    for level in ("disable", "basic", "extended", "all"):
        out[f"ort {level}"] = lambda t, level=level: OnnxBackend(model_dir, threads=t, opt_level=level)
    for static in (False, True):
        name = "ort int8 static" if static else "ort int8 dyn"
        try:
            q = quantize(model_dir / ONNX_FILE, work / f"int8_{'static' if static else 'dyn'}.onnx", calib, static)
        except Exception as exc:  # noqa: BLE001 - reported as a failed candidate
            print(f"  {name}: quantisation failed: {exc}", file=sys.stderr)
            continue
        out[name] = lambda t, q=q: OnnxBackend(model_dir, threads=t, onnx_path=q)
    if importlib.util.find_spec("openvino") is not None:
        out["openvino f32"] = lambda t: OpenVinoBackend(model_dir, threads=t)
        if cpu_bf16():
            out["openvino bf16"] = lambda t: OpenVinoBackend(model_dir, threads=t, precision="bf16")
    return out


def embed_all(backend, x: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([backend.embed_array(x[i:i + batch]) for i in range(0, len(x), batch)])


def quality(emb: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict:
    from bench.bench_indexing import ranking_agreement
    from training.metrics import retrieval_metrics

    keys = [str(i) for i in range(len(emb))]
    agree = ranking_agreement(dict(zip(keys, ref)), dict(zip(keys, emb)))
    r1 = retrieval_metrics(emb, labels, ks=(1,))["recall@1"]
    return {"top10_agreement": agree["recall_at_10"], "top1_agreement": agree["top1_agreement"],
            "cosine_min": agree["cosine_min"], "r_at_1": round(100 * r1, 2)}


def speed(backends: dict[str, object], size: int, rounds: int, cores: int) -> dict[str, dict]:
    from models.backend_choice import time_backends

    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    x8 = rng.standard_normal((8, 3, size, size)).astype(np.float32)
    cells = [("b1_1thr_ms", x1, 1, 4), ("b8_1thr_ms", x8, 1, 1), (f"b1_{cores}thr_ms", x1, cores, 4)]
    times = time_backends(backends, cells, rounds)
    return {n: {label: round(v, 2) for label, v in row.items()} for n, row in times.items()}


def table(result: dict) -> str:
    cores = result["cpu"]["cores"]
    head = (f"{'candidate':16s} {'agree@10':>8s} {'top1':>6s} {'R@1':>6s} {'b1 1thr':>8s} {'b8 1thr':>8s} "
            f"{'b1 ' + str(cores) + 'thr':>8s} {'vs fp32':>7s}  kept")
    lines = [f"CPU: {result['cpu_line']}; load avg {result['load_avg_start'][0]:.1f} -> {result['load_avg_end'][0]:.1f}",
             f"{result['images']} test-class images ({result['per_class']}/class); ms per call, medians of "
             f"{result['rounds']} interleaved rounds", head]
    for name, row in result["candidates"].items():
        if "error" in row:
            lines.append(f"{name:16s} failed: {row['error']}")
            continue
        lines.append(f"{name:16s} {row['top10_agreement']:8.4f} {row['top1_agreement']:6.3f} {row['r_at_1']:6.2f} "
                     f"{row['b1_1thr_ms']:8.2f} {row['b8_1thr_ms']:8.2f} {row[f'b1_{cores}thr_ms']:8.2f} "
                     f"{row['speedup_b8_vs_fp32']:6.2f}x  {'yes' if row['kept'] else 'no'}")
    lines.append(f"kept: agreement >= {KEEP_AGREEMENT} and R@1 within {KEEP_R1_POINTS} points of torch fp32; "
                 f"fastest kept at batch 8: {result['fastest_kept_b8']}, at batch 1: {result['fastest_kept_b1']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cub100", default=os.environ.get("LOOKALIKE_CUB100", str(REPO.parent / "shared/data/cub100")))
    p.add_argument("--model", help="model directory with model.onnx (default: zero-shot efficientnet_lite0 "
                   "exported to a temp dir)")
    p.add_argument("--per-class", type=int, default=10, help="test-class images per class (42 classes)")
    p.add_argument("--calib", type=int, default=2, help="training-class images per class (58) for static int8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)

    from models.backends import cpu_info, cpu_summary
    from models.card import ModelCard

    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_backends_")
    work = Path(tmp.name)
    if args.model:
        model_dir = Path(args.model)
    else:
        from models.export import export_onnx
        from models.io import save_model
        from models.net import zero_shot_model

        model_dir = work / "lite0"
        save_model(zero_shot_model("efficientnet_lite0"), model_dir)
        export_onnx(model_dir)
    card = ModelCard.from_dict(json.loads((model_dir / "card.json").read_text()))
    cpu = cpu_info()
    print(f"CPU: {cpu_summary(cpu)}; load avg {os.getloadavg()[0]:.1f}", file=sys.stderr)
    root = Path(args.cub100)
    test_files, test_labels = class_images(root, "test", args.per_class)
    calib_files, _ = class_images(root, "train", args.calib)
    x = preprocess_all(card, test_files)
    calib = preprocess_all(card, calib_files)
    labels = np.array(test_labels)
    load_start = os.getloadavg()

    builders = candidates(model_dir, work, calib)
    cores = os.cpu_count() or 1
    built: dict[str, object] = {}
    rows: dict[str, dict] = {}
    ref = None
    for name, build in builders.items():
        try:
            backend = build(cores)
            emb = embed_all(backend, x)
            built[name] = backend
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is reported, not fatal
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        if ref is None:
            ref = emb  # torch fp32 is built first
        rows[name] = quality(emb, ref, labels)
        print(f"  {name}: {rows[name]}", file=sys.stderr)
    sp = speed(built, card.image_size, args.rounds, cores)
    base = rows["torch fp32"]
    for name, row in rows.items():
        if "error" in row:
            continue
        row.update(sp[name])
        row["speedup_b8_vs_fp32"] = round(sp["torch fp32"]["b8_1thr_ms"] / row["b8_1thr_ms"], 3)
        row["kept"] = bool(row["top10_agreement"] >= KEEP_AGREEMENT
                           and abs(row["r_at_1"] - base["r_at_1"]) <= KEEP_R1_POINTS)
    kept = [n for n, r in rows.items() if r.get("kept")]
    result = {
        "bench": "backends", "cpu": cpu, "cpu_line": cpu_summary(cpu), "model": card.backbone,
        "image_size": card.image_size, "dim": card.embedding_dim, "images": len(x), "per_class": args.per_class,
        "calibration_images": len(calib), "rounds": args.rounds, "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(), "candidates": rows,
        "fastest_kept_b8": min(kept, key=lambda n: rows[n]["b8_1thr_ms"]) if kept else None,
        "fastest_kept_b1": min(kept, key=lambda n: rows[n][f"b1_{cores}thr_ms"]) if kept else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result, indent=2))
    print()
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
