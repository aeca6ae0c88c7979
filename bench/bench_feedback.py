"""Relevance feedback, simulated from validation labels: does one --feedback fine-tune fix the marks?

1. Train the default recipe (model A) on cub100's train classes minus the validation classes.
2. Index the validation classes with A; for N seeded validation queries take the top 5 (the
   query itself excluded) and mark each result right or wrong by its label, through the same
   ``add_feedback`` the REST API uses.
3. Train the same recipe with the same budget plus ``data.feedback`` = that index (model B).
4. Score A and B: the share of wrong marks still ranked above a right result
   (:func:`training.feedback.still_wrong`), and R@1 of the *other* validation queries.

Target (issue 9): the share falls by >= 50% with no loss of R@1 on the other queries.

    python bench/bench_feedback.py --budget 4m --queries 200
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from models.backends import cpu_info
from training.config import DEFAULT_CONFIG, load_config
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]


def embed_paths(model_dir: Path, paths: list[Path]) -> np.ndarray:
    import torch

    from models.io import load_model
    from training.data import ImageDataset, Split
    from training.trainer import embed_dataset

    model = load_model(model_dir)
    ds = ImageDataset(Split(list(paths), [0] * len(paths), ["x"]), model.card, train=False)
    return embed_dataset(model, ds, device=torch.device("cpu"), bf16=True)


def r1_of(emb: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> float:
    sim = emb[queries] @ emb.T
    sim[np.arange(len(queries)), queries] = -np.inf
    return float((labels[sim.argmax(1)] == labels[queries]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="4m")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/cub100"))
    ap.add_argument("--weight", type=float, default=1.0, help="loss.feedback_weight")
    ap.add_argument("--workdir", default="/tmp/lookalike_bench_feedback")
    ap.add_argument("--out", default="artifacts/bench_feedback.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from index import IndexStore
    from index.feedback import add_feedback
    from lookalike.cli import main as cli
    from lookalike.cli import wire_feedback
    from training.feedback import load_feedback_pairs, still_wrong

    wire_feedback()
    cpu = cpu_info()
    print(json.dumps({"cpu": cpu}), flush=True)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    common = {"data.root": args.data, "budget": args.budget}
    t0 = time.time()
    res_a = train(load_config(DEFAULT_CONFIG, {**common, "out": str(work / "a")}), progress=False)

    # index the validation classes with A and mark the top 5 of N queries by their labels
    root = Path(args.data) / "images"
    assert cli(["index", "build", "--model", str(work / "a"), "--images", str(root), "--classes",
                str(work / "a/splits/val_classes.txt"), "--labels-from-folders", "--out", str(work / "index"),
                "--no-progress"]) == 0
    store = IndexStore.open(work / "index", writable=True)
    try:
        recs = store.db.get_many(range(1, 10 * store.db.count() + 1))  # every indexed image (ids start at 1)
        ids = sorted(recs)
        paths = [root / recs[i].path for i in ids]
        labels = np.array([recs[i].label for i in ids])
        emb_a = embed_paths(work / "a", paths)
        rng = np.random.default_rng(0)
        queries = rng.choice(len(ids), size=min(args.queries, len(ids)), replace=False)
        sim = emb_a[queries] @ emb_a.T
        sim[np.arange(len(queries)), queries] = -np.inf
        top5 = np.argsort(-sim, axis=1)[:, :5]
        marks = {"wrong": 0, "right": 0}
        for qi, row in zip(queries, top5):
            for j in row:
                verdict = "right" if labels[j] == labels[qi] else "wrong"
                add_feedback(store, verdict=verdict, result_id=ids[j], query_id=ids[qi])
                marks[verdict] += 1
    finally:
        store.close()

    res_b = train(load_config(DEFAULT_CONFIG, {**common, "out": str(work / "b"), "data.feedback": str(work / "index"),
                                               "loss.feedback_weight": args.weight}), progress=False)
    pairs = load_feedback_pairs(work / "index")
    others = np.setdiff1d(np.arange(len(ids)), queries)
    out = {"cpu": cpu, "budget": args.budget, "queries": len(queries), "marks": marks,
           "seconds": round(time.time() - t0, 1)}
    for name in ("a", "b"):
        emb = embed_paths(work / name, paths)
        where = {p: k for k, p in enumerate(paths)}
        fb_emb = emb[[where[p] for p in pairs.images]]
        out[name] = {**still_wrong(pairs, fb_emb, gallery=emb, gallery_labels=labels),
                     "other_queries_r1": r1_of(emb, labels, others),
                     "epoch_chosen": (res_a if name == "a" else res_b)["epoch_chosen"]}
    out["share_reduction"] = 1 - out["b"]["share"] / out["a"]["share"] if out["a"]["share"] else float("nan")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out), flush=True)
    print(f"\nCPU: {cpu['model']}, native bf16: {'yes' if cpu['native_bf16'] else 'no'}; budget {args.budget} per model; "
          f"{len(queries)} validation queries, {marks['wrong']} wrong / {marks['right']} right marks")
    print(f"{'model':28s} {'wrong pairs':>11s} {'still wrong':>11s} {'share':>6s} {'R@1 other queries':>18s}")
    for name, label in (("a", "A: default recipe"), ("b", "B: + --feedback")):
        r = out[name]
        print(f"{label:28s} {r['wrong_pairs']:11d} {r['still_wrong']:11d} {100 * r['share']:5.1f}% "
              f"{100 * r['other_queries_r1']:17.1f}%")
    print(f"share of wrong marks still above a right result: -{100 * out['share_reduction']:.0f}%")


if __name__ == "__main__":
    main()
