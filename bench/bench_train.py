"""Training images/s, resnet18: fp32 eager (baseline) vs channels_last, bf16 autocast, both.

Each setting runs the same forward + loss + backward + Adam step on the same batch; settings
are interleaved round-robin over repeats so machine noise hits all of them alike. The
"correct" check: bf16 embeddings agree with fp32 ones (min cosine over the batch) and the
loss matches within a tolerance. Prints JSON and a table with ratios to the baseline.

    python bench/bench_train.py --image-size 112 --batch 64 --repeats 5 [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from models.card import ModelCard
from models.net import EmbeddingNet
from training.losses import ContrastiveLoss

SETTINGS = {
    "fp32_eager": {"channels_last": False, "bf16": False},
    "channels_last": {"channels_last": True, "bf16": False},
    "bf16": {"channels_last": False, "bf16": True},
    "channels_last+bf16": {"channels_last": True, "bf16": True},
}


def step_fn(model, opt, x, y, loss_fn, *, channels_last: bool, bf16: bool):
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        raw = model.forward_raw(x)
    emb = F.normalize(raw.float(), dim=1)
    loss = loss_fn(emb, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), emb.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    card = ModelCard(backbone="resnet18", embedding_dim=128, image_size=args.image_size, resize_size=args.image_size)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.arange(args.batch) // 4
    loss_fn = ContrastiveLoss(margin=0.5, distance="cosine", reduction="nonzero_mean", balance=True)
    models, opts = {}, {}
    for name, s in SETTINGS.items():
        torch.manual_seed(0)
        m = EmbeddingNet(card).train()
        if s["channels_last"]:
            m = m.to(memory_format=torch.channels_last)
        models[name], opts[name] = m, torch.optim.Adam(m.parameters(), 1e-4)
    # correctness: first-step loss and embeddings of each setting vs fp32 (same initial weights)
    first = {}
    for name, s in SETTINGS.items():
        first[name] = step_fn(models[name], opts[name], x, y, loss_fn, **s)
    ref_loss, ref_emb = first["fp32_eager"]
    times: dict[str, list[float]] = {n: [] for n in SETTINGS}
    for _ in range(args.repeats):
        for name, s in SETTINGS.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step_fn(models[name], opts[name], x, y, loss_fn, **s)
            times[name].append(args.steps * args.batch / (time.perf_counter() - t0))
    base = statistics.median(times["fp32_eager"])
    rows = []
    for name in SETTINGS:
        loss, emb = first[name]
        rows.append({
            "setting": name, "images_per_s": statistics.median(times[name]),
            "speedup_vs_fp32_eager": statistics.median(times[name]) / base,
            "first_step_loss": loss, "loss_rel_diff_vs_fp32": abs(loss - ref_loss) / max(1e-12, abs(ref_loss)),
            "min_cosine_emb_vs_fp32": float((emb * ref_emb).sum(1).min()),
        })
    out = {"bench": "train_throughput", "backbone": "resnet18", "image_size": args.image_size, "batch": args.batch,
           "threads": torch.get_num_threads(), "repeats": args.repeats, "results": rows}
    print(json.dumps(out, indent=2))
    print(f"\n{'setting':20s} {'img/s':>8s} {'x fp32':>7s} {'loss Δrel':>10s} {'min cos vs fp32':>16s}")
    for r in rows:
        print(f"{r['setting']:20s} {r['images_per_s']:8.1f} {r['speedup_vs_fp32_eager']:7.2f} "
              f"{r['loss_rel_diff_vs_fp32']:10.2e} {r['min_cosine_emb_vs_fp32']:16.4f}")


if __name__ == "__main__":
    main()
