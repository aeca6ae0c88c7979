"""LR range test (Smith 2015, fast.ai style): raise the LR exponentially for a few hundred
steps, record the smoothed loss, stop when it diverges, plot loss vs LR, suggest an LR.

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
import torch.nn.functional as F
from torch.utils.data import DataLoader

from training.config import TrainConfig
from training.data import PKSampler, choose_p, should_cache
from training.trainer import (_param_groups, aux_from_config, build_optimizer, card_from_config, loss_from_config,
                              resolve_device, splits_from_config, train_dataset, use_bf16)
from models.net import EmbeddingNet

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
    model.train()
    aux = aux_from_config(cfg, len(splits["train"].classes), card.embedding_dim)
    if aux is not None:
        aux = aux.to(device)
    loss_fn = loss_from_config(cfg)
    opt = build_optimizer(cfg.optim.name, _param_groups(model, aux, cfg), lr=lr_min, weight_decay=cfg.optim.weight_decay,
                          momentum=cfg.optim.momentum)
    gamma = (lr_max / lr_min) ** (1 / (steps - 1))
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    for i, (x, y) in enumerate(loader):
        lr = lr_min * gamma**i
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            raw = model.forward_raw(x.to(device))
        emb = F.normalize(raw.float(), dim=1)
        y = y.to(device)
        loss = loss_fn(emb, y)
        if aux is not None:
            loss = loss + cfg.loss.aux_weight * aux(emb, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v = float(loss.detach())
        smooth = beta * smooth + (1 - beta) * v
        corrected = smooth / (1 - beta ** (i + 1))
        lrs.append(lr)
        losses.append(corrected)
        best = min(best, corrected)
        if not math.isfinite(v) or corrected > 4 * best and i > 10:
            log.info("stopping at lr %.2e: loss diverged", lr)
            break
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
