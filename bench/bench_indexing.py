"""Indexing throughput on cub100: a naive loop vs lookalike's batch job, plus bf16 vs fp32 rankings.

Baseline measured in the same run (same images, same model, same machine):

* naive: for each file, ``PIL.Image.open(path).convert("RGB")`` at full size, the card's
  preprocessing, one fp32 eager forward of batch 1 under ``torch.no_grad`` (no channels_last).
* lookalike job: :func:`index.ingest.index_folder` end to end (walk, read + sha256 + safe decode
  with JPEG draft + preprocess in DataLoader workers, batched embedding under inference_mode with
  channels_last and bf16 autocast where the CPU supports it, durable SQLite commits, a published
  FAISS generation). Run twice: bf16 (the default where supported) and fp32.

Two rates per pipeline: wall images/s (what a user sees under the machine's current load) and
images per CPU-second (process + worker CPU time: efficiency, independent of other jobs on the
shared cores). The load average is printed with the results.

Decode share: naive = PIL open+decode time / total; job = the workers' read + sha256 + decode +
preprocess time / (that + their embedding time) (decode and embedding run in the same worker
processes, one batch after another).

bf16 vs fp32: every indexed image is a query against the others (itself excluded); recall@10 of
the bf16 top-10 against the fp32 top-10, and the cosine between each image's two embeddings.

    python bench/bench_indexing.py                     # 1024 test-class images (~2 min on 2 cores)
    python bench/bench_indexing.py --limit 128         # quick
    python bench/bench_indexing.py --model runs/X      # a trained model (default: seeded, untrained
                                                       # resnet18, D=128, 112 px: training's defaults)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cub100_path() -> Path:
    return Path(os.environ.get("LOOKALIKE_CUB100", REPO.parent / "shared" / "data" / "cub100"))


def pick_images(root: Path, limit: int) -> list[Path]:
    classes = [c.strip() for c in (root / "splits" / "cub_test_classes.txt").read_text().splitlines() if c.strip()]
    files = sorted(p for c in classes for p in (root / "images" / c).iterdir() if p.suffix.lower() == ".jpg")
    if limit and limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def naive(model_dir: Path, files: list[Path]) -> dict:
    import torch
    from PIL import Image

    from models import load_model
    from models.preprocess import Preprocess

    model = load_model(model_dir).eval()
    pre = Preprocess(model.card)

    def one(p: Path) -> tuple[float, float]:
        t0 = time.perf_counter()
        img = Image.open(p).convert("RGB")
        t1 = time.perf_counter()
        x = torch.from_numpy(pre(img))[None]
        with torch.no_grad():
            model(x)
        return t1 - t0, time.perf_counter() - t0

    for p in files[:5]:  # warm-up
        one(p)
    dec = tot = 0.0
    cpu0 = time.process_time()
    for p in files:
        d, t = one(p)
        dec += d
        tot += t
    cpu = time.process_time() - cpu0
    return {"images": len(files), "seconds": round(tot, 2), "images_per_s": round(len(files) / tot, 1),
            "cpu_seconds": round(cpu, 2), "images_per_cpu_s": round(len(files) / cpu, 1),
            "decode_share": round(dec / tot, 3)}


def _cpu() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def job(model_dir: Path, images: Path, out: Path, *, bf16: bool | None, backend: str, workers: int,
        batch_size: int, threads: int) -> tuple[dict, dict[str, np.ndarray]]:
    from index import IndexStore
    from index.ingest import Embedder, index_folder

    embedder = Embedder.load(model_dir, backend=backend, bf16=bf16)
    store = IndexStore.create(out, card=embedder.card, images_root=images)
    cpu0 = _cpu()
    rep = index_folder(store, embedder, images, batch_size=batch_size, workers=workers, progress=False,
                       threads=threads)
    cpu = _cpu() - cpu0  # the DataLoader workers have exited and been reaped: their CPU is in CHILDREN
    vecs = {}
    for p in images.rglob("*.jpg"):
        rel = p.relative_to(images).as_posix()
        rec = store.get_by_path(rel)
        vecs[rel] = store.vector(rec.id)
    store.close()
    n = rep.added
    res = {"backend": backend, "bf16": bool(getattr(embedder.backend, "bf16", False)), "images": n,
           "seconds": round(rep.seconds, 2), "images_per_s": round(n / rep.seconds, 1),
           "cpu_seconds": round(cpu, 2), "images_per_cpu_s": round(n / cpu, 1),
           "decode_share": round(rep.decode_seconds / (rep.decode_seconds + rep.embed_seconds), 3),
           "wait_share": round(rep.wait_seconds / rep.seconds, 3),
           "decode_cpu_s": round(rep.decode_seconds, 2), "embed_s": round(rep.embed_seconds, 2),
           "workers": workers, "batch_size": batch_size, "threads": threads, "failed": rep.failed}
    return res, vecs


def ranking_agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray], k: int = 10) -> dict:
    keys = sorted(a)
    A = np.stack([a[x] for x in keys])
    B = np.stack([b[x] for x in keys])
    sa, sb = A @ A.T, B @ B.T
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    ta = np.argsort(-sa, axis=1)[:, :k]
    tb = np.argsort(-sb, axis=1)[:, :k]
    rec = np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)])
    top1 = float(np.mean(ta[:, 0] == tb[:, 0]))
    cos = np.sum(A * B, axis=1)
    return {"recall_at_10": round(float(rec), 4), "top1_agreement": round(top1, 4),
            "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model/run directory (default: a seeded untrained resnet18, D=128, 112 px)")
    p.add_argument("--limit", type=int, default=1024, help="images (evenly spread over the 42 test classes)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for BOTH the naive loop and the job (default 1: the job's default on "
                        "2 CPUs; 2 threads were ~3.6x slower on this shared machine)")
    p.add_argument("--onnx", action="store_true", help="also run the job on ONNX Runtime (exports the model)")
    p.add_argument("--openvino", action="store_true", help="also run the job on OpenVINO fp32 (exports the model)")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)

    import torch

    from models import ModelCard, save_model
    from models.backends import bf16_supported, cpu_info, cpu_summary
    from models.net import EmbeddingNet

    torch.set_num_threads(args.threads)
    root = cub100_path()
    if not (root / "splits" / "cub_test_classes.txt").is_file():
        raise SystemExit(f"cub100 not found at {root} (set LOOKALIKE_CUB100)")
    files = pick_images(root, args.limit)
    with tempfile.TemporaryDirectory(prefix="bench-indexing-") as tmp:
        tmp = Path(tmp)
        if args.model:
            model_dir = Path(args.model)
        else:
            torch.manual_seed(0)
            model_dir = tmp / "model"
            save_model(EmbeddingNet(ModelCard(backbone="resnet18", embedding_dim=128, image_size=112,
                                              resize_size=128)), model_dir)
        images = tmp / "images"
        for f in files:  # the job walks a folder: link the chosen files into one
            (images / f.parent.name).mkdir(parents=True, exist_ok=True)
            try:  # the job ignores symlinks that leave the images root: hard link, else copy
                os.link(f, images / f.parent.name / f.name)
            except OSError:
                shutil.copy2(f, images / f.parent.name / f.name)
        from models import load_card

        card = load_card(model_dir)
        out = {"benchmark": "indexing", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                    "bf16_supported": bf16_supported(), "cpu": cpu_info()},
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "model": {"backbone": card.backbone, "image_size": card.image_size, "embedding_dim": card.embedding_dim,
                         "trained": bool(card.config_digest), "dir": str(args.model or "seeded untrained")},
               "images": len(files)}
        load0 = list(os.getloadavg())
        out["naive"] = naive(model_dir, files)
        out["job_bf16"], v16 = job(model_dir, images, tmp / "ix16", bf16=None, backend="torch",
                                   workers=args.workers, batch_size=args.batch_size, threads=args.threads)
        out["job_fp32"], v32 = job(model_dir, images, tmp / "ix32", bf16=False, backend="torch",
                                   workers=args.workers, batch_size=args.batch_size, threads=args.threads)
        for name in [n for n in ("onnx", "openvino") if getattr(args, n)]:
            if not (model_dir / "model.onnx").is_file():
                from models.export import export_onnx

                export_onnx(model_dir)
            out[f"job_{name}"], _ = job(model_dir, images, tmp / f"ix{name}", bf16=None, backend=name,
                                        workers=args.workers, batch_size=args.batch_size, threads=args.threads)
        out["bf16_vs_fp32"] = ranking_agreement(v32, v16)
    base = out["naive"]["images_per_s"]
    rows = [("naive (PIL full decode, fp32 eager, batch 1)", out["naive"])]
    rows += [(f"lookalike job {k[4:]} (workers {out[k]['workers']}, batch {out[k]['batch_size']})", out[k])
             for k in ("job_bf16", "job_fp32", "job_onnx", "job_openvino") if k in out]
    base_cpu = out["naive"]["images_per_cpu_s"]
    jobs = [k for k in ("job_bf16", "job_fp32", "job_onnx", "job_openvino") if k in out]
    out["speedup_vs_naive"] = {k: round(out[k]["images_per_s"] / base, 2) for k in jobs}
    out["cpu_efficiency_vs_naive"] = {k: round(out[k]["images_per_cpu_s"] / base_cpu, 2) for k in jobs}
    out["load_average"] = {"start": load0, "end": list(os.getloadavg())}
    print(json.dumps(out, indent=2))
    print()
    print(f"CPU: {cpu_summary(out['machine']['cpu'])}")
    print(f"{out['images']} cub100 test-class images, {card.backbone} at {card.image_size}px, D={card.embedding_dim}, "
          f"{os.cpu_count()} CPUs, bf16 supported: {out['machine']['bf16_supported']}")
    print(f"load average {out['load_average']['start'][0]:.1f} at start, {out['load_average']['end'][0]:.1f} at end "
          f"(other jobs share the cores: wall rates depend on it, per-CPU-second rates much less)")
    print(f"{'pipeline':<52} {'img/s':>7} {'x naive':>8} {'img/CPU-s':>10} {'x naive':>8} {'decode share':>13}")
    for name, r in rows:
        print(f"{name:<52} {r['images_per_s']:>7.1f} {r['images_per_s'] / base:>8.2f} {r['images_per_cpu_s']:>10.1f} "
              f"{r['images_per_cpu_s'] / base_cpu:>8.2f} {r['decode_share']:>13.1%}")
    a = out["bf16_vs_fp32"]
    print(f"bf16 vs fp32 rankings: recall@10 {a['recall_at_10']:.4f}, top-1 agreement {a['top1_agreement']:.4f}, "
          f"embedding cosine mean {a['cosine_mean']:.5f} (min {a['cosine_min']:.5f})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
