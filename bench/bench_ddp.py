"""Training throughput of 1 process (baseline) vs N torchrun processes on the same global batch.

Each setting runs the distributed training step of ``training.distributed`` (DDP wrapping,
BatchNorm synchronised where it trains, embeddings all-gathered for the loss, loss × world
size) on random inputs: one process runs the whole P×K batch with all the cores' threads; N
processes each run 1/N of it with ``threads / N`` threads, through gloo on CPU. Settings
alternate over repeats so machine noise hits them alike. Two workloads:

* ``scratch``: resnet18 at 112 px, the whole network trains (BatchNorm synchronised).
* ``default``: the default recipe's step, EfficientNet-Lite0's last 2 stages on cached
  224-px trunk outputs (BatchNorm frozen).

Prints JSON and a table with images/s and the ratio to one process.

    python bench/bench_ddp.py [--procs 2] [--threads 2] [--batch 64] [--steps 6] [--repeats 3] [--fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = {
    "scratch": {"backbone": "resnet18", "image_size": 112, "trainable_stages": -1, "head": "linear",
                "embedding_dim": 128, "freeze_bn": False},
    "default": {"backbone": "efficientnet_lite0", "image_size": 224, "trainable_stages": 2, "head": "none",
                "embedding_dim": 1280, "freeze_bn": True},
}


def worker(args: argparse.Namespace) -> None:
    """One rank's timed steps (run by itself for 1 process, under torchrun for N); rank 0 prints
    ``{"images_per_s": ...}`` as its last line."""
    import torch
    import torch.nn.functional as F

    from models.backbones import feature_dim
    from models.card import ModelCard
    from models.net import EmbeddingNet
    from training import distributed
    from training.losses import ContrastiveLoss

    torch.set_num_threads(args.threads)
    w = WORKLOADS[args.workload]
    device = torch.device("cpu")
    with distributed.session(device):
        world, rank = distributed.world_size(), distributed.rank()
        dim = feature_dim(w["backbone"]) if w["head"] == "none" else w["embedding_dim"]
        card = ModelCard(backbone=w["backbone"], embedding_dim=dim, image_size=w["image_size"],
                         resize_size=w["image_size"], head=w["head"])
        torch.manual_seed(0)
        model = EmbeddingNet(card)
        method = "forward_raw"
        x_shape = (3, w["image_size"], w["image_size"])
        if w["trainable_stages"] >= 0:
            trunk, _ = model.split(w["trainable_stages"])
            with torch.inference_mode():
                x_shape = tuple(trunk(torch.zeros(1, *x_shape)).shape[1:])
            method = "forward_top_raw"
        model = model.to(memory_format=torch.channels_last)
        frozen = [model.backbone] if w["freeze_bn"] else ([model.trunk] if model.trunk is not None else [])
        if distributed.is_distributed():
            distributed.sync_batchnorm(model, device=device, frozen=frozen,
                                       extra_roots=[model.top] if model.top is not None else [])
        forward = distributed.wrap_ddp(model, method, None, device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        loss_fn = ContrastiveLoss(margin=0.5, distance="cosine", reduction="nonzero_mean", balance=True)
        local = args.batch // world
        g = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(local, *x_shape, generator=g).contiguous(memory_format=torch.channels_last)
        labels = (torch.arange(args.batch) // 4)[rank * local:(rank + 1) * local]
        model.train()
        if w["freeze_bn"]:
            for m in model.backbone.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                raw = forward(x)
            emb, lab = distributed.global_batch(F.normalize(raw.float(), dim=1), labels)
            loss = loss_fn(emb, lab) * distributed.loss_scale()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):  # warm-up: allocator, oneDNN kernels, DDP buckets
            step()
        distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        distributed.barrier()
        elapsed = time.perf_counter() - t0
        if distributed.is_main():
            print(json.dumps({"images_per_s": args.steps * args.batch / elapsed}))


def _run(procs: int, args: argparse.Namespace, workload: str) -> float:
    threads = max(1, args.threads // procs)
    inner = ["--worker", f"--workload={workload}", f"--threads={threads}", f"--batch={args.batch}",
             f"--steps={args.steps}"] + (["--bf16"] if args.bf16 else [])
    script = str(Path(__file__).resolve())
    if procs == 1:
        cmd = [sys.executable, script, *inner]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", script,
               *inner]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LOOKALIKE_LOG": "WARNING"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=2, help="processes of the distributed setting")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads in all (split over the processes)")
    ap.add_argument("--batch", type=int, default=64, help="global P×K batch (4 images per class)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default="scratch,default")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast (default: bf16 where the CPU has it, as "
                                                        "the trainer's amp=auto)")
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="scratch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.batch % (4 * args.procs):
        raise SystemExit(f"--batch {args.batch} must split into whole classes of 4 over {args.procs} processes")
    from models.backends import bf16_supported, cpu_info

    args.bf16 = bf16_supported() and not args.fp32
    rows = []
    for workload in args.workloads.split(","):
        runs: dict[int, list[float]] = {1: [], args.procs: []}
        for _ in range(args.repeats):
            for procs in runs:
                runs[procs].append(_run(procs, args, workload))
        base = statistics.median(runs[1])
        for procs, vals in runs.items():
            med = statistics.median(vals)
            rows.append({"workload": workload, "processes": procs, "threads_per_process": max(1, args.threads // procs),
                         "images_per_s": med, "runs": vals, "ratio_vs_1_process": med / base})
    out = {"cpu": cpu_info(), "bf16_native": bf16_supported(), "bf16": args.bf16, "global_batch": args.batch,
           "steps": args.steps, "repeats": args.repeats, "loadavg": os.getloadavg(), "results": rows}
    print(json.dumps(out, indent=2))
    print(f"\n{'workload':10s} {'procs':>5s} {'thr/proc':>8s} {'img/s':>8s} {'x 1 proc':>8s}")
    for r in rows:
        print(f"{r['workload']:10s} {r['processes']:5d} {r['threads_per_process']:8d} {r['images_per_s']:8.1f} "
              f"{r['ratio_vs_1_process']:8.2f}")


if __name__ == "__main__":
    main()
