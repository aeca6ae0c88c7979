"""The README's configuration reference is generated from the models, so it cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_config_reference_in_sync():
    out = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_readme_names_the_two_commands_and_ci_calls_the_test_command():
    readme = (REPO / "README.md").read_text()
    assert "scripts/demo" in readme and "scripts/test" in readme
    ci = (REPO / ".ci/run").read_text()
    assert "scripts/test\n" in ci
