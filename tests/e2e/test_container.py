"""The serving container, built and run for real with podman (scripts/container_smoke.py).

Needs podman, root, and the local base image that scripts/podman_setup.sh makes; skips when
podman is not installed. The first build downloads the dependencies (a few minutes); later
builds reuse podman's layer cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.timeout(2400)
def test_container_smoke():
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: run scripts/podman_setup.sh (as root) to build and test the container")
    if os.geteuid() != 0:
        pytest.skip("podman builds and runs the image as root on these machines: run the slow suite as root")
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "container_smoke.py"), "--venv", sys.prefix],
                       cwd=REPO, capture_output=True, text=True, timeout=2300)
    out = p.stdout + p.stderr
    print(out[-6000:])  # the timings, shown with -s or -rA
    assert p.returncode == 0, f"container smoke test failed:\n{out[-6000:]}"
    assert "container_smoke: PASSED" in p.stdout
