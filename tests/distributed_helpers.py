"""Process bodies for the 2-rank gloo tests (tests/unit/training/test_distributed.py).

They live in an importable module, so that a spawn start method would also find them. Each joins a gloo group through a file store, does its part and
``torch.save``s what the test compares into ``out/rank{r}.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORLD = 2


def spawn(fn, tmp: Path, *args: Any) -> list[Any]:
    """Run ``fn(rank, world, tmp, *args)`` on 2 gloo ranks; returns each rank's saved result."""
    import torch.multiprocessing as mp

    tmp.mkdir(parents=True, exist_ok=True)
    # fork: the children inherit the imported modules (a spawned child re-imports torch, seconds each)
    mp.start_processes(_entry, args=(fn, tmp, args), nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _entry(rank: int, fn, tmp: Path, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=WORLD)
    try:
        torch.save(fn(rank, WORLD, tmp, *args), tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def linear_embedder(seed: int = 0) -> torch.nn.Linear:
    """The tiny seeded 'network' of the global-batch test: Linear(8, 6)."""
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 6)


def global_batch_step(x: torch.Tensor, labels: torch.Tensor, loss_name: str, miner_name: str | None,
                      *, ddp: bool) -> dict[str, Any]:
    """One training step's loss, mined tuples and gradients, as ``train_one_epoch`` computes them.

    ``x`` (n, 8) float32 and ``labels`` (n,) are this rank's rows (the whole batch in one
    process). With ``ddp`` the embedder is wrapped in DistributedDataParallel.
    """
    import torch.nn.functional as F

    from training import distributed
    from training.losses import build_loss
    from training.miners import build_miner

    net = linear_embedder()
    fwd = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
    miner = build_miner(miner_name, distance="cosine", **({"margin": 0.3} if miner_name == "semi_hard" else {}))
    loss_fn = build_loss(loss_name, distance="cosine", margin=0.3)
    emb = F.normalize(fwd(x), dim=1)
    emb_all, labels_all = distributed.global_batch(emb, labels)
    tuples = miner(emb_all, labels_all) if miner is not None else None
    loss = loss_fn(emb_all, labels_all, tuples)
    (loss * distributed.loss_scale()).backward()
    return {"loss": loss.detach(), "tuples": None if tuples is None else [t.clone() for t in tuples],
            "grads": {k: p.grad.clone() for k, p in net.named_parameters()}, "emb": emb_all.detach()}


def batchnorm_step(x: torch.Tensor, *, ddp: bool) -> dict[str, Any]:
    """A BatchNorm1d(8) training step on ``x`` (this rank's rows): its output over the global
    batch, the gradients of a loss on that output, and the running statistics. With ``ddp`` the
    layer is a GlobalBatchNorm (as :func:`training.distributed.sync_batchnorm` makes it)."""
    from training import distributed

    torch.manual_seed(1)
    bn = torch.nn.BatchNorm1d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    net = torch.nn.Sequential(bn)
    if ddp:
        distributed.sync_batchnorm(net, device=torch.device("cpu"))
    y, _ = distributed.global_batch(net(x), torch.zeros(len(x)))
    loss = (y ** 3 * torch.arange(1.0, 9.0)).sum() / len(y)
    (loss * distributed.loss_scale()).backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    if ddp:  # what DDP does with the gradients: the mean over ranks
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= distributed.world_size()
    return {"y": y.detach(), "grads": grads, "running_mean": net[0].running_mean.clone(),
            "running_var": net[0].running_var.clone(), "type": type(net[0]).__name__}


def global_batch_worker(rank: int, world: int, tmp: Path, x: torch.Tensor, labels: torch.Tensor,
                        cases: list[tuple[str, str | None]]) -> dict[str, Any]:
    """Each case of :func:`global_batch_step` on this rank's contiguous rows of the batch, plus
    a sharded embedding gathered back (the evaluation path)."""
    import numpy as np

    from training import distributed

    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    out: dict[str, Any] = {f"{loss}/{miner}": global_batch_step(x[rows], labels[rows], loss, miner, ddp=True)
                           for loss, miner in cases}
    out["batchnorm"] = batchnorm_step(x[rows], ddp=True)
    n = 13  # not a multiple of the world: shards of unequal size
    full = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    shard = distributed.shard_range(n)
    out["gathered"] = distributed.gather_rows(full[shard.start:shard.stop], n)
    return out


def train_worker(rank: int, world: int, tmp: Path, overrides: dict[str, Any], phases: list[dict[str, Any]]) -> dict:
    """``training.trainer.train`` on this rank, once per phase (e.g. ``stop_after`` then ``resume``);
    returns the last phase's result."""
    from training.config import load_config
    from training.trainer import train

    result: dict[str, Any] = {}
    for phase in phases:
        result = train(load_config(overrides=overrides), progress=False, **phase)
    return result
