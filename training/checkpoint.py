"""Resumable training checkpoints without pickle.

A checkpoint is a directory ``<run>/checkpoint/`` with ``state.safetensors`` (model,
auxiliary head, optimizer tensors, RNG state) and ``state.json`` (epoch, non-tensor optimizer
and scheduler state, the full resolved config, and the sha256 of the tensors file). Both are
written atomically and durably (:func:`models.io.atomic_write`), tensors first. A crash between
the two renames leaves new tensors beside the old JSON: the digest tells, and loading refuses the
pair with :class:`CheckpointMismatchError` instead of resuming from a mix of two epochs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from models.io import atomic_write, refuse_pickle

log = logging.getLogger(__name__)

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


class CheckpointMismatchError(ValueError):
    """``state.json`` and ``state.safetensors`` are not from the same save."""


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | Path, *, model: torch.nn.Module, aux: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, config: dict[str, Any],
                    history: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save everything needed to resume after ``epoch`` (0-based, completed).

    ``extra`` (JSON) and ``extra_tensors`` (e.g. the best epoch's weights) ride along.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if aux is not None:
        tensors.update({f"aux.{k}": v.detach().cpu().contiguous() for k, v in aux.state_dict().items()})
    opt_t, opt_meta = _flatten_optimizer(optimizer)
    tensors.update(opt_t)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
    blob = save(tensors)
    atomic_write(d / STATE_TENSORS, blob)
    meta = {
        "epoch": epoch,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": config,
        "history": history,
        **(extra or {}),
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    atomic_write(d / STATE_JSON, json.dumps(meta).encode())
    return d


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (tensors, meta) of a checkpoint directory; pickle files are refused.

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointMismatchError: the tensors file is not the one ``state.json`` was saved with
            (a crash between the two writes); nothing is loaded.
    """
    d = Path(directory)
    if d.is_file():
        refuse_pickle(d)
        d = d.parent
    if not (d / STATE_JSON).is_file() or not (d / STATE_TENSORS).is_file():
        raise FileNotFoundError(f"{d}: no resumable checkpoint ({STATE_TENSORS} + {STATE_JSON})")
    meta = json.loads((d / STATE_JSON).read_text())
    blob = (d / STATE_TENSORS).read_bytes()
    want = meta.get("tensors_sha256")
    if want is None:
        log.warning("%s: checkpoint from before tensor digests; its tensors are not verified", d)
    elif hashlib.sha256(blob).hexdigest() != want:
        raise CheckpointMismatchError(
            f"{d}: {STATE_TENSORS} is not the file {STATE_JSON} was saved with (a crash between the two "
            f"writes?); resuming would mix two epochs. Restart the run, or restore both files from a backup")
    return load(blob), meta


def restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, model: torch.nn.Module,
            aux: torch.nn.Module | None, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """Load a checkpoint into live objects; returns the next epoch to run."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if aux is not None:
        aux.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("aux.")})
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["epoch"]) + 1
