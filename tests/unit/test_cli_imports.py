"""The `lookalike` command stays import-light: building its parser must not import torch
(a serving process must first touch torch in its inference thread)."""

from __future__ import annotations

import subprocess
import sys


def test_parser_does_not_import_torch():
    code = "import sys; from lookalike.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_every_subcommand_registered():
    from lookalike.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "eval", "lr-find", "export", "index", "serve"} <= set(sub.choices)
