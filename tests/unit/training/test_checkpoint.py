"""Checkpoints: a round trip restores the run, and a tensors file that is not the JSON's is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from training.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    CheckpointMismatchError,
    load_checkpoint,
    restore,
    save_checkpoint,
)


def _parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(d, epoch: int, seed: int):
    model, opt = _parts(seed)
    save_checkpoint(d, model=model, aux=None, optimizer=opt, scheduler=None, epoch=epoch,
                    config={"seed": seed}, history=[{"epoch": epoch}])
    return model


def test_round_trip_restores_weights_and_next_epoch(tmp_path):
    saved = _save(tmp_path / "ck", epoch=2, seed=1)
    tensors, meta = load_checkpoint(tmp_path / "ck")
    model, opt = _parts(9)
    assert restore(tensors, meta, model=model, aux=None, optimizer=opt, scheduler=None) == 3
    torch.testing.assert_close(model.weight, saved.weight)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [STATE_JSON, STATE_TENSORS]  # no temp left


def test_tensors_from_another_save_are_refused(tmp_path):
    """A crash between the two renames leaves the new tensors beside the old JSON."""
    _save(tmp_path / "ck", epoch=0, seed=1)
    old_json = (tmp_path / "ck" / STATE_JSON).read_bytes()
    _save(tmp_path / "ck", epoch=1, seed=2)
    (tmp_path / "ck" / STATE_JSON).write_bytes(old_json)
    with pytest.raises(CheckpointMismatchError, match="not the file state.json was saved with"):
        load_checkpoint(tmp_path / "ck")


def test_a_checkpoint_without_a_digest_still_loads(tmp_path, caplog):
    import json

    _save(tmp_path / "ck", epoch=0, seed=1)
    meta = json.loads((tmp_path / "ck" / STATE_JSON).read_text())
    del meta["tensors_sha256"]
    (tmp_path / "ck" / STATE_JSON).write_text(json.dumps(meta))
    tensors, got = load_checkpoint(tmp_path / "ck")
    assert got["epoch"] == 0 and "model.weight" in tensors
    assert "not verified" in caplog.text


def test_a_missing_half_is_no_checkpoint(tmp_path):
    _save(tmp_path / "ck", epoch=0, seed=1)
    shutil.copytree(tmp_path / "ck", tmp_path / "half")
    (tmp_path / "half" / STATE_TENSORS).unlink()
    with pytest.raises(FileNotFoundError, match="no resumable checkpoint"):
        load_checkpoint(tmp_path / "half")
