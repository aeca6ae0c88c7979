"""Which inference backend this CPU runs fastest, by a short measurement (not a rule of thumb).

On one CPU kind torch with bf16 autocast may win, on another ONNX Runtime or OpenVINO in fp32
(bench/bench_backends.py measures them all, with their agreement with torch fp32). The choice is
measured for a model on a machine: every available backend embeds a batch of 1 and a batch of 8
with one intra-op thread, interleaved over a few rounds, and the lowest
``b1_ms + b8_ms / 8`` (a lone query's latency plus the per-image cost of a busy server's batch)
wins. The result is saved as ``backend.json`` beside the model (``lookalike export`` writes it),
keyed by the CPU (model name, SIMD flags, ISA limits, cores), the installed runtimes and the
model's fingerprint; another machine, runtime or model measures again.

Every candidate runs in fp32: bench/bench_backends.py keeps only runtimes whose top-10 neighbours
agree >= 0.99 with torch fp32 (R@1 within 0.3 points) on the cub100 test classes, and torch's bf16
autocast (0.969) and int8 quantisation (0.66-0.71) do not. So ``auto`` choosing torch means torch
fp32 unless bf16 is asked for explicitly.

The file is a speed note, not part of the model: it is not in the fingerprint and may be
deleted at any time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from models.backends import BACKENDS, ONNX_FILE, cpu_info
from models.card import CARD_FILE

log = logging.getLogger(__name__)

CHOICE_FILE = "backend.json"
_PACKAGES = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}


def _model_dir(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    if (d / "model" / CARD_FILE).is_file():
        d = d / "model"
    if not (d / CARD_FILE).is_file():
        raise FileNotFoundError(f"{d}: not a lookalike model (no {CARD_FILE}); pass a run or model directory")
    return d


def available_backends(model_dir: str | Path) -> list[str]:
    """Backends that can run this model here: installed, and for ONNX Runtime / OpenVINO an export."""
    import importlib.util

    d = _model_dir(model_dir)
    out = []
    for name in BACKENDS:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            continue
        if name != "torch" and not (d / ONNX_FILE).is_file():
            continue
        out.append(name)
    return out


def machine_key(model_dir: str | Path) -> dict:
    """What a measurement depends on: CPU, ISA limits, runtimes installed, model fingerprint."""
    from importlib.metadata import PackageNotFoundError, version

    d = _model_dir(model_dir)
    info = cpu_info()
    runtimes = {}
    for name in available_backends(d):
        try:
            runtimes[name] = version(_PACKAGES[name])
        except PackageNotFoundError:
            runtimes[name] = "?"
    card = json.loads((d / CARD_FILE).read_text())
    return {"cpu": info["model"], "flags": info["flags"], "cores": info["cores"],
            "isa_limited_by": info.get("isa_limited_by", {}), "runtimes": runtimes,
            "fingerprint": card.get("fingerprint", "")}


def _build(d: Path, name: str):
    """Backend ``name`` on one intra-op thread (torch's count is process-wide:
    :func:`measure_backends` restores it)."""
    from models.backends import load_backend

    if name == "torch":
        import torch

        torch.set_num_threads(1)
        return load_backend(d, "torch", bf16=False)
    return load_backend(d, name, threads=1)


def import_seconds(name: str) -> float:
    """Seconds a fresh interpreter takes to import backend ``name``'s runtime (a subprocess, so
    a runtime this process already imported is still counted: what a one-shot command pays)."""
    import subprocess
    import sys

    code = f"import time; t = time.perf_counter(); import {_PACKAGES[name]}; print(time.perf_counter() - t)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
        log.warning("could not time importing %s: %s", name, exc)
        return float("nan")


def measure_backends(model_dir: str | Path, *, rounds: int = 3, names: list[str] | None = None,
                     imports: bool = True) -> dict:
    """Time every available backend on this machine.

    Returns:
        ``{name: {"import_s", "startup_s", "b1_ms", "b8_ms", "score_ms"}}``: seconds a fresh
        process takes to import its runtime, seconds to build it here, median ms per call on a
        (1, 3, S, S) and an (8, 3, S, S) float32 batch with one intra-op thread, and
        ``b1_ms + b8_ms / 8``. Rounds interleave the backends, so a change of machine load hits
        them alike. ``imports=False`` skips ``import_s`` (a fresh interpreter per runtime: torch's
        alone takes seconds), as a service start does.
    """
    d = _model_dir(model_dir)
    names = available_backends(d) if names is None else names
    backends, rows = {}, {}
    torch_threads = None  # the process's torch thread count, given back after timing on one
    if "torch" in names:
        import torch

        torch_threads = torch.get_num_threads()
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                backends[name] = _build(d, name)
            except Exception as exc:  # noqa: BLE001 - a runtime that fails here is not a candidate
                log.warning("backend %s unavailable here: %s", name, exc)
                continue
            rows[name] = {"startup_s": time.perf_counter() - t0, "b1": [], "b8": []}
        if not backends:
            raise RuntimeError(f"{d}: no inference backend could be built (tried {names})")
        size = next(iter(backends.values())).card.image_size
        rng = np.random.default_rng(0)
        cells = [("b1", rng.standard_normal((1, 3, size, size)).astype(np.float32), None, 3),
                 ("b8", rng.standard_normal((8, 3, size, size)).astype(np.float32), None, 1)]
        times = time_backends(backends, cells, rounds)
    finally:
        if torch_threads is not None:  # a later forward or training run in this process gets its cores back
            torch.set_num_threads(torch_threads)
    for name, row in rows.items():
        row.update(times[name])
    out = {}
    for name, row in rows.items():
        b1, b8 = row["b1"], row["b8"]
        out[name] = {"startup_s": round(row["startup_s"], 3), "b1_ms": round(b1, 2), "b8_ms": round(b8, 2),
                     "score_ms": round(b1 + b8 / 8, 2)}
        if imports:
            out[name]["import_s"] = round(import_seconds(name), 3)
        if name == "torch":
            out[name]["bf16"] = bool(getattr(backends[name], "bf16", False))
    return out


def time_backends(backends: dict, cells: list[tuple[str, np.ndarray, int | None, int]],
                  rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per call of each backend on each cell, rounds interleaving the backends.

    Args:
        backends: name -> :class:`~models.backends.InferenceBackend`.
        cells: (label, (N, 3, S, S) float32 batch, intra-op threads or None to leave as is, calls per round).
        rounds: timed rounds, after one untimed call per backend and cell.

    Returns:
        ``{name: {label: median ms per call}}``.
    """
    def run(b, x, threads, reps):
        if threads is not None:
            b.set_threads(threads)
        t0 = time.perf_counter()
        for _ in range(reps):
            b.embed_array(x)
        return (time.perf_counter() - t0) / reps * 1000

    for b in backends.values():
        for _, x, threads, _ in cells:
            run(b, x, threads, 1)
    times: dict[str, dict[str, list[float]]] = {n: {c[0]: [] for c in cells} for n in backends}
    for _ in range(rounds):
        for name, b in backends.items():
            for label, x, threads, reps in cells:
                times[name][label].append(run(b, x, threads, reps))
    return {n: {label: float(np.median(v)) for label, v in row.items()} for n, row in times.items()}


def read_choice(model_dir: str | Path) -> dict | None:
    """The saved measurement when it was taken on this machine for this model, else None."""
    d = _model_dir(model_dir)
    try:
        saved = json.loads((d / CHOICE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != machine_key(d):
        return None
    return saved


def measure_and_save(model_dir: str | Path, *, imports: bool = True) -> dict:
    """Measure, pick the fastest, and save ``backend.json`` beside the model (if writable)."""
    d = _model_dir(model_dir)
    t0 = time.perf_counter()
    measured = measure_backends(d, imports=imports)
    choice = min(measured, key=lambda n: measured[n]["score_ms"])
    saved = {"choice": choice, "measured": measured, "key": machine_key(d),
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "load_avg": list(os.getloadavg())}
    log.info("backend measured in %.1fs on %s: %s -> %s", time.perf_counter() - t0, saved["key"]["cpu"],
             {n: r["score_ms"] for n, r in measured.items()}, choice)
    tmp = d / (CHOICE_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(saved, indent=2))
        os.replace(tmp, d / CHOICE_FILE)
    except OSError as exc:
        log.info("could not save %s (%s); the next start measures again", d / CHOICE_FILE, exc)
    return saved


def choose_backend(model_dir: str | Path, *, measure: bool = True, include_startup: bool = False) -> str:
    """The backend ``auto`` means for this model on this machine.

    Uses the saved measurement when it matches this machine, else measures (a few seconds;
    saved for next time) when ``measure``; without one and without ``measure`` (one-shot
    commands, where a measurement would cost more than it saves) the first available of
    OpenVINO, ONNX Runtime, torch, the order of their measured start-up cost.
    ``include_startup``: rank by a fresh process's import + build time plus one batch-1 call
    (one-shot commands such as ``lookalike index search``).
    """
    d = _model_dir(model_dir)
    avail = available_backends(d)
    if not avail:
        raise RuntimeError(f"{d}: no inference runtime installed (install torch, onnxruntime or openvino)")
    if len(avail) == 1:
        return avail[0]
    saved = read_choice(d)
    if saved is None and measure:
        saved = measure_and_save(d, imports=include_startup)
    if saved is None:
        return next(n for n in ("openvino", "onnx", "torch") if n in avail)
    measured = {n: r for n, r in saved["measured"].items() if n in avail}
    if include_startup:
        if not all(isinstance(r.get("import_s"), float) and math.isfinite(r["import_s"]) for r in measured.values()):
            # measured by a service start (no import times): torch's import is the known cost
            return next(n for n in ("openvino", "onnx", "torch") if n in measured)

        def one_shot_ms(n: str) -> float:
            r = measured[n]
            return (r["startup_s"] + r["import_s"]) * 1000 + r["b1_ms"]

        return min(measured, key=one_shot_ms)
    return saved["choice"] if saved["choice"] in measured else min(measured, key=lambda n: measured[n]["score_ms"])
