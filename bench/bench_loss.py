"""Loss + mining: time and peak memory of lookalike's miners/losses vs pytorch-metric-learning.

For each batch size N (P x K batches, K = 4 images per class, D = 128) and each recipe, one training
step of the loss -- L2-normalise the raw (N, D) outputs, mine, compute the loss, backward -- is
timed for ours and for PML's equivalent on the same tensors, and the two loss values are asserted
equal (rtol 1e-4). Recipes:

- ``batch_hard``: ours ``BatchHardMiner`` + ``TripletLoss(0.2, reduction="nonzero_mean")``
  vs PML ``BatchHardMiner`` + ``TripletMarginLoss(0.2)`` (the issue's target: >= 1.5x at N = 1024);
- ``hard``: ours ``HardMiner`` + same loss vs PML ``TripletMarginMiner(0.2, "hard")`` + same loss;
- ``semi_hard``: ours ``SemiHardMiner(0.2)`` vs PML ``TripletMarginMiner(0.2, "semihard")``;
- ``contrastive``: every pair, ours ``ContrastiveLoss(0.5, squared=False, balance=True,
  reduction="nonzero_mean")`` vs PML ``ContrastiveLoss(pos_margin=0, neg_margin=0.5)`` (same
  definition, so the values must agree).

PML settings: default ``LpDistance(normalize_embeddings=True, p=2)``, ``AvgNonZeroReducer``,
``swap=False``, ``smooth_loss=False``; ours uses ``distance="euclidean"`` on normalised inputs.

Time: median wall time of forward+backward calls after one warm-up, ours and PML interleaved so
both see the same background load (at least ``--repeats`` pairs; fast steps are repeated until
about ``--min-time`` seconds have been spent), on ``--threads`` CPU threads (default 1).

Peak memory: torch's CPU allocator keeps no high-water mark (and tracemalloc does not see it), so
one extra call runs under ``torch.profiler`` with ``profile_memory=True``; the allocation and
free events it records (``[memory]`` events, signed byte counts) are replayed in time order and
the peak of the running sum is reported: the largest amount of tensor memory the step held at
once on top of what existed before it (the input tensor is allocated beforehand and not counted).

Usage: ``python bench/bench_loss.py [--sizes 128 256 512 1024] [--repeats 7] [--min-time 1]
[--recipes batch_hard hard semi_hard contrastive] [--threads 1] [--no-memory]``.
Prints a table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

from training.losses import ContrastiveLoss, TripletLoss  # noqa: E402
from training.miners import BatchHardMiner, HardMiner, SemiHardMiner  # noqa: E402

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MARGIN = 0.2


def recipes() -> dict[str, tuple[Step, Step]]:
    """name -> (ours, pml): each maps raw (N, D) outputs + labels to a scalar loss."""

    def ours_triplet(miner_cls: type, **miner_kw: float) -> Step:
        miner = miner_cls(**miner_kw)
        loss_fn = TripletLoss(MARGIN, reduction="nonzero_mean")

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            e = F.normalize(x, dim=1)
            return loss_fn(e, y, miner(e, y))

        return step

    def pml_triplet(miner: torch.nn.Module) -> Step:
        loss_fn = pml_losses.TripletMarginLoss(margin=MARGIN)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(x, y, miner(x, y))

        return step

    ours_contrastive = ContrastiveLoss(0.5, squared=False, balance=True, reduction="nonzero_mean")
    pml_contrastive = pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)
    return {
        "batch_hard": (ours_triplet(BatchHardMiner), pml_triplet(pml_miners.BatchHardMiner())),
        "hard": (ours_triplet(HardMiner), pml_triplet(pml_miners.TripletMarginMiner(MARGIN, "hard"))),
        "semi_hard": (
            ours_triplet(SemiHardMiner, margin=MARGIN),
            pml_triplet(pml_miners.TripletMarginMiner(MARGIN, "semihard")),
        ),
        "contrastive": (
            lambda x, y: ours_contrastive(F.normalize(x, dim=1), y),
            lambda x, y: pml_contrastive(x, y),
        ),
    }


def make_batch(n: int, dim: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P x K batch of clustered raw outputs: class centre + noise (so mining has structure)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n // k).repeat_interleave(k)
    centres = torch.randn(n // k, dim, generator=g)
    x = centres[labels] + 1.5 * torch.randn(n, dim, generator=g)
    return x, labels


def run_once(step: Step, x: torch.Tensor, y: torch.Tensor) -> float:
    """One forward + backward; returns (seconds, loss value)."""
    x = x.detach().requires_grad_()
    t0 = time.perf_counter()
    loss = step(x, y)
    loss.backward()
    return time.perf_counter() - t0, loss.item()


def time_pair(
    ours: Step, pml: Step, x: torch.Tensor, y: torch.Tensor, repeats: int, min_time: float
) -> dict[str, float]:
    """Median seconds of forward + backward for both, interleaved (ours, PML, ours, ...) so that
    both see the same background load. One warm-up each; at least ``repeats`` pairs, more for fast
    steps so that the pairs take about ``min_time`` seconds (capped at 500)."""
    t_o, v_ours = run_once(ours, x, y)
    t_p, v_pml = run_once(pml, x, y)
    pairs = min(500, max(repeats, math.ceil(min_time / max(t_o + t_p, 1e-6))))
    t_ours, t_pml = [], []
    for _ in range(pairs):
        t_ours.append(run_once(ours, x, y)[0])
        t_pml.append(run_once(pml, x, y)[0])
    return {
        "ours_s": statistics.median(t_ours),
        "pml_s": statistics.median(t_pml),
        "loss_ours": v_ours,
        "loss_pml": v_pml,
        "repeats": pairs,
    }


def peak_bytes(step: Step, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak of live torch CPU allocations during one forward + backward (see module docstring)."""
    x = x.detach().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x, y).backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=7, help="minimum timed repeats per recipe and size")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed repeats to aim for (fast steps)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="images per class (P = N / K)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipes", nargs="+", default=list(recipes()), choices=list(recipes()))
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler memory pass")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    steps = recipes()
    load_start = os.getloadavg()
    rows = []
    for n in args.sizes:
        x, y = make_batch(n, args.dim, args.k, seed=n)
        for name in args.recipes:
            ours, pml = steps[name]
            t = time_pair(ours, pml, x, y, args.repeats, args.min_time)
            row = {
                "recipe": name,
                "batch": n,
                "ours_ms": 1e3 * t["ours_s"],
                "pml_ms": 1e3 * t["pml_s"],
                "speedup": t["pml_s"] / t["ours_s"],
                "loss_ours": t["loss_ours"],
                "loss_pml": t["loss_pml"],
                "loss_equal": abs(t["loss_ours"] - t["loss_pml"]) <= 1e-4 * max(1.0, abs(t["loss_pml"])),
                "repeats": t["repeats"],
            }
            if not args.no_memory:
                row["ours_peak_mib"] = peak_bytes(ours, x, y) / 2**20
                row["pml_peak_mib"] = peak_bytes(pml, x, y) / 2**20
                row["memory_ratio"] = row["pml_peak_mib"] / max(row["ours_peak_mib"], 1e-9)
            rows.append(row)
            print(_format_row(row), flush=True)

    target = next((r for r in rows if r["recipe"] == "batch_hard" and r["batch"] == 1024), None)
    target_met = None if target is None else bool(target["speedup"] >= 1.5 and target["loss_equal"])
    if target is not None:
        print(f"target (batch_hard, N=1024, >= 1.5x PML, equal loss): {'met' if target_met else 'NOT met'}"
              f" ({target['speedup']:.2f}x)")
    print(json.dumps({
        "benchmark": "loss_and_mining_forward_backward",
        "device": "cpu",
        "threads": args.threads,
        "dim": args.dim,
        "k_per_class": args.k,
        "min_repeats": args.repeats,
        "min_time_s": args.min_time,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "torch": torch.__version__,
        "target_batch_hard_1024_speedup_ge_1.5": target_met,
        "results": rows,
    }))
    bad = [r for r in rows if not r["loss_equal"]]
    if bad:
        print(f"loss values differ in {len(bad)} rows", file=sys.stderr)
        return 1
    return 0


_HEADER_PRINTED = False


def _format_row(row: dict) -> str:
    global _HEADER_PRINTED
    line = (
        f"{row['recipe']:<12} {row['batch']:>5} {row['ours_ms']:>10.2f} {row['pml_ms']:>10.2f} "
        f"{row['speedup']:>8.2f}x {row['loss_ours']:>10.5f} {row['loss_pml']:>10.5f} "
        f"{'yes' if row['loss_equal'] else 'NO':>5}"
    )
    if "ours_peak_mib" in row:
        line += f" {row['ours_peak_mib']:>9.1f} {row['pml_peak_mib']:>9.1f} {row['memory_ratio']:>7.1f}x"
    if not _HEADER_PRINTED:
        _HEADER_PRINTED = True
        header = (
            f"{'recipe':<12} {'N':>5} {'ours ms':>10} {'PML ms':>10} {'speedup':>9} {'loss ours':>10} "
            f"{'loss PML':>10} {'equal':>5}"
        )
        if "ours_peak_mib" in row:
            header += f" {'ours MiB':>9} {'PML MiB':>9} {'mem':>8}"
        line = header + "\n" + line
    return line


if __name__ == "__main__":
    raise SystemExit(main())
