"""The command is written for people: help with examples, allowed values from the registries,
config errors before torch is imported, and a warning for a mistyped LOOKALIKE_* variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lookalike.cli import build_parser, unknown_env_warnings
from models.registry import ACTIVATIONS, HEADS, available_backbones
from training.config import allowed_values, flat_fields
from training.registry import DISTANCES, LOSSES, MEMORY_MINERS, MINERS, OPTIMIZERS, REDUCTIONS, SAMPLERS


def _help(*argv: str) -> str:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--help"])
    return ""


def test_top_level_help_is_for_users(capsys):
    _help()
    out = capsys.readouterr().out
    assert "examples:" in out and "lookalike train --data.root" in out and "lookalike serve" in out
    for dev in ("``", "register(", "issue #", "seed lecture"):
        assert dev not in out


def test_train_help_lists_allowed_values_and_explains_null(capsys):
    _help("train")
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "examples:" in out
    assert "null means none (Python None)" in out
    assert "one of: none, " + ", ".join(MINERS) in out
    assert "one of: " + ", ".join(available_backbones()) in out


def test_every_config_field_has_help():
    missing = [name for name, info in flat_fields().items() if not info.description]
    assert not missing, f"config fields without a description: {missing}"


@pytest.mark.parametrize("field,names", [
    ("model.backbone", tuple(available_backbones())),
    ("model.head", HEADS),
    ("model.activation", ACTIVATIONS.names),
    ("data.sampler", SAMPLERS.names),
    ("loss.name", LOSSES.names),
    ("loss.distance", DISTANCES),
    ("loss.reduction", REDUCTIONS),
    ("loss.miner", ("none", *MINERS.names)),
    ("loss.memory_miner", MEMORY_MINERS),
    ("optim.name", OPTIMIZERS),
])
def test_allowed_values_come_from_the_registries(field, names):
    assert allowed_values(flat_fields()[field]) == tuple(names)


def test_registries_resolve_to_their_implementations():
    from torch import nn

    from training.losses import build_loss
    from training.miners import build_miner

    assert ACTIVATIONS["gelu"] is nn.GELU
    for name in LOSSES:
        assert type(build_loss(name)).__name__ == LOSSES[name].__name__
    for name in MINERS:
        assert isinstance(build_miner(name), MINERS[name])
    with pytest.raises(ValueError, match="allowed: contrastive, triplet"):
        build_loss("arcface")


def test_config_error_comes_before_torch():
    """A bad value is reported (field and allowed values) by a process that never imported torch."""
    code = ("import sys; from lookalike.cli import main; "
            "rc = main(['train', '--loss.miner', 'hardest', '--out', 'never']); "
            "print(rc, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["2", "False"], p.stdout + p.stderr
    assert "loss.miner: 'hardest' is not allowed; allowed: 'none', 'batch_hard'" in p.stderr
    assert "Traceback" not in p.stderr


def test_unknown_lookalike_variable_names_the_closest_known_one():
    out = unknown_env_warnings({"LOOKALIKE_API_KEYS": "x", "LOOKALIKE_MAX_K": "5", "HOME": "/",
                                "LOOKALIKE_ZZZ": "1"})
    assert out[0] == "unknown environment variable LOOKALIKE_API_KEYS is ignored; did you mean LOOKALIKE_API_KEY?"
    assert len(out) == 2 and "LOOKALIKE_ZZZ" in out[1]
    assert unknown_env_warnings({"LOOKALIKE_LOG": "DEBUG", "LOOKALIKE_ARTIFACTS": "a"}) == []
