"""Training on several processes or machines with ``torchrun`` (torch.distributed), one place.

``torchrun --nproc_per_node=N [--nnodes=M ...] -m lookalike train ...`` starts N×M copies of
the same command; each reads its rank from the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`session` joins the
process group (NCCL on CUDA, gloo on CPU) and leaves it; without those variables it does
nothing and every helper here answers as for one process (rank 0 of 1), so the trainer
has a single code path.

What is split across ranks, and what is not:

* **Batches.** The config's P×K batch is the *global* batch, drawn from the same
  epoch-seeded plan as one process; :class:`RankBatches` gives rank r the r-th block of
  ``P / world`` classes (K images each). Ranks see disjoint images, every class is still
  sampled K at a time, and the run's steps, schedule and results do not depend on the
  number of processes (to use N GPUs for a bigger batch, raise ``data.p``).
* **Mining and losses.** :func:`global_batch` all-gathers embeddings and labels; the local
  part keeps its gradient (:func:`all_gather_with_grad`), so miners and losses see the
  whole batch, exactly as in one process. DDP *averages* gradients over ranks while each
  rank's loss only reaches its own embeddings, so the metric loss is multiplied by the world
  size before ``backward`` (as pytorch-metric-learning's ``DistributedLossWrapper`` does):
  the averaged gradient is then the one-process gradient of the global batch.
* **BatchNorm.** Layers that train get batch statistics over the global batch
  (:func:`sync_batchnorm`, :class:`GlobalBatchNorm`: a synchronised BatchNorm that, unlike
  torch's ``SyncBatchNorm``, also runs on CPU). Frozen BatchNorm (``model.freeze_bn``, the default
  recipe, and every cached trunk) uses fixed running statistics, identical on all ranks, so
  there is nothing to synchronise.
* **Evaluation.** Each rank embeds a contiguous shard (:func:`shard_range`) and
  :func:`gather_rows` assembles the full embedding on every rank, so every rank computes the
  same metrics and takes the same decisions (best epoch, time budget).
* **Not split.** Cached trunk features are computed by every rank (the same seeded views);
  the relevance-feedback pairs are the same on every rank (their BatchNorm statistics stay
  local, :func:`local_batchnorm`, and DDP's average keeps their gradient); the time budget is
  planned on rank 0's clock and broadcast.
* **Files.** Only rank 0 (:func:`is_main`) writes the run directory; multi-machine runs need
  ``--out`` on a filesystem every node sees, so that ``--resume`` finds the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- process group
def launched_by_torchrun() -> bool:
    """True when the environment names a rank and a world of more than one process."""
    return all(v in os.environ for v in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device this rank uses: ``cuda:LOCAL_RANK`` when ``device`` is CUDA under torchrun."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device: torch.device, *, timeout_s: float = 1800.0) -> bool:
    """Join the process group that torchrun's environment describes; returns True if joined.

    A no-op (False) outside torchrun or when the group already exists (tests build their own).
    """
    if dist.is_initialized() or not launched_by_torchrun():
        return False
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s),
                            **({"device_id": device} if device.type == "cuda" else {}))
    if not is_main():  # one copy of each line: the ranks take the same decisions; only errors differ
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    log.info("distributed: %d processes (%s), this is rank %d on %s", world_size(), backend_for(device), rank(),
             device)
    return True


def teardown() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """``with session(device):`` joins torchrun's process group for the block and leaves it
    after, even on error (only the group this call created)."""
    joined = init_from_env(device)
    try:
        yield
    finally:
        if joined:
            teardown()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a picklable value; returned as is in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_reduce_min(value: int) -> int:
    """The smallest ``value`` over all ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (same keys on every rank; NaN propagates)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


# ----------------------------------------------------------------------------- the global batch
def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` ((n, ...) with the same shape on all ranks) in rank order
    -> (world·n, ...). The gradient flows into this rank's own rows only, as in
    pytorch-metric-learning's ``all_gather``: each rank differentiates its own part."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts)


def global_batch(emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's (n, D) float32 embeddings and (n,) int64 labels -> the global batch,
    (world·n, D) and (world·n,), in rank order; gradient kept for the local rows. Every rank
    must hold the same n (:class:`RankBatches` gives each P/world whole classes)."""
    if not is_distributed():
        return emb, labels
    return all_gather_with_grad(emb), all_gather_with_grad(labels)


def loss_scale() -> float:
    """Factor on a loss computed over the *global* batch before ``backward``: DDP averages the
    ranks' gradients, each rank's backward only reaches its own rows, so the world size
    makes the average equal to the one-process gradient."""
    return float(world_size())


# ----------------------------------------------------------------------------- sharded evaluation
def shard_range(n: int, *, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous block of ``range(n)``: rank r gets ``[r·n/W, (r+1)·n/W)``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return range(r * n // w, (r + 1) * n // w)


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Every rank's rows of :func:`shard_range` ``(n)`` -> the full (n, ...) array, on every rank.

    Args:
        local: (len(shard_range(n)), ...) rows of this rank (float32).
        n: total number of rows.
    """
    if not is_distributed():
        return local
    w, dev = world_size(), _comm_device()
    size = max(len(shard_range(n, rank_=r, world=w)) for r in range(w))
    t = torch.zeros((size, *local.shape[1:]), dtype=torch.from_numpy(local).dtype, device=dev)
    t[: len(local)] = torch.from_numpy(local).to(dev)
    parts = [torch.empty_like(t) for _ in range(w)]
    dist.all_gather(parts, t)
    return np.concatenate([p[: len(shard_range(n, rank_=r, world=w))].cpu().numpy() for r, p in enumerate(parts)])


# ----------------------------------------------------------------------------- sampling
class RankBatches(Sampler[list[int]]):
    """This rank's share of a P×K batch sampler's global batches.

    The wrapped sampler (``PKSampler`` or ``ConfusablePKSampler``) draws the global batch from
    its epoch-seeded plan on every rank alike; rank r keeps classes ``r·P/W .. (r+1)·P/W - 1``
    of it, K images each. Ranks are disjoint, every class comes K at a time, and the union
    over ranks is the one-process batch. Other attributes (``set_epoch``, ``epoch``,
    ``set_neighbours``) are the wrapped sampler's.

    Raises:
        ValueError: when P is not a multiple of the number of processes.
    """

    def __init__(self, sampler, *, rank_: int | None = None, world: int | None = None) -> None:
        self.sampler = sampler
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        if sampler.p % self.world:
            raise ValueError(f"data.p={sampler.p} classes per batch cannot be split over {self.world} processes: "
                             f"use a multiple of {self.world} (the batch is global: each process takes P/{self.world} "
                             "classes)")
        self.width = sampler.p // self.world * sampler.k

    def __getattr__(self, name: str) -> Any:
        if name == "sampler":  # not yet set (during unpickling)
            raise AttributeError(name)
        return getattr(self.sampler, name)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.width
        for batch in self.sampler:
            yield batch[lo: lo + self.width]


# ----------------------------------------------------------------------------- BatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of every rank's input is the sum of every
    rank's output gradient (each rank's output is the same sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


_local_bn = {"on": False}


@contextlib.contextmanager
def local_batchnorm() -> Iterator[None]:
    """Within the block, :class:`GlobalBatchNorm` layers use this rank's batch statistics only.

    For a forward that every rank runs on the *same* inputs (the relevance-feedback pairs): its
    local statistics already are the one-process ones, and syncing them would count each image
    once per rank.
    """
    before = _local_bn["on"]
    _local_bn["on"] = True
    try:
        yield
    finally:
        _local_bn["on"] = before


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised BatchNorm on any device (gloo on CPU, NCCL on CUDA): statistics over the
    global batch.

    In training mode under a process group, the per-channel mean and variance come from every
    rank's batch through two differentiable all-reduces (sums and count, then centred
    squares), so forward and backward equal one BatchNorm over the concatenated batch. Outside
    training, in one process or inside :func:`local_batchnorm`, it is the plain BatchNorm.
    Same parameters, buffers and state-dict keys as ``BatchNormNd``.

    Why not ``torch.nn.SyncBatchNorm``: it refuses CPU tensors (and DDP refuses it on CPU
    modules), so a gloo run could not use it, and it cannot be switched off for a forward that
    every rank runs on the same inputs.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()) or _local_bn["on"]:
            return super().forward(x)
        self._check_input_dim(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), xf.numel() / xf.shape[1], dtype=torch.float32, device=x.device)
        sums = all_reduce(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / torch.clamp(n - 1, min=1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _to_global(bn: nn.modules.batchnorm._BatchNorm, device: torch.device) -> nn.Module:
    new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    new.train(bn.training)
    return new.to(device)


def sync_batchnorm(model: nn.Module, *, device: torch.device, frozen: list[nn.Module] = (),
                   extra_roots: list[nn.Module] = ()) -> int:
    """Replace every BatchNorm layer of ``model`` that trains by a :class:`GlobalBatchNorm`
    (global-batch statistics); returns how many were replaced. Layers inside ``frozen`` (fixed statistics) are left alone.
    ``extra_roots`` are module trees that share layers with ``model`` without being its
    registered children (e.g. the trainable top after ``EmbeddingNet.split``); their references
    are updated too.
    """
    skip = {id(m) for f in frozen for m in f.modules()}
    todo = {id(m): m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, GlobalBatchNorm)
            and id(m) not in skip}
    new = {i: _to_global(m, device) for i, m in todo.items()}
    parents = {id(m): m for root in (model, *extra_roots) for m in root.modules()}
    for parent in parents.values():
        for name, child in parent._modules.items():
            if child is not None and id(child) in new:
                parent._modules[name] = new[id(child)]
    return len(new)


# ----------------------------------------------------------------------------- DDP
class _TrainForward(nn.Module):
    """What DDP wraps: the training forward of ``model`` (a method name), with ``aux`` registered
    beside it so the auxiliary head's gradients are averaged too."""

    def __init__(self, model: nn.Module, method: str, aux: nn.Module | None) -> None:
        super().__init__()
        self.model, self.method, self.aux = model, method, aux

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.model, self.method)(x)


def wrap_ddp(model: nn.Module, method: str, aux: nn.Module | None, device: torch.device):
    """``model.<method>`` as the training forward: wrapped in ``DistributedDataParallel`` (with
    ``aux``'s parameters) under a process group, the plain bound method otherwise.

    Buffers are synchronised once, at wrapping, not at every forward: frozen BatchNorm keeps its
    statistics fixed and synchronised BatchNorm computes the same ones on every rank.
    """
    if not is_distributed():
        return getattr(model, method)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_TrainForward(model, method, aux), device_ids=ids, forward_sync_buffers=False)


__all__ = [
    "GlobalBatchNorm", "RankBatches", "all_gather_with_grad", "all_reduce_min", "backend_for", "barrier",
    "broadcast_object", "gather_rows", "global_batch", "init_from_env", "is_distributed", "is_main",
    "local_batchnorm",
    "launched_by_torchrun", "local_device", "loss_scale", "mean_over_ranks", "rank", "session", "shard_range",
    "sync_batchnorm", "teardown", "world_size", "wrap_ddp",
]
