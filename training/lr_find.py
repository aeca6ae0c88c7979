"""LR range test (Smith 2015, fast.ai style): raise the LR exponentially for a few hundred
steps, record the smoothed loss, stop when it diverges, plot loss vs LR, suggest an LR.

Each step is the trainer's own (:func:`training.trainer.train_one_epoch`): the configured loss,
miner, auxiliary head, gradient clipping, channels_last, bf16 autocast and frozen batch norm,
with the trainer's parameter groups (the head at ``head_lr_mult`` times the backbone LR). The
LR swept and reported is the backbone's, i.e. what ``optim.lr`` sets.

The suggestion is the LR of the steepest descent of the smoothed loss, capped at a tenth of
the LR where the loss was lowest (a common, conservative rule).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.net import EmbeddingNet
from training.config import TrainConfig
from training.data import PKSampler, choose_p, should_cache
from training.trainer import (CollapseMonitor, aux_from_config, build_optimizer, card_from_config, loss_from_config,
                              miner_from_config, param_groups, resolve_device, splits_from_config, train_dataset,
                              train_one_epoch, use_bf16)

log = logging.getLogger(__name__)


def lr_range_test(cfg: TrainConfig, *, lr_min: float = 1e-6, lr_max: float = 1.0, steps: int = 100,
                  beta: float = 0.9, out_png: str | Path | None = None) -> dict[str, Any]:
    """Run the range test on the training split of ``cfg``; returns lrs, losses and the suggestion."""
    if not (0 < lr_min < lr_max):
        raise ValueError(f"need 0 < lr_min < lr_max, got {lr_min}, {lr_max}")
    if steps < 10:
        raise ValueError(f"steps must be >= 10, got {steps}")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    bf16 = use_bf16(cfg.amp, device)
    splits = splits_from_config(cfg)
    card = card_from_config(cfg)
    cache = should_cache(len(splits["train"]), card, cfg.data.cache_images, cfg.data.cache_budget_mb)
    ds = train_dataset(cfg, splits["train"], card, cache=cache)
    sampler = PKSampler(splits["train"].labels, choose_p(cfg.data.p, splits["train"].labels), cfg.data.k,
                        batches_per_epoch=steps, seed=cfg.seed)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=0 if cache else cfg.data.workers)
    model = EmbeddingNet(card, backbone_weights=cfg.model.weights).to(device)
    if cfg.model.trainable_stages >= 0:  # the same frozen trunk as the trainer (here on images, not cached)
        model.split(cfg.model.trainable_stages)
    aux = aux_from_config(cfg, len(splits["train"].classes), card.embedding_dim)
    if aux is not None:
        aux = aux.to(device)
    metric_loss = _Recorded(loss_from_config(cfg))
    aux_rec = _Recorded(aux) if aux is not None else None
    sweep = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": lr_min})})
    opt = build_optimizer(cfg.optim.name, param_groups(model, aux, sweep), lr=lr_min,
                          weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
    gamma = (lr_max / lr_min) ** (1 / (steps - 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: gamma**i)
    lrs: list[float] = []
    losses: list[float] = []
    state = {"smooth": 0.0, "best": math.inf, "diverged": False}

    def on_step(n: int) -> None:
        v = metric_loss.last + (cfg.loss.aux_weight * aux_rec.last if aux_rec is not None else 0.0)
        state["smooth"] = beta * state["smooth"] + (1 - beta) * v
        corrected = state["smooth"] / (1 - beta**n)
        lrs.append(lr_min * gamma ** (n - 1))
        losses.append(corrected)
        state["best"] = min(state["best"], corrected)
        if not math.isfinite(v) or (corrected > 4 * state["best"] and n > 11):
            log.info("stopping at lr %.2e: loss diverged", lrs[-1])
            state["diverged"] = True

    try:
        train_one_epoch(model, loader, loss_fn=metric_loss, miner=miner_from_config(cfg), aux=aux_rec,
                        aux_weight=cfg.loss.aux_weight, optimizer=opt, scheduler=scheduler, device=device, bf16=bf16,
                        channels_last=cfg.channels_last, grad_clip=cfg.optim.grad_clip,
                        monitor=CollapseMonitor(cfg.collapse_cosine), epoch=0, progress=False,
                        freeze_bn=cfg.model.freeze_bn, stop=lambda: state["diverged"], on_step=on_step)
    except RuntimeError as exc:  # the step refuses a non-finite loss: that is divergence too
        if "loss became" not in str(exc):
            raise
        log.info("stopping at lr %.2e: %s", lr_min * gamma ** len(lrs), exc)
    if not lrs:
        raise RuntimeError(f"the loss was not finite at the first step (lr {lr_min:.1e}); lower --min-lr")
    lr_arr, loss_arr = np.array(lrs), np.array(losses)
    grads = np.gradient(loss_arr, np.log10(lr_arr)) if len(lr_arr) > 2 else np.zeros_like(loss_arr)
    skip = max(1, len(lr_arr) // 10)
    steepest = float(lr_arr[skip + int(np.argmin(grads[skip:-1]))]) if len(lr_arr) > skip + 2 else float(lr_arr[0])
    at_min = float(lr_arr[int(np.argmin(loss_arr))])
    suggestion = min(steepest, at_min / 10) if at_min / 10 > lr_min else steepest
    result = {"lrs": lrs, "losses": losses, "suggested_lr": suggestion, "steepest_lr": steepest, "min_loss_lr": at_min}
    if out_png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lr_arr, loss_arr)
        ax.axvline(suggestion, color="red", ls="--", label=f"suggested {suggestion:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("smoothed loss")
        ax.set_title(f"LR range test: {cfg.model.backbone}, {cfg.loss.name}, {cfg.optim.name}")
        ax.legend()
        fig.tight_layout()
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=100)
        plt.close(fig)
    return result


class _Recorded(torch.nn.Module):
    """Wraps a loss module and keeps the value of its last call (``last``, a float)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.last = float("nan")

    @property
    def stats(self) -> dict[str, float]:
        return getattr(self.inner, "stats", {})

    def forward(self, *args: Any) -> torch.Tensor:
        out = self.inner(*args)
        self.last = float(out.detach())
        return out
