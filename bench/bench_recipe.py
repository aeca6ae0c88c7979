"""Our default recipe vs pytorch-metric-learning recipes in ONE training loop, on cub100.

Same backbone (resnet18 from scratch), data, P×K sampler, epochs, optimizer, schedule and
precision for every recipe; only the loss/miner differ. The PML rows are the issue's table:
TripletMarginLoss(0.2)+BatchHardMiner, TripletMarginLoss(0.2)+TripletMarginMiner(semihard),
ContrastiveLoss(pos 0, neg 0.5) over all pairs. Reports R@1 / MAP@R on the unseen test classes
and the R@1 curve, as JSON plus a table. The default recipe was chosen on a validation split
of the train classes (bench/recipe_search.py), not on these test classes.

    python bench/bench_recipe.py --epochs 30 [--only ours pml_contrastive] [--threads 2]
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

REPO = Path(__file__).resolve().parents[1]


def pml_recipes():
    from pytorch_metric_learning import losses, miners

    return {
        "pml_triplet_batchhard": lambda: (losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()),
        "pml_triplet_semihard": lambda: (losses.TripletMarginLoss(margin=0.2),
                                         miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")),
        "pml_contrastive": lambda: (losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5), None),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/cub100"))
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/lookalike_bench_recipe")
    ap.add_argument("--out", default="artifacts/bench_recipe.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    common = {"epochs": args.epochs, "data.root": args.data, "eval_every": args.eval_every, "threads": args.threads}
    recipes = {"ours_default": None, **pml_recipes()}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name, make in recipes.items():
        if args.only and name not in args.only:
            continue
        run = Path(args.workdir) / name
        shutil.rmtree(run, ignore_errors=True)
        # PML rows: the setting — no auxiliary head, PML loss + miner in our loop
        pml_only = {"loss.aux": "none"} if make is not None else {}
        cfg = load_config(REPO / "training/configs/scratch.yaml", {**common, "out": str(run), **pml_only})
        loss_fn, miner = make() if make is not None else (None, None)
        t0 = time.time()
        res = train(cfg, progress=False, loss_fn=loss_fn, miner=miner)
        hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        results[name] = {
            "epochs": args.epochs, "seconds": time.time() - t0,
            "test_r1": res["final"]["test/recall@1"], "test_map_r": res["final"]["test/map@r"],
            "untrained_r1": res["untrained"].get("test/recall@1"),
            "curve_r1": [(h["epoch"], h["test/recall@1"]) for h in hist if "test/recall@1" in h],
            "final_mean_pairwise_cosine": hist[-1].get("train/mean_pairwise_cosine"),
            "collapse_warning": any(h.get("train/collapse_warning") for h in hist),
        }
        out_path.write_text(json.dumps(results, indent=2))
        print(json.dumps({name: results[name]}), flush=True)
    print(f"\n{'recipe':26s} {'epochs':>6s} {'R@1':>6s} {'MAP@R':>6s} {'collapse':>8s}  R@1 curve")
    for name, r in results.items():
        curve = " ".join(f"{e}:{100 * v:.1f}" for e, v in r["curve_r1"])
        print(f"{name:26s} {r['epochs']:6d} {100 * r['test_r1']:6.1f} {100 * r['test_map_r']:6.1f} "
              f"{str(r['collapse_warning']):>8s}  {curve}")


if __name__ == "__main__":
    main()
