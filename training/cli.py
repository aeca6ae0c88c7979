"""``lookalike train | eval | lr-find | export`` (registered into the single ``lookalike`` command).

Every training-config field is a flag (``--loss.margin 0.3``) and can also be given as
``--set loss.margin=0.3``; values are parsed as YAML.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fill(text: str) -> str:
    """``text`` wrapped for a help screen (RawDescriptionHelpFormatter keeps the examples' layout)."""
    import textwrap

    return textwrap.fill(text, 88)


def _command(sub: argparse._SubParsersAction, name: str, *, help: str, description: str, examples: list[str],
             usage: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help shows a wrapped description and its examples as written."""
    return sub.add_parser(name, help=help, usage=usage, description=_fill(description),
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from training.config import flat_fields, field_help

    p.add_argument("--config", help="YAML training config (default: the default recipe, training/configs/default.yaml; "
                                    "training/configs/scratch.yaml trains from random weights)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field (repeatable)")
    g = p.add_argument_group(
        "config fields",
        _fill("Each flag overrides the YAML (the default recipe's values are in training/configs/default.yaml; a field "
        "absent from the YAML takes its field default). Values are read as YAML: null means none (Python None), "
        "true/false are booleans."))
    for name, info in flat_fields().items():
        g.add_argument(f"--{name}", dest=f"cfg:{name}", default=argparse.SUPPRESS, metavar="V", help=field_help(info))


def _config_from_args(args: argparse.Namespace):
    import yaml

    from training.config import load_config, parse_override

    overrides = dict(parse_override(s) for s in args.set)
    if getattr(args, "feedback", None):
        overrides["data.feedback"] = args.feedback
    for key, val in vars(args).items():
        if key.startswith("cfg:"):
            overrides[key[4:]] = yaml.safe_load(val) if val.strip() else None
    from training.config import DEFAULT_CONFIG

    return load_config(args.config or DEFAULT_CONFIG, overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)  # validated before torch is imported
    _wire(args)
    from training import distributed
    from training.trainer import resolve_device, train

    # under torchrun (RANK, WORLD_SIZE, ... set) every process runs this; they join one group
    with distributed.session(resolve_device(cfg.device)):
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
        if not distributed.is_main():
            return 0
    print(json.dumps(result, indent=2))
    print("\n" + summary_line(result, pretrained=cfg.model.weights is not None))
    return 0


def summary_line(result: dict, *, pretrained: bool) -> str:
    """One line: test R@1 against the starting model's, what was kept, and what to try if it got worse."""
    fin, start = result["final"], result["untrained"]
    what = "zero-shot" if pretrained else "untrained"
    if "test/recall@1" not in fin:
        return f"model in {result['model']}"
    r1, r0 = 100 * fin["test/recall@1"], 100 * start.get("test/recall@1", float("nan"))
    line = (f"R@1 on held-out test classes: {r1:.1f} ({what} {r0:.1f}, {r1 - r0:+.1f}), MAP@R {100 * fin['test/map@r']:.1f}"
            f"; kept epoch {result.get('epoch_chosen')} ({result.get('selected_on')}); model in {result['model']} "
            f"({result['total_seconds'] / 60:.1f} min)")
    for warning in result.get("warnings", []):
        line += f"\nwarning: {warning}"
    line += skipped_lines(result.get("skipped_files", []))
    if r1 < r0:
        line += (f"\nwarning: training made test R@1 worse than {what}. Try a lower --optim.lr, fewer "
                 "--model.trainable_stages, --data.val_fraction 0.2 (keeps the best epoch on validation classes), "
                 "or a longer --budget")
    return line


def skipped_lines(skipped: list[list[str]], *, most: int = 10) -> str:
    """``"\nskipped N files ...: a (why), b (why)"`` naming at most ``most`` of them ("" when none)."""
    if not skipped:
        return ""
    named = ", ".join(f"{path} ({reason.removeprefix(path + ': ')})" for path, reason in skipped[:most])
    more = f", and {len(skipped) - most} more (eval.json lists them all)" if len(skipped) > most else ""
    return f"\nskipped {len(skipped)} file{'s' * (len(skipped) != 1)} that are not readable images: {named}{more}"


def _wire(args: argparse.Namespace) -> None:
    """Let training read relevance feedback from an index: the ``lookalike`` command hands over
    the reader (training does not import index) as ``args.wire_feedback``."""
    wire = getattr(args, "wire_feedback", None)
    if wire is not None:
        wire()


def _cmd_eval(args: argparse.Namespace) -> int:
    _one_process_only("eval")
    _wire(args)
    import numpy as np
    import torch

    from models.io import load_model, resolve_model_dir
    from training.config import TrainConfig, load_config
    from training.data import ImageDataset, Split, drop_unreadable, make_splits, scan_image_folder, should_cache
    from training.metrics import retrieval_metrics
    from training.report import read_history, write_report
    from training.trainer import embed_dataset, resolve_device, use_bf16

    model_dir = resolve_model_dir(args.model)
    run_dir = model_dir.parent if (model_dir.parent / "config.yaml").is_file() else None
    cfg: TrainConfig = load_config(run_dir / "config.yaml") if run_dir else load_config()
    data = cfg.data
    if args.data and not args.test_classes:
        # a folder without class lists: every class in it is evaluated
        by_class = scan_image_folder(args.data)
        names = sorted(by_class)
        split = Split([p for c in names for p in by_class[c]],
                      [i for i, c in enumerate(names) for _ in by_class[c]], names)
    else:
        # the run wrote down its held-out classes (splits/test_classes.txt): evaluate exactly those
        written = run_dir / "splits" / "test_classes.txt" if run_dir else None
        test_classes = args.test_classes or (str(written.resolve()) if written and written.is_file() else None)
        split = make_splits(args.data or data.root, train_classes=None if test_classes else data.train_classes,
                            test_classes=test_classes or data.test_classes,
                            test_fraction=data.test_fraction, seed=data.split_seed)["test"]
    split = drop_unreadable({"test": split})["test"]
    model = load_model(model_dir)
    device = resolve_device(args.device)
    bf16 = use_bf16("none" if args.fp32 else "auto", device)
    model = model.to(device).to(memory_format=torch.channels_last)
    ds = ImageDataset(split, model.card, train=False,
                      cache=should_cache(len(split), model.card, "auto", 2048))
    emb = embed_dataset(model, ds, device=device, bf16=bf16)
    labels = np.asarray(split.labels)
    metrics = retrieval_metrics(emb, labels)
    feedback = None
    if args.feedback:
        from training.feedback import load_feedback_pairs, still_wrong

        pairs = load_feedback_pairs(args.feedback)
        fb_ds = ImageDataset(Split(list(pairs.images), [0] * len(pairs.images), ["feedback"]), model.card, train=False)
        fb_emb = embed_dataset(model, fb_ds, device=device, bf16=bf16)
        feedback = still_wrong(pairs, fb_emb, gallery=emb, gallery_labels=np.asarray(split.classes)[labels])
    out = Path(args.out) if args.out else (run_dir or model_dir) / "report"
    paths = write_report(out, metrics=metrics, history=read_history(run_dir) if run_dir else [], emb=emb, labels=labels,
                         images=_LazyImages(ds), class_names=split.classes,
                         title=f"lookalike eval: {model.card.backbone} {model.card.embedding_dim}-d on {len(split.classes)} held-out classes")
    print(json.dumps({"metrics": metrics, "report_png": str(paths["png"]), "report_html": str(paths["html"]),
                      **({"feedback": feedback} if feedback is not None else {})}, indent=2))
    return 0


class _LazyImages:
    def __init__(self, ds) -> None:
        self.ds = ds

    def __getitem__(self, i):
        return self.ds.resized(int(i))


def _one_process_only(command: str) -> None:
    """Refuse to run ``command`` once per torchrun process (each would write the same files)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"lookalike {command} runs in one process; run it without torchrun "
                         "(only `lookalike train` is distributed)")


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from training.lr_find import lr_range_test

    _one_process_only("lr-find")
    cfg = _config_from_args(args)
    _wire(args)
    res = lr_range_test(cfg, lr_min=args.min_lr, lr_max=args.max_lr, steps=args.steps, out_png=args.plot)
    print(json.dumps({k: res[k] for k in ("suggested_lr", "steepest_lr", "min_loss_lr")} | {"plot": args.plot}, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from models.export import export_onnx

    out: dict = {}
    if args.pretrained:
        if args.model:
            raise ValueError("give either a MODEL directory or --pretrained BACKBONE, not both")
        if not args.out:
            raise ValueError("--pretrained needs --out DIR (where the zero-shot model is written)")
        from models.io import save_model
        from models.net import zero_shot_model

        card = save_model(zero_shot_model(args.pretrained, weights=args.weights, image_size=args.image_size), args.out)
        out.update({"model": str(args.out), "backbone": card.backbone, "embedding_dim": card.embedding_dim,
                    "image_size": card.image_size, "fingerprint": card.fingerprint})
        args.model = args.out
    elif not args.model:
        raise ValueError("lookalike export needs a MODEL directory, or --pretrained BACKBONE --out DIR")
    elif not args.onnx:
        print("lookalike export: nothing to do (pass --onnx)", file=sys.stderr)
        return 2
    if args.onnx:
        path, diff = export_onnx(args.model)
        out.update({"onnx": str(path), "max_abs_diff_vs_torch": diff})
    from models.backend_choice import available_backends, measure_and_save

    if len(available_backends(args.model)) > 1:
        # what `auto` will use on this machine (serve, index search), measured now, saved beside the model
        saved = measure_and_save(args.model)
        out.update({"auto_backend": saved["choice"],
                    "backend_score_ms": {n: r["score_ms"] for n, r in saved["measured"].items()}})
    print(json.dumps(out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub, "train", help="train an embedding model on an ImageFolder dataset",
        usage="lookalike train [--config YAML] [--section.field VALUE ...] [--out DIR] [--resume] [--feedback INDEX]",
        description="Train an embedding on a folder with one sub-folder of images per class. Classes are held out "
                    "for testing (class lists, or a seeded data.test_fraction), the run starts from the pretrained "
                    "model (epoch 0, zero-shot), keeps the best epoch on validation classes, and ends with one line: "
                    "R@1 on the held-out classes against zero-shot. Unreadable files are skipped and named.",
        examples=["lookalike train --data.root photos/ --out runs/mine                 the default recipe (8-minute budget)",
                  "lookalike train --data.root photos/ --out runs/mine --budget 30m    a longer budget",
                  "lookalike train --data.root photos/ --out runs/t --loss.name triplet --loss.miner batch_hard",
                  "lookalike train --config training/configs/scratch.yaml --data.root photos/ --out runs/s",
                  "lookalike train --out runs/mine --resume                            continue an interrupted run",
                  "lookalike train --set data.train_classes=null --data.root photos/   null means none (Python None)"])
    _add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="resume the run in --out from its last checkpoint")
    p.add_argument("--feedback", metavar="INDEX",
                   help="add the right/wrong marks users gave on INDEX's search results as hard pairs "
                        "(same as --data.feedback INDEX)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = _command(
        sub, "eval", help="retrieval metrics on held-out classes + a report (PNG/HTML)",
        description="Score a model by leave-one-out retrieval (R@K, MAP@R) on the run's held-out test classes, "
                    "or on every class of --data, and write report.png / report.html.",
        examples=["lookalike eval --model runs/mine", "lookalike eval --model models/lite0 --data photos/"])
    p.add_argument("--model", required=True, help="run or model directory")
    p.add_argument("--data", help="dataset root (default: the run's)")
    p.add_argument("--test-classes", help="file listing the classes to evaluate (default: the run's test classes)")
    p.add_argument("--out", help="report directory (default: <run>/report)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda or cuda:N")
    p.add_argument("--fp32", action="store_true", help="embed in float32 (default: bf16 where supported)")
    p.add_argument("--feedback", metavar="INDEX",
                   help="also report how many of INDEX's 'wrong' marks the model still ranks above a right result")
    p.set_defaults(func=_cmd_eval)

    p = _command(
        sub, "lr-find", help="LR range test: plot loss vs learning rate and suggest one",
        description="Raise the learning rate exponentially over --steps batches of the training config, plot the "
                    "loss against it and suggest a learning rate (then pass it as --optim.lr to train).",
        examples=["lookalike lr-find --data.root photos/ --plot lr.png"])
    _add_config_flags(p)
    p.add_argument("--plot", default="lr_find.png", help="PNG plot path")
    p.add_argument("--min-lr", type=float, default=1e-6, help="first learning rate (default 1e-6)")
    p.add_argument("--max-lr", type=float, default=1.0, help="last learning rate (default 1)")
    p.add_argument("--steps", type=int, default=100, help="batches in the sweep (default 100)")
    p.set_defaults(func=_cmd_lr_find)

    p = sub.add_parser(
        "export", help="export a model (ONNX), or write a zero-shot model from a pretrained backbone",
        description="Export a trained model to ONNX (verified against torch), or write a zero-shot model: a "
                    "pretrained backbone's pooled features as the embedding, no training and no labels needed. "
                    "Then each installed runtime (torch, ONNX Runtime, OpenVINO) is timed on this CPU for a few "
                    "seconds and the fastest is saved as backend.json beside the model: what `auto` uses here.",
        epilog="examples:\n  lookalike export --onnx runs/demo\n"
               "  lookalike export --pretrained efficientnet_lite0 --out models/lite0 --onnx\n"
               "  lookalike index build --model models/lite0 --images photos/ --out my-index",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="run or model directory")
    p.add_argument("--onnx", action="store_true", help="write model.onnx beside the weights")
    p.add_argument("--pretrained", metavar="BACKBONE",
                   help="write a zero-shot model of this backbone to --out (efficientnet_lite0 works offline)")
    p.add_argument("--weights", default="DEFAULT", help="with --pretrained: weights name or .safetensors file")
    p.add_argument("--image-size", type=int, help="with --pretrained: crop side (default: the weights' own)")
    p.add_argument("--out", help="with --pretrained: model directory to write")
    p.set_defaults(func=_cmd_export)
