"""The README is executed: every ```bash and ```python block, in order, in one bash session.

The convention (which blocks run, the ``readme-test`` directives, the stand-ins for the user's
files and for long steps) is documented in :mod:`tests.readme_blocks`. A README command that
fails fails this test, which names the block's line and prints the session's output tail.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests import readme_blocks as rb

pytestmark = pytest.mark.slow


def _run_session(cmd: list[str], *, cwd, env, timeout: float) -> subprocess.CompletedProcess:
    """Run the session in its own process group; on timeout stop all of it (background servers too)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate()
        pytest.fail(f"the README session ran over {timeout:.0f} s; its output:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


@pytest.mark.timeout(2400)
def test_readme_runs(tmp_path, artifacts_dir):
    work = tmp_path / "repo"
    work.mkdir()
    rb.scratch_copy(work)
    data = rb.stand_ins(work)
    port = rb.free_port()
    blocks = rb.parse((rb.REPO / "README.md").read_text())
    text, notes = rb.script(blocks, rb.substitutions(data, port), podman_skip=rb.podman_reason())
    (tmp_path / "readme.sh").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOKALIKE_", "PYTEST_", "VIRTUAL_ENV"))}
    env.update(NO_SERVE="1", BUDGET=rb.BUDGET, LOOKALIKE_LOG="WARNING",
               PYTEST_ADDOPTS="tests/unit/test_cli_imports.py -q -p no:cacheprovider")
    if os.environ.get("LOOKALIKE_CACHE_DIR"):
        env["LOOKALIKE_CACHE_DIR"] = os.environ["LOOKALIKE_CACHE_DIR"]
    env.update(rb.podman_env())
    p = _run_session(["bash", str(tmp_path / "readme.sh")], cwd=work, env=env, timeout=2300)
    log = "\n".join(["stand-ins:", *rb.SUBSTITUTIONS, "not run:", *notes, "", p.stdout])
    (artifacts_dir / "readme_run.log").write_text(log)  # the whole session, for CI's artifacts
    print("\n".join(["stand-ins:", *rb.SUBSTITUTIONS, "not run:", *notes]))
    print(p.stdout[-8000:])
    assert p.returncode == 0, f"a README block failed (exit {p.returncode}):\n{p.stdout[-6000:]}"
    assert "README runner: every block passed" in p.stdout
    # the first run on a messy folder said how good it is and named the bad files
    assert "R@1 on held-out test classes" in p.stdout
    assert "broken.jpg" in p.stdout and "notes.txt" in p.stdout

    # the quick start run again: training, export, the report and the index are up to date
    outputs = [work / "runs/demo" / f for f in ("model/model.onnx", "report/report.html", ".demo-indexed")]
    before = [f.stat().st_mtime_ns for f in outputs]
    again = subprocess.run(["bash", "-c", f"DATA={data} scripts/demo"], cwd=work, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=600)
    print(again.stdout[-3000:])
    assert again.returncode == 0, again.stdout[-3000:]
    assert "runs/demo is already trained" in again.stdout and "runs/demo/index is up to date" in again.stdout
    assert [f.stat().st_mtime_ns for f in outputs] == before  # no export, no eval, no indexing
    assert "R@1 on held-out test classes" in again.stdout
