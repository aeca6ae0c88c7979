"""Trunk outputs computed once, so partial fine-tuning trains only the top of the network.

With ``model.trainable_stages = k >= 0`` the backbone's early stages are frozen (weights and
BatchNorm statistics). Their outputs do not change during training, so they are computed
once per image and *view* (view 0: the card's eval crop; views 1..V-1: random resized crops
with flips, from seeded generators) and kept in RAM as bfloat16. A training step then runs
only the last ``k`` stages, the pooling, neck and head: for EfficientNet-Lite0 at 224 px and
k = 2 that is about a third of a forward pass instead of a full forward and backward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from training.data import ImageDataset

log = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """Cached trunk outputs of one split.

    Attributes:
        feats: (V, N, C, h, w) bfloat16; ``feats[0]`` is the eval view.
        labels: (N,) int64.
        seconds_per_view: measured wall time of computing one view of the split.
    """

    feats: torch.Tensor
    labels: torch.Tensor
    seconds_per_view: float

    @property
    def views(self) -> int:
        return int(self.feats.shape[0])

    def __len__(self) -> int:
        return int(self.feats.shape[1])

    def nbytes_per_view(self) -> int:
        return int(self.feats[0].numel() * self.feats.element_size())

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) indices -> (B, C, h, w) float32 trunk outputs, each from a random view."""
        if self.views == 1:
            return self.feats[0, idx].float()
        v = torch.randint(0, self.views, (len(idx),), generator=generator)
        return self.feats[v, idx].float()


def autocast_forward(forward, x: torch.Tensor, *, device: torch.device, bf16: bool,
                     channels_last: bool) -> torch.Tensor:
    """``forward(x)`` the way training and evaluation run it: ``x`` moved to ``device`` as float32,
    channels_last when it is a 4-D batch, under bf16 autocast when ``bf16``."""
    x = x.to(device, non_blocking=True).float()
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        return forward(x)


@torch.inference_mode()
def _one_view(trunk: nn.Module, dataset: ImageDataset, *, device: torch.device, bf16: bool, batch_size: int,
              channels_last: bool, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the view's random crops and flips
    out = []
    for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        feats = autocast_forward(trunk, images, device=device, bf16=bf16, channels_last=channels_last)
        out.append(feats.to(torch.bfloat16).contiguous().cpu())
    return torch.cat(out)


def build_cache(trunk: nn.Module, eval_view: ImageDataset, *, train_view: ImageDataset | None = None, views: int = 1,
                device: torch.device, bf16: bool, channels_last: bool = True, batch_size: int = 64, seed: int = 0,
                deadline: float | None = None, progress: bool = True, name: str = "") -> FeatureCache:
    """Trunk outputs of ``eval_view`` (view 0) and ``views - 1`` augmented views of ``train_view``.

    ``deadline`` (a ``time.perf_counter()`` value) stops adding augmented views once the next
    one would end after it; the cache then holds fewer views (logged). The images are
    decoded once by the datasets (which share their RAM cache).
    """
    from tqdm import tqdm

    if views > 1 and train_view is None:
        raise ValueError("augmented views need train_view")
    trunk.eval()
    bar = tqdm(total=views, desc=f"caching {name} trunk features", unit="view", leave=False, disable=not progress)
    t0 = time.perf_counter()
    first = _one_view(trunk, eval_view, device=device, bf16=bf16, batch_size=batch_size,
                      channels_last=channels_last, seed=seed)
    per_view = time.perf_counter() - t0
    bar.update()
    stack = [first]
    for v in range(1, views):
        if deadline is not None and time.perf_counter() + per_view > deadline:
            log.info("%s: cached %d of %d views (the budget leaves no time for more)", name, len(stack), views)
            break
        stack.append(_one_view(trunk, train_view, device=device, bf16=bf16, batch_size=batch_size,
                               channels_last=channels_last, seed=seed * 1000 + v))
        bar.update()
    bar.close()
    feats = torch.stack(stack)
    labels = torch.as_tensor(eval_view.split.labels, dtype=torch.int64)
    log.info("%s: trunk features %s (%.0f MB) in %.1f s (%.1f img/s)", name, tuple(feats.shape),
             feats.numel() * feats.element_size() / 2**20, time.perf_counter() - t0,
             len(labels) * len(stack) / max(1e-9, time.perf_counter() - t0))
    return FeatureCache(feats, labels, per_view)
