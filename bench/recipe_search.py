"""Choose the default training recipe on a VALIDATION split carved from cub100's train classes.

Test classes are never looked at for the choice (they are evaluated once per run only so the
final table can show them; the ranking uses ``val/recall@1``). Each candidate trains resnet18
from scratch with the same data, sampler, epochs and optimizer; only the loss/mining differs.

    python bench/recipe_search.py --epochs 10 --out artifacts/recipe_search.json [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from training.config import load_config
from training.trainer import train

PML_CONTRASTIVE = {"loss.name": "contrastive", "loss.distance": "euclidean", "loss.margin": 0.5, "loss.squared": False,
                   "loss.balance": True, "loss.reduction": "nonzero_mean"}
CANDIDATES: dict[str, dict] = {
    # the best PML row, expressed with our losses (balance+hinge+nonzero_mean == PML ContrastiveLoss)
    "pml_contrastive": PML_CONTRASTIVE,
    "pml_contrastive+aux_softmax": PML_CONTRASTIVE | {"loss.aux": "softmax", "loss.aux_weight": 1.0},
    "seed_contrastive_cos+aux_softmax": {"loss.name": "contrastive", "loss.distance": "cosine", "loss.margin": 0.5,
                                         "loss.squared": True, "loss.balance": True, "loss.reduction": "nonzero_mean",
                                         "loss.aux": "softmax"},
    "triplet_semihard": {"loss.name": "triplet", "loss.distance": "euclidean", "loss.margin": 0.2,
                         "loss.miner": "semi_hard", "loss.reduction": "nonzero_mean"},
    "triplet_batchhard_warmup+aux": {"loss.name": "triplet", "loss.distance": "euclidean", "loss.margin": 0.2,
                                     "loss.miner": "batch_hard", "loss.miner_warmup_epochs": 2, "loss.soft": True,
                                     "loss.aux": "softmax"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out", default="artifacts/recipe_search.json")
    ap.add_argument("--workdir", default="/tmp/lookalike_recipe")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every candidate, FIELD=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from training.config import parse_override

    extra = dict(parse_override(s) for s in args.set)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name, over in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        run = Path(args.workdir) / name
        shutil.rmtree(run, ignore_errors=True)
        cfg = load_config(overrides={"epochs": args.epochs, "data.val_fraction": 0.2, "eval_every": max(1, args.epochs // 5),
                                     "out": str(run), **over, **extra})
        t0 = time.time()
        res = train(cfg, progress=False)
        hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results[name] = {"overrides": over | extra, "epochs": args.epochs, "seconds": time.time() - t0,
                         "val_r1": res["final"]["val/recall@1"], "val_map_r": res["final"]["val/map@r"],
                         "test_r1": res["final"]["test/recall@1"],
                         "curve_val_r1": [(h["epoch"], h.get("val/recall@1")) for h in hist if "val/recall@1" in h],
                         "collapse": any(h.get("train/collapse_warning") for h in hist)}
        out.write_text(json.dumps(results, indent=2))
        print(json.dumps({name: results[name]}), flush=True)
    print(f"{'candidate':40s} {'val R@1':>8s} {'val MAP@R':>9s} {'collapse':>8s}")
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["val_r1"]):
        print(f"{name:40s} {100 * r['val_r1']:8.1f} {100 * r['val_map_r']:9.1f} {str(r['collapse']):>8s}")


if __name__ == "__main__":
    main()
