"""``lookalike index {build,add,remove,info,search,checkpoint,snapshot,restore,feedback,train-quantizer,merge}``. Import-light: heavy imports
happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import sys


def _float01(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _bytes(s: str) -> int:
    from index.ann import parse_bytes

    try:
        return parse_bytes(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-ram", type=_bytes, default=None, metavar="SIZE",
                   help="RAM the FAISS index may take, e.g. 8G: 'auto' picks IVF-PQ (compressed codes) above it")
    p.add_argument("--on-disk", action="store_true",
                   help="read-only opens (replicas) memory-map the IVF lists: processes on one host share them")


def _add_ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels-from-folders", action="store_true",
                   help="ImageFolder layout: an image's label is its parent folder name")
    p.add_argument("--classes", metavar="FILE",
                   help="index only the first-level subfolders named in FILE (one per line)")
    p.add_argument("--batch-size", type=int, default=64, help="images per embedding batch / commit (default 64)")
    p.add_argument("--workers", type=int, default=None, help="decode worker processes (default: CPUs, max 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while embedding (default: CPUs - 1, unless OMP_NUM_THREADS is set)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx", "openvino"), default="auto",
                   help="inference runtime; auto (default): the fastest on this CPU, measured once per model "
                        "and machine (saved as backend.json beside the model; torch when it is the only one)")
    bf = p.add_mutually_exclusive_group()
    bf.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="force bf16 autocast")
    bf.add_argument("--no-bf16", dest="bf16", action="store_false", help="force fp32")
    p.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log", metavar="FILE", help="failure log (default INDEX/logs/ingest-*.log)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "index", help="build, grow and query a FAISS index of image embeddings",
        description="Persistent FAISS index of image embeddings (cosine similarity).\nJobs are resumable: re-run "
                    "one after an interruption and every image is indexed once.\nRun 'lookalike index ACTION --help' for an action's options.",
        epilog="examples:\n"
               "  lookalike index build --model runs/demo --images photos/ --out my-index --labels-from-folders\n"
               "  lookalike index add my-index --images photos/more/\n"
               "  lookalike index search my-index query.jpg -k 10\n"
               "  lookalike index info my-index\n"
               "  lookalike index snapshot my-index backup.tar",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    b = sub.add_parser("build", help="create an index from a folder of images (re-run resumes it)")
    b.add_argument("--model", required=True, help="model or training run directory")
    b.add_argument("--images", required=True, help="folder of images (recursive); becomes the images root")
    b.add_argument("--out", required=True, help="index directory to create")
    b.add_argument("--factory", default="auto", help="'auto' (default), 'Flat', or an IVF factory e.g. IVF1024,Flat")
    b.add_argument("--recall-target", type=_float01, default=0.95, help="recall@10 target for ANN tuning")
    _add_budget_args(b)
    b.add_argument("--shard", metavar="i/N", help="index only shard i of N (by a stable hash of each path) into "
                   "OUT/shard-iii-of-NNN; under torchrun the default is RANK/WORLD_SIZE")
    b.add_argument("--trained-from", metavar="FILE", help="start from this trained empty IVF index "
                   "(`lookalike index train-quantizer`), so shards can be merged list by list")
    _add_ingest_args(b)
    b.set_defaults(func=cmd_build)

    tq = sub.add_parser("train-quantizer", help="train the IVF (coarse quantizer, PQ) once for a sharded build",
                        description="Embed a seeded sample of the images and train an empty IVF index on it, "
                                    "for every shard of `index build --shard i/N --trained-from FILE`.")
    tq.add_argument("--model", required=True, help="model or training run directory")
    tq.add_argument("--images", required=True, help="the whole folder of images the shards will index")
    tq.add_argument("--out", required=True, help="file to write (a FILE.json beside it describes it)")
    tq.add_argument("--factory", default="auto", help="'auto' (from the image count and --max-ram) or an IVF factory")
    tq.add_argument("--sample", type=int, default=None,
                    help="images to train on (default: 40 per list, at least 10,000, at most all)")
    tq.add_argument("--max-ram", type=_bytes, default=None, metavar="SIZE", help="as for build")
    _add_ingest_args(tq)
    tq.set_defaults(func=cmd_train_quantizer)

    mg = sub.add_parser("merge", help="merge the shards of a sharded build into one index",
                        description="Merge finished shard directories (from `index build --shard i/N`) into one "
                                    "new index: Flat by concatenation, IVF list by list (FAISS merge_from). "
                                    "Refuses shards of different builds, models or N, naming the mismatch.")
    mg.add_argument("shards", nargs="+", help="shard directories (OUT/shard-*-of-NNN)")
    mg.add_argument("--out", required=True, help="index directory to create")
    mg.add_argument("--on-disk", action="store_true", default=None, help="as for build (default: as the shards)")
    mg.set_defaults(func=cmd_merge)

    a = sub.add_parser("add", help="index the new or changed images under a folder of the images root")
    a.add_argument("index", help="index directory")
    a.add_argument("--images", help="folder under the images root (default: the images root)")
    a.add_argument("--model", help="model directory (default: the one the index was built with)")
    _add_ingest_args(a)
    a.set_defaults(func=cmd_add)

    r = sub.add_parser("remove", help="remove images by id or by path")
    r.add_argument("index", help="index directory")
    r.add_argument("ids", nargs="*", type=int, help="ids to remove")
    r.add_argument("--path", action="append", default=[], help="relative path (folder images) to remove")
    r.set_defaults(func=cmd_remove)

    i = sub.add_parser("info", help="describe an index (size, factory, measured recall, model)")
    i.add_argument("index", help="index directory")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("search", help="rank indexed images by similarity to an image")
    s.add_argument("index", help="index directory")
    s.add_argument("image", help="query image file")
    s.add_argument("-k", type=int, default=10, help="results (default 10)")
    s.add_argument("--model", help="model directory (default: the one the index was built with)")
    s.add_argument("--backend", choices=("auto", "torch", "onnx", "openvino"), default="auto",
                   help="inference runtime; auto (default): the one that answers a single query soonest on this "
                        "CPU (import + start-up + one image) by the measurement `lookalike export` saved beside "
                        "the model, or without one ONNX Runtime / OpenVINO when the model has model.onnx "
                        "(torch's import alone costs seconds)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_search)

    c = sub.add_parser("checkpoint", help="publish the current state as a new generation")
    c.add_argument("index", help="index directory")
    c.set_defaults(func=cmd_checkpoint)

    sn = sub.add_parser("snapshot", help="back up an index into one .tar (consistent while a server writes)",
                        description="Write a consistent snapshot of INDEX to OUT (a tar file). Safe while a "
                                    "server or a batch job writes: every write acknowledged before the snapshot "
                                    "began is in it. Restore it with `lookalike index restore OUT DIR`.")
    sn.add_argument("index", help="index directory")
    sn.add_argument("out", help="tar file to write (must not exist)")
    sn.set_defaults(func=cmd_snapshot)

    rs = sub.add_parser("restore", help="restore a snapshot into a new index directory",
                        description="Extract and verify a snapshot made by `lookalike index snapshot` into a "
                                    "new directory, then open it (FAISS is replayed or rebuilt from the stored "
                                    "vectors; nothing is re-embedded).")
    rs.add_argument("snapshot", help="tar file made by `lookalike index snapshot`")
    rs.add_argument("out", help="index directory to create (must not exist, or be empty)")
    rs.set_defaults(func=cmd_restore)

    fb = sub.add_parser("feedback", help="list the relevance feedback marked on search results",
                        description="List the right/wrong marks users gave search results (POST /v1/feedback, "
                                    "the search page): counts by verdict, then each mark. By default only the "
                                    "latest mark of each (query, result) pair, which is what "
                                    "`lookalike train --feedback INDEX` uses. Safe while a server writes.")
    fb.add_argument("index", help="index directory")
    fb.add_argument("--all", action="store_true", help="every mark, also those a later one superseded")
    fb.add_argument("--images-root", help="where the indexed folder's images are, if not where it was built")
    fb.add_argument("--json", action="store_true", help="print JSON")
    fb.set_defaults(func=cmd_feedback)


def _read_classes(path: str | None) -> list[str] | None:
    from models.io import read_class_list

    return None if path is None else read_class_list(path)


def _ingest(store, model: str, images: str, args, shard: tuple[int, int] | None = None) -> int:
    from index.ingest import Embedder, index_folder

    embedder = Embedder.load(model, backend=args.backend, bf16=args.bf16)
    report = index_folder(store, embedder, images, labels_from_folders=args.labels_from_folders,
                          include=_read_classes(args.classes), batch_size=args.batch_size, workers=args.workers,
                          draft=not args.no_draft, progress=not args.no_progress, threads=args.threads,
                          log_path=args.log, shard=shard)
    if report.seen == 0:
        raise ValueError(f"{images}: no image files found (JPEG, PNG, WebP, GIF, ...); nothing was indexed")
    print(report.summary())
    for rel, code, reason in report.failures[:20]:
        print(f"  failed: {rel}: {reason} ({code})")
    if len(report.failures) > 20:
        print(f"  ... {len(report.failures) - 20} more in {report.log_path}")
    info = store.info()
    print(f"index {store.directory}: {info['ntotal']} images, {info['factory']}, generation {info['generation']}, "
          f"recall@10 {info['recall_at_10']:.3f}")
    return 0


def cmd_build(args) -> int:
    from pathlib import Path

    from models import load_card

    from index.ingest import IMAGE_SUFFIXES
    from index.shards import parse_shard, shard_dir, shard_from_env
    from index.store import STORE_FILE, IndexStore

    card = load_card(args.model)
    images = Path(args.images)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such image folder")
    shard = parse_shard(args.shard) if args.shard else shard_from_env()
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.rglob("*") if not p.name.startswith(".")):
        raise ValueError(f"{images}: no image files found (JPEG, PNG, WebP, GIF, ...); nothing to index")
    out = Path(args.out)
    if shard is not None:
        out = shard_dir(out, shard)
        print(f"shard {shard[0]}/{shard[1]}" + ("" if args.shard else " (from torchrun's RANK/WORLD_SIZE)")
              + f" -> {out}")
    if (out / STORE_FILE).is_file():
        store = IndexStore.open(out, card=card, writable=True)
        if store.images_root is None or store.images_root != images.resolve():
            store.close()
            raise ValueError(f"{out}: an index over {store.images_root} already exists here; "
                             f"use `lookalike index add {out} --images DIR` or another --out")
        print(f"{out}: index exists; resuming / adding new images")
    else:
        extra = None if shard is None else {"shard": {"index": shard[0], "count": shard[1],
                                                       "labels_from_folders": bool(args.labels_from_folders)}}
        store = IndexStore.create(out, card=card, images_root=images, factory=args.factory,
                                  recall_target=args.recall_target, model_dir=args.model, max_ram=args.max_ram,
                                  on_disk=args.on_disk, trained_from=args.trained_from, extra=extra)
    try:
        return _ingest(store, args.model, str(images), args, shard=shard)
    finally:
        store.close()


def cmd_train_quantizer(args) -> int:
    from pathlib import Path

    from index import ann
    from index.ingest import Embedder, embed_files, walk_images
    from index.shards import sample_rows, train_quantizer

    embedder = Embedder.load(args.model, backend=args.backend, bf16=args.bf16)
    images = Path(args.images)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such image folder")
    include = _read_classes(args.classes)
    files, _ignored = walk_images(images, include=include)
    dim = embedder.card.embedding_dim
    factory = ann.choose_factory(ann.normalize_factory(args.factory), len(files), dim, max_ram=args.max_ram)
    nlist = ann.nlist_of(ann.empty_index(factory, dim))
    if nlist is None:
        raise ValueError(f"at {len(files)} images of dimension {dim} the factory is {factory}: shards of an exact "
                         "index need no trained index; build them without --trained-from")
    size = args.sample or max(40 * nlist, 10_000)
    rows = sample_rows(len(files), size)
    chosen = [files[i] for i in rows]
    rels, vecs = embed_files(embedder, chosen, [f.relative_to(images).as_posix() for f in chosen],
                             batch_size=args.batch_size, workers=args.workers, draft=not args.no_draft)
    meta = train_quantizer(vecs, factory, args.out, fingerprint=embedder.card.fingerprint, n_planned=len(files))
    print(f"trained {factory} on {meta['sample']} of {len(files)} images in {meta['train_seconds']:.1f}s -> {args.out}")
    return 0


def cmd_merge(args) -> int:
    from index.shards import merge

    print(merge(args.shards, args.out, on_disk=args.on_disk).summary())
    return 0


def _model_for(store, model: str | None) -> str:
    if model:
        return model
    if store.model_dir is None:
        raise ValueError(f"{store.directory}: the index does not record its model; pass --model")
    return str(store.model_dir)


def cmd_add(args) -> int:
    from models import load_card

    from index.store import IndexStore

    store = IndexStore.open(args.index, writable=True)
    try:
        model = _model_for(store, args.model)
        store.check_model(load_card(model))
        return _ingest(store, model, args.images or str(store.images_root), args)
    finally:
        store.close()


def cmd_remove(args) -> int:
    from index.store import IndexStore

    if not args.ids and not args.path:
        raise ValueError("give ids and/or --path to remove")
    with IndexStore.open(args.index, writable=True) as store:
        ids = list(args.ids)
        for p in args.path:
            rec = store.get_by_path(p)
            if rec is None:
                print(f"  not indexed: {p}", file=sys.stderr)
            else:
                ids.append(rec.id)
        n = store.remove(ids)
        gen = store.checkpoint()
        print(f"removed {n} of {len(ids)} requested; {len(store)} images remain (generation {gen})")
    return 0


def cmd_info(args) -> int:
    from index.store import IndexStore

    with IndexStore.open(args.index) as store:
        info = store.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "refused_generations":
            v = "none" if not v else "\n" + "\n".join(f"{'':{width + 2}}{x}" for x in v)
        elif k == "recall_at_10":
            v = f"{v:.4f}" + (" (exact search)" if info["factory"] == "Flat" else
                              f" measured on {info['recall_measured_on']['queries']} held-out queries")
        elif k == "early_ann" and v:
            v = (f"{v['factory']} at {v['n']} vectors: recall@10 {v['recall_at_10']:.4f} probing {v['nprobe']} of "
                 f"{v['nlist']} lists -> " + ("kept (ANN below the exact bound)" if v["kept"] else "stayed exact"))
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_search(args) -> int:
    from pathlib import Path

    from models.backends import load_backend

    from index.store import IndexStore

    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    with IndexStore.open(args.index) as store:
        model = _model_for(store, args.model)
        name = args.backend
        if name == "auto":
            from models.backend_choice import choose_backend

            name = choose_backend(model, measure=False, include_startup=True)
        backend = load_backend(model, name)
        store.check_model(backend.card)
        # bytes -> model input exactly as the batch job and the service decode (JPEG draft included),
        # so an indexed image finds itself at 1.0
        q = backend.embed_array(backend.preprocess.load(Path(args.image), source=str(args.image))[None])
        hits = store.search(q, args.k)[0]
        root = store.images_root
    if args.json:
        print(json.dumps([{"rank": r + 1, "id": h.id, "score": h.score, "path": h.path, "label": h.label}
                          for r, h in enumerate(hits)], indent=2))
        return 0
    print(f"{'rank':>4}  {'score':>7}  {'id':>8}  path")
    for r, h in enumerate(hits, 1):
        label = f"  [{h.label}]" if h.label else ""
        print(f"{r:>4}  {h.score:7.4f}  {h.id:>8}  {h.path}{label}")
    if root:
        print(f"(folder paths are relative to {root})")
    return 0


def cmd_checkpoint(args) -> int:
    from index.store import IndexStore

    with IndexStore.open(args.index, writable=True) as store:
        gen = store.checkpoint()
        info = store.info()
    print(f"published generation {gen}: {info['ntotal']} images, {info['factory']}, recall@10 {info['recall_at_10']:.3f}")
    return 0


def cmd_snapshot(args) -> int:
    from index.snapshot import snapshot

    print(snapshot(args.index, args.out).summary())
    return 0


def cmd_restore(args) -> int:
    from index.snapshot import restore

    info = restore(args.snapshot, args.out)
    print(f"restored {args.out}: {info['ntotal']} images, {info['factory']}, generation {info['generation']}")
    return 0


def cmd_feedback(args) -> int:
    from collections import Counter

    from index.feedback import VERDICTS, read_feedback

    records = read_feedback(args.index, images_root=args.images_root, latest=not args.all)
    counts = Counter(r.verdict for r in records)
    if args.json:
        print(json.dumps({
            "counts": {v: counts.get(v, 0) for v in VERDICTS},
            "records": [{"id": r.id, "verdict": r.verdict, "query_id": r.query_id, "query_label": r.query_label,
                         "query_image": str(r.query_image), "result_id": r.result_id,
                         "result_label": r.result_label, "result_image": str(r.result_image)} for r in records],
        }, indent=2))
        return 0
    which = "marks" if args.all else "marks (latest per query/result pair)"
    print(f"{len(records)} {which}: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS))
    if not records:
        return 0
    print(f"{'id':>6}  {'verdict':<7}  {'query':<32}  result")

    def show(image_id, label, path) -> str:
        who = f"#{image_id}" if image_id is not None else "upload"
        return f"{who} [{label}]" if label else f"{who} {path.name}"

    for r in records:
        print(f"{r.id:>6}  {r.verdict:<7}  {show(r.query_id, r.query_label, r.query_image):<32}  "
              f"{show(r.result_id, r.result_label, r.result_image)}")
    return 0
