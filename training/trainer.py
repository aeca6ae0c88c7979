"""The training recipe: ``train_one_epoch``, ``evaluate``, ``train(cfg)``.

Reads like torchvision's classification reference. One run directory holds the resolved
``config.yaml``, ``metrics.jsonl`` (one line per epoch), ``checkpoint/`` (resumable, no pickle),
``model/`` (card + safetensors: what index/ and service/ load) and ``eval.json``.

Collapse monitoring: every step records the mean pairwise cosine of the batch embeddings,
the fraction of active tuples and the embedding norm before normalisation. A mean cosine
above ``collapse_cosine`` means the network maps every image to nearly the same point (the
batch-hard collapse measured on cub100); it is logged as a warning with what to change.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from models.backends import bf16_supported, cpu_info
from models.card import ModelCard
from models.io import save_model
from models.net import EmbeddingNet
from training import distributed
from training.budget import plan_steps
from training.checkpoint import load_checkpoint, restore, save_checkpoint
from training.config import TrainConfig, dump_config
from training.data import (ImageDataset, PKSampler, choose_p, class_lists_present, drop_unreadable, make_splits,
                           should_cache, too_small_warning)
from training.featcache import autocast_forward, build_cache
from training.losses import build_loss
from training.metrics import retrieval_metrics
from training.miners import build_miner
from training.registry import OPTIMIZERS

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- building blocks
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def use_bf16(amp: str, device: torch.device) -> bool:
    if amp == "none":
        return False
    supported = bf16_supported() if device.type == "cpu" else torch.cuda.is_bf16_supported()
    if amp == "bf16" and not supported:
        log.warning("amp=bf16 requested but %s has no native bf16; it will be emulated (slow)", device)
        return True
    return supported


def build_optimizer(name: str, param_groups: list[dict[str, Any]], *, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """torch.optim optimizer by name."""
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd_momentum":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd_nesterov":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {list(OPTIMIZERS)}")


@dataclass
class LRSchedule:
    """Per-step LR multiplier: linear warmup from 1%, then constant / cosine / step decay.

    A callable object (not a closure) so that ``LambdaLR.state_dict()`` saves it, and the
    time-budget planner can set ``total_steps`` once throughput has been measured.
    """

    schedule: str
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    step_size: int
    gamma: float

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return 0.01 + 0.99 * step / self.warmup_steps
        if self.schedule == "cosine":
            t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if self.schedule == "step":
            return self.gamma ** (step // (self.step_size * self.steps_per_epoch))
        return 1.0


def lr_lambda_factory(*, schedule: str, total_steps: int, warmup_steps: int, steps_per_epoch: int,
                      step_size: int, gamma: float) -> LRSchedule:
    """Per-step LR multiplier: linear warmup from 1% then constant / cosine / step decay."""
    return LRSchedule(schedule, total_steps, warmup_steps, steps_per_epoch, step_size, gamma)


class AuxClassifier(nn.Module):
    """Auxiliary classification head on the (unit) embedding, for multi-task training.

    ``softmax``: normalised softmax — cosine logits against unit class weights divided by a
    temperature, cross-entropy. ``hinge``: linear logits with the multi-class hinge loss
    (``nn.MultiMarginLoss``, the seed's SVM loss).
    """

    def __init__(self, dim: int, num_classes: int, kind: str, temperature: float = 0.05) -> None:
        super().__init__()
        if kind not in ("softmax", "hinge"):
            raise ValueError(f"unknown aux head {kind!r}; allowed: ['softmax', 'hinge', 'none']")
        self.kind, self.temperature = kind, temperature
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if kind == "hinge" else None
        self.hinge = nn.MultiMarginLoss()

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """emb (N, D) float32 unit norm, labels (N,) int64 -> scalar loss."""
        if self.kind == "softmax":
            logits = F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1)) / self.temperature
            return F.cross_entropy(logits, labels)
        return self.hinge(F.linear(emb, self.weight, self.bias), labels)


@dataclass
class CollapseMonitor:
    """Tracks collapse signals per step and warns once per epoch when they trip."""

    threshold: float
    cos: list[float] = field(default_factory=list)
    active: list[float] = field(default_factory=list)
    norm: list[float] = field(default_factory=list)

    @staticmethod
    def mean_pairwise_cosine(emb: torch.Tensor) -> float:
        """Mean off-diagonal cosine of (N, D) unit embeddings, in O(N·D)."""
        n = emb.shape[0]
        s = emb.sum(0)
        return float(((s @ s) - n) / max(1, n * (n - 1)))

    def update(self, emb: torch.Tensor, raw: torch.Tensor, active_fraction: float) -> None:
        self.cos.append(self.mean_pairwise_cosine(emb.detach().float()))
        self.norm.append(float(raw.detach().float().norm(dim=1).mean()))
        self.active.append(float(active_fraction))

    def summary(self) -> dict[str, float]:
        return {
            "mean_pairwise_cosine": float(np.mean(self.cos)) if self.cos else float("nan"),
            "active_fraction": float(np.mean(self.active)) if self.active else float("nan"),
            "embedding_norm": float(np.mean(self.norm)) if self.norm else float("nan"),
        }

    def collapsed(self) -> bool:
        tail = self.cos[-max(1, len(self.cos) // 4):]
        return bool(tail) and float(np.mean(tail)) > self.threshold


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- epochs
def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in eval mode: running statistics stay fixed."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_one_epoch(model: EmbeddingNet, loader, *, loss_fn: nn.Module, miner, aux: AuxClassifier | None,
                    aux_weight: float, optimizer: torch.optim.Optimizer, scheduler, device: torch.device, bf16: bool,
                    channels_last: bool, grad_clip: float | None, monitor: CollapseMonitor, epoch: int,
                    progress: bool = True, forward=None, freeze_bn: bool = False, stop=None,
                    on_step=None, extra_loss=None) -> dict[str, float]:
    """One pass over ``loader`` (an iterable of ``(inputs, labels)``); returns mean losses,
    throughput and the collapse signals.

    ``forward`` maps a batch of inputs to (B, D) un-normalised embeddings (default
    ``model.forward_raw`` on images; ``model.forward_top_raw`` on cached trunk outputs).
    ``stop()`` returning True ends the epoch early (checked before each step); ``on_step(n)``
    is called after each step with the number of steps done in this epoch (the budget
    planner measures throughput with it). ``extra_loss()`` (e.g. relevance feedback pairs)
    is added to every step's loss and reported as ``extra_loss``.
    """
    from tqdm import tqdm

    forward = forward or model.forward_raw
    model.train()
    if freeze_bn:
        freeze_batchnorm(model.backbone)
    if aux is not None:
        aux.train()
    totals = {"loss": 0.0, "metric_loss": 0.0, "aux_loss": 0.0, "extra_loss": 0.0}
    n_steps, n_images, t0 = 0, 0, time.perf_counter()
    clip_params = [p for g in optimizer.param_groups for p in g["params"]] if grad_clip else []
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress,
               mininterval=1)
    for images, labels in bar:
        if stop is not None and stop():
            break
        labels = labels.to(device)
        raw = autocast_forward(forward, images, device=device, bf16=bf16, channels_last=channels_last).float()
        emb = F.normalize(raw, dim=1)
        # under torchrun, miners and losses see the global batch (this rank's rows keep their gradient)
        emb_all, labels_all = distributed.global_batch(emb, labels)
        tuples = miner(emb_all, labels_all) if miner is not None else None
        metric_loss = loss_fn(emb_all, labels_all, tuples)
        loss = metric_loss * distributed.loss_scale()  # DDP averages: x world size = one-process gradient
        aux_loss = torch.zeros((), device=device)
        if aux is not None:
            aux_loss = aux(emb, labels)  # a mean over this rank's rows; DDP's average makes it the global mean
            loss = loss + aux_weight * aux_loss
        if extra_loss is not None:
            extra = extra_loss()
            loss = loss + extra
            totals["extra_loss"] += float(extra.detach())
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()} at epoch {epoch + 1}, step {n_steps}: lower optim.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(clip_params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        monitor.update(emb_all, raw, getattr(loss_fn, "stats", {}).get("active_fraction", float("nan")))
        totals["loss"] += float(metric_loss.detach()) + aux_weight * float(aux_loss.detach()) + (
            float(extra.detach()) if extra_loss is not None else 0.0)
        totals["metric_loss"] += float(metric_loss.detach())
        totals["aux_loss"] += float(aux_loss.detach())
        n_steps += 1
        n_images += images.shape[0]
        if progress:
            bar.set_postfix(loss=f"{totals['loss'] / n_steps:.4f}", cos=f"{monitor.cos[-1]:.2f}")
        if on_step is not None:
            on_step(n_steps)
    bar.close()
    elapsed = time.perf_counter() - t0
    out = {k: v / max(1, n_steps) for k, v in totals.items()}
    out.update(monitor.summary())
    out = distributed.mean_over_ranks(out)  # the aux loss and embedding norm are per rank
    out["steps"] = n_steps
    out["images_per_s"] = n_images * distributed.world_size() / elapsed if elapsed > 0 else float("nan")
    out["epoch_seconds"] = elapsed
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out


class CachedBatches:
    """P×K batches of cached trunk outputs: iterates ``(B, C, h, w) float32, (B,) int64``.

    Each image of a batch comes from one of the cache's views, drawn by a generator seeded
    from the run seed and the epoch (so a resumed run sees the same stream).
    """

    def __init__(self, cache, sampler: PKSampler, seed: int) -> None:
        self.cache, self.sampler, self.seed = cache, sampler, seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.sampler.epoch)
        for idx in self.sampler:
            t = torch.as_tensor(idx, dtype=torch.int64)
            yield self.cache.batch(t, g), self.cache.labels[t]


@torch.inference_mode()
def _embed_batches(batches, forward, *, device: torch.device, bf16: bool, channels_last: bool, dim: int) -> np.ndarray:
    """Run ``forward`` over (B, ...) input batches -> (N, D) float32 unit norm."""
    out = []
    for x in batches:
        raw = autocast_forward(forward, x, device=device, bf16=bf16, channels_last=channels_last)
        out.append(F.normalize(raw.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def embed_dataset(model: EmbeddingNet, dataset: ImageDataset, *, device: torch.device, bf16: bool,
                  batch_size: int = 128, workers: int = 0, channels_last: bool = True) -> np.ndarray:
    """Embed every image of ``dataset`` (eval transform) -> (N, D) float32 unit norm."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    return _embed_batches((images for images, _ in loader), model.forward_raw, device=device, bf16=bf16,
                          channels_last=channels_last, dim=model.card.embedding_dim)


def embed_cached(model: EmbeddingNet, feats: torch.Tensor, *, device: torch.device, bf16: bool,
                 batch_size: int = 256, channels_last: bool = True) -> np.ndarray:
    """Embed cached trunk outputs ((N, C, h, w) bfloat16) -> (N, D) float32 unit norm."""
    model.eval()
    return _embed_batches((feats[i:i + batch_size] for i in range(0, feats.shape[0], batch_size)),
                          model.forward_top_raw, device=device, bf16=bf16, channels_last=channels_last,
                          dim=model.card.embedding_dim)


def evaluate(model: EmbeddingNet, dataset: ImageDataset, *, device: torch.device, bf16: bool,
             workers: int = 0, channels_last: bool = True) -> dict[str, float]:
    """Retrieval metrics of ``dataset`` against itself (leave-one-out): R@1/2/4/8, P@1, R-precision, MAP@R."""
    emb = embed_dataset(model, dataset, device=device, bf16=bf16, workers=workers, channels_last=channels_last)
    return retrieval_metrics(emb, np.asarray(dataset.split.labels))


# ----------------------------------------------------------------------------- the run
def card_from_config(cfg: TrainConfig) -> ModelCard:
    """The model card a run of ``cfg`` produces; mean/std are those the backbone's weights expect."""
    from models.backbones import backbone_defaults, feature_dim

    m = cfg.model
    pre = backbone_defaults(m.backbone)
    dim = feature_dim(m.backbone) if m.head == "none" else m.embedding_dim
    return ModelCard(
        backbone=m.backbone, embedding_dim=dim, image_size=m.image_size, resize_size=m.effective_resize,
        mean=pre["mean"], std=pre["std"], head=m.head, head_hidden=m.head_hidden, activation=m.activation,
        neck_bn=m.neck_bn, config_digest=cfg.digest(),
    )


def splits_from_config(cfg: TrainConfig, skipped: list | None = None) -> dict[str, Any]:
    """The class-disjoint train / (val) / test splits the config describes, without the files
    that are not readable images (appended to ``skipped`` as ``(path, reason)``)."""
    d = cfg.data
    lists = class_lists_present(d.root, d.train_classes, d.test_classes)
    if not lists and (d.train_classes or d.test_classes):
        log.info("%s has no class lists (%s, %s): holding out %.0f%% of the classes (seed %d); the split is written "
                 "to the run's splits/", d.root, d.train_classes, d.test_classes, 100 * d.test_fraction, d.split_seed)
    splits = make_splits(d.root, train_classes=d.train_classes if lists else None,
                         test_classes=d.test_classes if lists else None,
                         test_fraction=d.test_fraction, val_fraction=d.val_fraction, seed=d.split_seed, skipped=skipped)
    return drop_unreadable(splits, workers=max(1, d.workers), skipped=skipped)


def train_dataset(cfg: TrainConfig, split, card: ModelCard, *, cache: bool) -> ImageDataset:
    """The augmented training view of ``split`` with the config's augmentation settings."""
    return ImageDataset(split, card, train=True, cache=cache, scale_min=cfg.data.scale_min,
                        color_jitter=cfg.data.color_jitter)


def loss_from_config(cfg: TrainConfig) -> nn.Module:
    """The metric loss the config names."""
    return build_loss(cfg.loss.name, margin=cfg.loss.margin, distance=cfg.loss.distance,
                      reduction=cfg.loss.reduction, **loss_kwargs(cfg))


def aux_from_config(cfg: TrainConfig, num_classes: int, dim: int | None = None) -> AuxClassifier | None:
    """The auxiliary classification head on ``dim``-d embeddings (default ``model.embedding_dim``),
    or None when ``loss.aux`` is ``none``."""
    if cfg.loss.aux == "none":
        return None
    return AuxClassifier(dim or cfg.model.embedding_dim, num_classes, cfg.loss.aux, cfg.loss.aux_temperature)


def loss_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Loss-specific keyword arguments from the config."""
    if cfg.loss.name == "contrastive":
        return {"pos_margin": cfg.loss.pos_margin, "squared": cfg.loss.squared, "balance": cfg.loss.balance}
    return {"soft": cfg.loss.soft}


def miner_from_config(cfg: TrainConfig):
    """The miner ``loss.miner`` names (None for ``none``), with ``loss.miner_margin`` (default
    ``loss.margin``) for the margin miners."""
    margin = cfg.loss.miner_margin if cfg.loss.miner_margin is not None else cfg.loss.margin
    kwargs: dict[str, Any] = {"distance": cfg.loss.distance}
    if cfg.loss.miner in ("semi_hard", "batch_all"):
        kwargs["margin"] = margin
    return build_miner(None if cfg.loss.miner == "none" else cfg.loss.miner, **kwargs)


def param_groups(model: EmbeddingNet, aux: nn.Module | None, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: backbone at ``optim.lr``, neck/head/aux at ``lr * head_lr_mult``;
    no weight decay on biases and norms; frozen parameters left out."""
    head_params = list(model.neck.parameters()) + list(model.head.parameters()) + (list(aux.parameters()) if aux else [])
    groups: list[dict[str, Any]] = []
    for params, mult in ((list(model.backbone.parameters()), 1.0), (head_params, cfg.optim.head_lr_mult)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        lr = cfg.optim.lr * mult
        groups.append({"params": decay, "lr": lr, "weight_decay": cfg.optim.weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    trainable = [p for p in model.parameters() if p.requires_grad] + (list(aux.parameters()) if aux else [])
    assert len({id(p) for g in groups for p in g["params"]}) == len(trainable), "every parameter in exactly one group"
    return [g for g in groups if g["params"]]


def init_aux_centroids(aux: AuxClassifier, emb: np.ndarray, labels: np.ndarray) -> None:
    """Set the aux head's class weights to the class centroids of (N, D) unit embeddings.

    The normalised-softmax head then starts where the pretrained embedding already is, so
    its first gradients refine the embedding instead of dragging it towards random proxies.
    """
    w = torch.zeros_like(aux.weight)
    e = torch.as_tensor(emb, dtype=w.dtype, device=w.device)
    w.index_add_(0, torch.as_tensor(labels, dtype=torch.int64, device=w.device), e)
    with torch.no_grad():
        aux.weight.copy_(F.normalize(w, dim=1))


def _log_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, loss_fn: nn.Module | None = None, miner=None) -> dict[str, Any]:
    """Run (or resume) a training run in ``cfg.out``; returns the final evaluation and paths.

    Epoch 0 is the starting model (zero-shot for a pretrained backbone): it is evaluated
    first on the validation and test classes, so every run reports what training gained.
    With ``select_best`` and a validation split (``data.val_fraction`` > 0) the run keeps the
    epoch with the best validation R@1, epoch 0 included: training never returns a model
    worse on validation classes than the one it started from. Nothing is selected on test
    classes.

    ``model.trainable_stages >= 0`` freezes the backbone's early stages and trains the rest
    on cached trunk outputs (:mod:`training.featcache`); ``budget`` plans the number of
    steps from measured throughput (:mod:`training.budget`).

    ``stop_after`` ends this call after that many epochs (checkpoint written; ``resume=True``
    continues exactly where it stopped), for time-boxed sessions.

    ``loss_fn`` / ``miner`` replace the ones the config names (``None``: built from the config);
    any callables with the signatures ``loss_fn(emb, labels, indices_tuple)`` and
    ``miner(emb, labels) -> indices_tuple`` work, e.g. pytorch-metric-learning's, which is how
    ``bench/bench_recipe.py`` compares recipes in one loop.
    """
    t_start = time.perf_counter()
    run = Path(cfg.out)
    ckpt_dir = run / "checkpoint"
    meta: dict[str, Any] = {}
    if resume:
        tensors, meta = load_checkpoint(ckpt_dir)
        saved = TrainConfig.model_validate(meta["config"])
        if saved.digest() != cfg.digest():
            log.warning("resuming with the checkpoint's config (it differs from the one given)")
        cfg = saved
    elif (run / "metrics.jsonl").exists():
        raise FileExistsError(f"{run}: run directory already has a run; use --resume or another --out")
    distributed.barrier()  # every rank has looked at the run directory before rank 0 writes to it
    main = distributed.is_main()  # only rank 0 writes files
    budget = cfg.budget_seconds()
    if main:
        run.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = distributed.local_device(resolve_device(cfg.device))
    bf16 = use_bf16(cfg.amp, device)
    progress = progress and main

    skipped: list = []
    splits = splits_from_config(cfg, skipped)
    small = too_small_warning(len(splits["train"].classes), len(splits["train"]))
    if small and main:
        log.warning("%s", small)
    if main:
        (run / "splits").mkdir(exist_ok=True)
        for name, split in splits.items():  # the class split, for indexing/evaluating exactly the held-out classes
            (run / "splits" / f"{name}_classes.txt").write_text("\n".join(split.classes) + "\n")
    card = card_from_config(cfg)
    cached = cfg.model.trainable_stages >= 0
    n_all = sum(len(s) for s in splits.values())
    in_ram = cached or should_cache(n_all, card, cfg.data.cache_images, cfg.data.cache_budget_mb)
    log.info("classes: train %d (%d images), %stest %d (%d images); decoded images in RAM: %s; device %s, bf16 %s",
             len(splits["train"].classes), len(splits["train"]),
             f"val {len(splits['val'].classes)} ({len(splits['val'])} images), " if "val" in splits else "",
             len(splits["test"].classes), len(splits["test"]), in_ram, device, bf16)
    if cfg.select_best and "val" not in splits:
        log.info("select_best needs a validation split (data.val_fraction > 0): keeping the last epoch")

    model = EmbeddingNet(card, backbone_weights=None if resume else cfg.model.weights).to(device)
    if cached:
        model.split(cfg.model.trainable_stages)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if resume:  # the trunk's weights come from the checkpoint before any cache is computed
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    eval_names = [n for n in ("val", "test") if n in splits]
    batch_p = choose_p(cfg.data.p, splits["train"].labels, distributed.world_size())
    if cfg.data.sampler == "confusable":
        from training.confusable import ConfusablePKSampler

        sampler = ConfusablePKSampler(splits["train"].labels, batch_p, cfg.data.k,
                                      batches_per_epoch=cfg.data.batches_per_epoch, seed=cfg.seed,
                                      group=cfg.data.confusable_group,
                                      random_share=cfg.data.confusable_random_share)
    else:
        sampler = PKSampler(splits["train"].labels, batch_p, cfg.data.k,
                            batches_per_epoch=cfg.data.batches_per_epoch, seed=cfg.seed)
    if distributed.is_distributed():  # each rank takes its P/world classes of the global batch
        sampler = distributed.RankBatches(sampler)
    if cached:
        views = views_that_fit(model, card, splits, device, max_views=cfg.data.cached_views,
                               budget_mb=cfg.data.cache_budget_mb)
        base = ImageDataset(splits["train"], card, train=False, cache=in_ram)
        aug = base.view(train=True, scale_min=cfg.data.scale_min, color_jitter=cfg.data.color_jitter)
        # augmented views may use up to a third of the budget; the eval views always come first
        views_deadline = t_start + budget / 3 if budget else None
        caches = {"train": build_cache(model.trunk, base, train_view=aug, views=views, device=device,
                                       bf16=bf16, channels_last=cfg.channels_last, seed=cfg.seed,
                                       deadline=views_deadline, progress=progress, name="train")}
        # a deadline may cut the views short on one rank: all keep the fewest, so the streams agree
        views = distributed.all_reduce_min(caches["train"].views)
        caches["train"].feats = caches["train"].feats[:views]
        for name in eval_names:
            caches[name] = build_cache(model.trunk, ImageDataset(splits[name], card, train=False), device=device,
                                       bf16=bf16, channels_last=cfg.channels_last, progress=progress, name=name)
        del base, aug  # the decoded images are not needed once their trunk outputs are cached
        loader = CachedBatches(caches["train"], sampler, cfg.seed + 7919 * distributed.rank())
        forward_name = "forward_top_raw"

        def embed(name: str) -> np.ndarray:  # each rank embeds its shard; all get the whole
            n = caches[name].feats.shape[1]
            shard = distributed.shard_range(n)
            return distributed.gather_rows(
                embed_cached(model, caches[name].feats[0, shard.start:shard.stop], device=device, bf16=bf16,
                             channels_last=cfg.channels_last), n)
    else:
        train_ds = train_dataset(cfg, splits["train"], card, cache=in_ram)
        eval_sets = {name: ImageDataset(splits[name], card, train=False, cache=in_ram) for name in eval_names}
        workers = 0 if in_ram else cfg.data.workers
        loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
        forward_name = "forward_raw"

        def embed(name: str) -> np.ndarray:  # each rank embeds its shard; all get the whole
            ds = eval_sets[name] if name in eval_sets else train_ds.view(train=False)
            shard = distributed.shard_range(len(ds))
            return distributed.gather_rows(
                embed_dataset(model, Subset(ds, shard) if distributed.is_distributed() else ds, device=device,
                              bf16=bf16, channels_last=cfg.channels_last), len(ds))

    eval_seconds: dict[str, float] = {}

    def metrics_of(names: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in names:
            t0 = time.perf_counter()
            out.update({f"{n}/{k}": v for k, v in retrieval_metrics(embed(n), np.asarray(splits[n].labels)).items()})
            eval_seconds[n] = time.perf_counter() - t0
        return out

    feedback_loss = _feedback_loss(cfg, model, card, device=device, bf16=bf16, cached=cached, progress=progress)
    aux = aux_from_config(cfg, len(splits["train"].classes), card.embedding_dim)
    if aux is not None:
        aux = aux.to(device)
        if cfg.loss.aux_init == "centroids" and not resume and aux.kind == "softmax":
            init_aux_centroids(aux, embed("train"), np.asarray(splits["train"].labels))
    injected_miner = miner
    loss_fn = loss_fn if loss_fn is not None else loss_from_config(cfg)
    if cfg.loss.memory_size:
        from training.xbm import CrossBatchMemory, MemoryLoss

        loss_fn = MemoryLoss(loss_fn, CrossBatchMemory(cfg.loss.memory_size, card.embedding_dim, device),
                             warmup_steps=cfg.loss.memory_warmup_steps, miner=cfg.loss.memory_miner,
                             margin=cfg.loss.margin, pos_margin=cfg.loss.pos_margin, squared=cfg.loss.squared,
                             balance=cfg.loss.balance, reduction=cfg.loss.reduction, distance=cfg.loss.distance)
    miner = injected_miner if injected_miner is not None else miner_from_config(cfg)

    forward = _distributed_forward(model, aux, forward_name, cfg, device)
    optimizer = build_optimizer(cfg.optim.name, param_groups(model, aux, cfg), lr=cfg.optim.lr,
                                weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
    steps_per_epoch = len(sampler)
    schedule = lr_lambda_factory(
        schedule=cfg.optim.schedule, total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=int(cfg.optim.warmup_epochs * steps_per_epoch), steps_per_epoch=steps_per_epoch,
        step_size=cfg.optim.step_size, gamma=cfg.optim.gamma)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    best = {"epoch": 0, "score": None, "state": None}
    plan = meta.get("plan")
    if resume:
        start_epoch = restore(tensors, meta, model=model, aux=aux, optimizer=optimizer, scheduler=scheduler)
        history = meta.get("history", [])
        best_meta = meta.get("best") or {}
        best = {"epoch": best_meta.get("epoch", 0),
                "score": tuple(best_meta["score"]) if best_meta.get("score") is not None else None,
                "state": {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None}
        log.info("resumed %s at epoch %d", run, start_epoch + 1)
        # the metrics file mirrors the checkpoint: drop epochs that ran after it
        if main:
            (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    select = cfg.select_best and "val" in splits
    if start_epoch == 0 and not resume:
        rec = {"epoch": 0, **metrics_of(eval_names)}
        history.append(rec)
        if main:
            _log_jsonl(run / "metrics.jsonl", rec)
        log.info("epoch 0 (%s): %s", "zero-shot" if cfg.model.weights else "untrained", _fmt(rec))
        if select:
            best = {"epoch": 0, "score": _score(rec), "state": _snapshot(model)}

    # ---- the time budget: measure a few real steps, then fix the schedule's length
    probe = min(steps_per_epoch, 8)
    step_times: list[float] = []
    planned = {"done": plan is not None or budget is None}

    def on_step(n: int) -> None:
        step_times.append(time.perf_counter())
        if planned["done"] or len(step_times) < probe:
            return
        # skip the first two steps (allocator and kernel warm-up) when there are enough
        if len(step_times) >= 3:
            step_s = (step_times[-1] - step_times[1]) / (len(step_times) - 2)
        else:
            step_s = (step_times[-1] - t_run) / len(step_times)
        val_cost = (eval_seconds.get("val", 0.0) if select else 0.0) + eval_seconds.get("refresh", 0.0)
        test_cost = eval_seconds.get("test", 0.0)
        per_epoch_eval = val_cost + (test_cost / cfg.eval_every if cfg.eval_every else 0.0)
        p = plan_steps(budget_s=budget, spent_s=time.perf_counter() - t_start, step_s=step_s, eval_s=per_epoch_eval,
                       reserve_s=test_cost + 2.0, steps_per_epoch=steps_per_epoch,
                       max_epochs=cfg.epochs, done_steps=scheduler.last_epoch, min_steps=probe)
        p = distributed.broadcast_object(p)  # rank 0's clock decides, so every rank runs the same steps
        schedule.total_steps = p.total_steps
        schedule.warmup_steps = min(schedule.warmup_steps, p.total_steps // 10)
        planned["done"], planned["plan"] = True, p.as_dict()
        log.info("plan: %s", p.describe())

    total_steps = lambda: schedule.total_steps  # noqa: E731  (changes once the plan is made)
    t_run = time.perf_counter()
    epoch = start_epoch
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    while epoch < end_epoch and scheduler.last_epoch < total_steps():
        t_epoch = time.perf_counter()
        # augmentation stream reproducible across resume, its own on each rank
        torch.manual_seed(cfg.seed * 1000 + epoch + 7919 * distributed.rank())
        sampler.set_epoch(epoch)
        confused = _refresh_confusable(sampler, embed, splits["train"], cfg, eval_seconds)
        monitor = CollapseMonitor(cfg.collapse_cosine)
        active_miner = miner if epoch >= cfg.loss.miner_warmup_epochs else None
        stats = train_one_epoch(model, loader, loss_fn=loss_fn, miner=active_miner, aux=aux,
                                aux_weight=cfg.loss.aux_weight, optimizer=optimizer, scheduler=scheduler,
                                device=device, bf16=bf16, channels_last=cfg.channels_last,
                                grad_clip=cfg.optim.grad_clip, monitor=monitor, epoch=epoch, progress=progress,
                                forward=forward, freeze_bn=cfg.model.freeze_bn,
                                stop=lambda: scheduler.last_epoch >= total_steps(), on_step=on_step,
                                extra_loss=feedback_loss)
        rec = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in stats.items()}}
        if confused:
            rec["train/confused_pairs"] = confused
        if monitor.collapsed():
            rec["train/collapse_warning"] = True
            log.warning(
                "epoch %d: embeddings are collapsing (mean pairwise cosine %.3f > %.2f, active tuples %.2f): every "
                "image maps to nearly the same point. Batch-hard mining from scratch does this; use loss.miner=none "
                "or semi_hard, loss.miner_warmup_epochs, loss.aux=softmax, or a lower optim.lr.",
                epoch + 1, stats["mean_pairwise_cosine"], cfg.collapse_cosine, stats["active_fraction"])
        last = epoch + 1 == cfg.epochs or scheduler.last_epoch >= total_steps()
        names = [n for n in eval_names
                 if (n == "val" and select) or last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)]
        if names:
            rec.update(metrics_of(names))
        if select and "val/recall@1" in rec and (best["score"] is None or _score(rec) > best["score"]):
            best = {"epoch": epoch + 1, "score": _score(rec), "state": _snapshot(model)}
        history.append(rec)
        if main:
            _log_jsonl(run / "metrics.jsonl", rec)
            save_checkpoint(ckpt_dir, model=model, aux=aux, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                            config=cfg.model_dump(mode="json"), history=history,
                            extra={"plan": planned.get("plan", plan),
                                   "best": {"epoch": best["epoch"], "score": best["score"]}},
                            extra_tensors={f"best.{k}": v for k, v in (best["state"] or {}).items()})
        log.info("epoch %d (step %d/%d) %s", epoch + 1, scheduler.last_epoch, total_steps(), _fmt(rec))
        if budget and planned.get("plan") and stats["steps"]:
            _replan_if_late(schedule, scheduler.last_epoch, budget=budget, t_start=t_start,
                            epoch_seconds=time.perf_counter() - t_epoch, steps=stats["steps"],
                            reserve_s=eval_seconds.get("test", 0.0) + 2.0)
            schedule.total_steps = distributed.broadcast_object(schedule.total_steps)
        epoch += 1
    finished = not (epoch < cfg.epochs and scheduler.last_epoch < total_steps())
    if budget:
        log.info("budget %.0f s: planned %d steps, ran %d in %d epochs; %.0f s so far (final evaluation and saving "
                 "follow)", budget, total_steps(), scheduler.last_epoch, epoch, time.perf_counter() - t_start)

    final = history[-1]
    chosen = final["epoch"]
    if select and best["state"] is not None and best["epoch"] != final["epoch"]:
        model.load_state_dict(best["state"])
        chosen = best["epoch"]
        final = next(h for h in history if h["epoch"] == chosen)
        if not any(k.startswith("test/") for k in final):
            final = {**final, **metrics_of(["test"])}
        if chosen == 0:
            log.warning("training did not beat the starting model on the validation classes (val R@1 %.1f at epoch 0); "
                        "returning the starting model. Try a lower optim.lr, fewer model.trainable_stages, or a longer "
                        "budget.", 100 * best["score"][0])
        else:
            log.info("keeping epoch %d, the best on validation classes (val R@1 %.1f)", chosen, 100 * best["score"][0])
    model = model.to(memory_format=torch.contiguous_format).cpu()
    if main:
        saved_card = save_model(model, run / "model")
    fingerprint = distributed.broadcast_object(saved_card.fingerprint if main else None)
    start = history[0] if history and history[0]["epoch"] == 0 else {}
    result = {
        "run": str(run),
        "model": str(run / "model"),
        "fingerprint": fingerprint,
        "train_seconds": time.perf_counter() - t_run,
        "total_seconds": time.perf_counter() - t_start,
        "finished": finished,
        "epoch_chosen": chosen,
        "selected_on": "val/recall@1" if select else "last epoch",
        "plan": planned.get("plan", plan),
        "steps_run": scheduler.last_epoch,
        "steps_scheduled": total_steps(),
        "cpu": cpu_info() if device.type == "cpu" else {"device": str(device)},
        "processes": distributed.world_size(),
        "bf16": bf16,
        "untrained": {k: v for k, v in start.items() if k != "epoch"},
        "final": {k: v for k, v in final.items() if k.startswith(("test/", "val/"))},
        "skipped_files": [[str(p), reason] for p, reason in skipped],
        **({"warnings": [small]} if small else {}),
    }
    if main:
        (run / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    distributed.barrier()  # the run directory is complete before any rank returns
    return result


def _distributed_forward(model: EmbeddingNet, aux: nn.Module | None, method: str, cfg: TrainConfig,
                         device: torch.device):
    """The training forward ``model.<method>``: under torchrun, BatchNorm layers that train are
    synchronised and the forward is wrapped in DistributedDataParallel; else the plain method.

    BatchNorm under ``model.freeze_bn`` (the default recipe) and in a cached trunk keeps fixed
    running statistics, identical on every rank: there is nothing to synchronise, so those
    layers stay as they are (and no collective runs for them).
    """
    if not distributed.is_distributed():
        return getattr(model, method)
    frozen = [model.backbone] if cfg.model.freeze_bn else ([model.trunk] if model.trunk is not None else [])
    top = [model.top] if model.top is not None else []
    n = distributed.sync_batchnorm(model, device=device, frozen=frozen, extra_roots=top)
    log.info("distributed: %d processes; %d BatchNorm layers synchronised over the global batch%s",
             distributed.world_size(), n, " (backbone BatchNorm frozen: model.freeze_bn)" if cfg.model.freeze_bn else "")
    return distributed.wrap_ddp(model, method, aux, device)


def _feedback_loss(cfg: TrainConfig, model: EmbeddingNet, card: ModelCard, *, device: torch.device, bf16: bool,
                   cached: bool, progress: bool):
    """The relevance-feedback pair loss of ``data.feedback`` (None without it)."""
    if not cfg.data.feedback:
        return None
    from training.data import Split
    from training.feedback import FeedbackLoss, load_feedback_pairs

    pairs = load_feedback_pairs(cfg.data.feedback)
    ds = ImageDataset(Split(list(pairs.images), [0] * len(pairs.images), ["feedback"]), card, train=False,
                      cache=True)
    if cached:
        feats = build_cache(model.trunk, ds, device=device, bf16=bf16, channels_last=cfg.channels_last,
                            progress=progress, name="feedback").feats[0]

        def embed(idx: torch.Tensor) -> torch.Tensor:
            return autocast_forward(model.forward_top_raw, feats[idx], device=device, bf16=bf16,
                                    channels_last=cfg.channels_last)
    else:
        def embed(idx: torch.Tensor) -> torch.Tensor:
            return autocast_forward(model.forward_raw, torch.stack([ds[int(i)][0] for i in idx]), device=device,
                                    bf16=bf16, channels_last=cfg.channels_last)

    def embed_on_every_rank(idx: torch.Tensor) -> torch.Tensor:
        # every rank draws the same pairs: their BatchNorm statistics are already the global ones
        with distributed.local_batchnorm():
            return embed(idx)

    return FeedbackLoss(pairs, embed_on_every_rank, per_step=cfg.loss.feedback_pairs, weight=cfg.loss.feedback_weight,
                        margin=cfg.loss.margin if cfg.loss.distance == "cosine" else 0.5,
                        pos_margin=cfg.loss.pos_margin if cfg.loss.distance == "cosine" else 0.0, seed=cfg.seed)


def _replan_if_late(schedule: LRSchedule, done: int, *, budget: float, t_start: float, epoch_seconds: float,
                    steps: int, reserve_s: float) -> None:
    """Shorten the schedule when the last epoch ran slower than planned (e.g. a busy machine),
    so the run still ends within its budget. Never lengthens it."""
    per_step = epoch_seconds / steps  # training and this epoch's evaluations
    elapsed = time.perf_counter() - t_start
    if elapsed + (schedule.total_steps - done) * per_step + reserve_s <= budget * 1.02:
        return
    fit = max(0, math.floor((budget - elapsed - reserve_s) / per_step))
    new_total = max(done, min(schedule.total_steps, done + fit))
    if new_total < schedule.total_steps:
        log.info("budget: the last epoch ran at %.0f ms/step; shortening the schedule from %d to %d steps",
                 1000 * per_step, schedule.total_steps, new_total)
        schedule.total_steps = new_total


def _refresh_confusable(sampler, embed, split, cfg: TrainConfig, timings: dict[str, float]) -> list | None:
    """Re-mine the confusable-class groups from the current embedding of the training images.

    Returns the most confused training class pairs ``[[class_a, class_b, votes], ...]`` for the
    metrics log (None when the sampler is not the confusable one).
    """
    if cfg.data.sampler != "confusable":
        return None
    from training.confusable import class_neighbours, confused_pairs

    t0 = time.perf_counter()
    emb = embed("train")
    labels = np.asarray(split.labels)
    ids, _ = class_neighbours(emb, labels, k=cfg.data.confusable_group - 1)
    sampler.set_neighbours({c: ids[c].tolist() for c in range(len(ids))})
    pairs = confused_pairs(emb, labels, top=10)
    timings["refresh"] = time.perf_counter() - t0
    log.info("confusable classes re-mined in %.1f s; most confused: %s", timings["refresh"],
             ", ".join(f"{split.classes[a]} ~ {split.classes[b]} ({v})" for a, b, v in pairs[:3]) or "none")
    return [[split.classes[a], split.classes[b], v] for a, b, v in pairs]


def views_that_fit(model: EmbeddingNet, card: ModelCard, splits: dict[str, Any], device: torch.device, *,
                   max_views: int, budget_mb: float) -> int:
    """How many cached views of the training images fit in ``budget_mb`` of RAM after the eval
    splits' single views; at most ``max_views``.

    Raises:
        ValueError: when not even the eval views fit, naming the settings that would.
    """
    with torch.inference_mode():
        probe = torch.zeros(1, 3, card.image_size, card.image_size, device=device)
        per_image = model.trunk(probe).numel() * 2  # bfloat16
    budget = budget_mb * 2**20
    n_eval = sum(len(splits[n]) for n in ("val", "test") if n in splits)
    n_train = len(splits["train"])
    fit = (budget - n_eval * per_image) // max(1, n_train * per_image)
    if fit < 1:
        need = (n_eval + n_train) * per_image / 2**20
        raise ValueError(f"cached trunk features need {need:.0f} MB for one view but data.cache_budget_mb is "
                         f"{budget_mb:g}: raise data.cache_budget_mb, or use model.trainable_stages -1 "
                         "(train on images, no cache)")
    if fit < max_views:
        log.info("caching %d views of the training images (data.cached_views %d does not fit data.cache_budget_mb %g)",
                 fit, max_views, budget_mb)
    return int(min(fit, max_views))


def _score(rec: dict[str, Any]) -> tuple[float, float]:
    """Model-selection key: validation R@1, then MAP@R."""
    return (rec["val/recall@1"], rec.get("val/map@r", 0.0))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _fmt(rec: dict[str, Any]) -> str:
    keys = ["train/loss", "train/mean_pairwise_cosine", "train/active_fraction", "train/images_per_s",
            "val/recall@1", "test/recall@1", "test/map@r"]
    return " ".join(f"{k}={rec[k]:.4g}" for k in keys if k in rec)
