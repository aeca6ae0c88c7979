"""The ONNX backend serves the same results as torch; ``lookalike serve`` refuses bad setups."""

from __future__ import annotations

import shutil

import pytest

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import search


@pytest.fixture(scope="module")
def onnx_model_dir(model_dir, tmp_path_factory):
    from models.export import export_onnx

    d = tmp_path_factory.mktemp("onnx") / "m"
    shutil.copytree(model_dir, d)  # same bytes, same fingerprint
    export_onnx(d)
    return d


def test_onnx_and_torch_give_the_same_answers(make_client, onnx_model_dir):
    queries = [imagegen.jpeg(700 + i) for i in range(3)]
    with make_client(backend="torch") as c:
        ref = [search(c, q, k=5).json() for q in queries]
    with make_client(backend="onnx", model_dir=onnx_model_dir) as c:
        assert c.get("/v1/index").json()["backend"] == "onnx"
        got = [search(c, q, k=5).json() for q in queries]
    for a, b in zip(ref, got):
        assert [r["id"] for r in a["results"]] == [r["id"] for r in b["results"]]
        for ra, rb in zip(a["results"], b["results"]):
            assert abs(ra["score"] - rb["score"]) < 1e-4
        assert a["model"] == b["model"]


def test_auto_backend_is_the_measured_one(make_settings, model_dir, onnx_model_dir, monkeypatch):
    """``auto`` is what :func:`models.backend_choice.choose_backend` measured, not a CPU-flag rule."""
    import models.backend_choice as bc
    from service.state import resolve_backend_name

    for fastest in ("torch", "onnx"):
        (onnx_model_dir / bc.CHOICE_FILE).unlink(missing_ok=True)
        scores = {"torch": 1.0, "onnx": 2.0} if fastest == "torch" else {"torch": 2.0, "onnx": 1.0}
        monkeypatch.setattr(bc, "measure_backends", lambda *a, s=scores, **k: {
            n: {"startup_s": 0.1, "b1_ms": v, "b8_ms": v, "score_ms": v} for n, v in s.items()})
        assert resolve_backend_name(make_settings(backend="auto", model_dir=onnx_model_dir)) == fastest
    if not (model_dir / "model.onnx").exists():
        assert resolve_backend_name(make_settings(backend="auto", model_dir=model_dir)) == "torch"
    assert resolve_backend_name(make_settings(backend="onnx", model_dir=model_dir)) == "onnx"


def test_serve_is_registered():
    from lookalike.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m", "--index", "i", "--port", "9001", "--read-only"])
    assert args.command == "serve" and args.port == 9001 and args.read_only


def test_serve_refuses_without_api_key(monkeypatch, capsys, tmp_path):
    from lookalike.cli import main

    monkeypatch.delenv("LOOKALIKE_API_KEY", raising=False)
    assert main(["serve", "--model", str(tmp_path), "--index", str(tmp_path)]) == 2
    assert "LOOKALIKE_API_KEY" in capsys.readouterr().err


def test_serve_refuses_missing_directories(monkeypatch, capsys, tmp_path):
    from lookalike.cli import main

    monkeypatch.setenv("LOOKALIKE_API_KEY", "k" * 20)
    assert main(["serve", "--model", str(tmp_path / "nope"), "--index", str(tmp_path)]) == 2
    assert "model directory not found" in capsys.readouterr().err
    monkeypatch.delenv("LOOKALIKE_MODEL_DIR", raising=False)
    assert main(["serve", "--index", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err


def test_serve_reports_a_failed_start(monkeypatch, capsys, tmp_path, model_dir):
    from lookalike.cli import main

    monkeypatch.setenv("LOOKALIKE_API_KEY", "k" * 20)
    (tmp_path / "empty-index").mkdir()
    rc = main(["serve", "--model", str(model_dir), "--index", str(tmp_path / "empty-index"), "--port", "0",
               "--no-reexec"])
    assert rc == 2
    assert "did not start" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_reexecs_when_torch_is_already_imported(tmp_path, model_dir):
    """With torch imported by the main thread, ``serve`` execs ``python -m service`` (same PID),
    which reports a failed start like the CLI does."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "empty-index").mkdir()
    code = ("import os, sys, torch; print(os.getpid(), flush=True); from lookalike.cli import main; "
            f"sys.exit(main(['serve', '--model', {str(model_dir)!r}, '--index', {str(tmp_path / 'empty-index')!r}, "
            "'--port', '0']))")
    env = dict(os.environ, LOOKALIKE_API_KEY="k" * 20, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "lookalike: error: the service did not start" in proc.stderr
    assert "not a lookalike index" in proc.stderr
    pid = proc.stdout.split()[0]
    assert f"python -m service (pid {pid}): torch imported: False" in proc.stderr  # same process, new interpreter
