"""Fast checks of the README's blocks (the slow suite runs them: tests/e2e/test_readme_run.py).

Every ``lookalike`` command in a running block must parse with the real command-line parser, so
a renamed flag or subcommand fails here in the default suite; every directive must be known.
"""

from __future__ import annotations

import shlex

import pytest

from lookalike.cli import build_parser
from tests import readme_blocks as rb


def _commands(code: str) -> list[list[str]]:
    """The ``lookalike ...`` commands of a bash block, continuation lines joined, comments dropped."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if words and words[0] in ("lookalike", ".venv/bin/lookalike"):
                out.append(words[1:])
    return out


def test_every_block_is_known_and_every_lookalike_command_parses(capsys):
    blocks = rb.parse((rb.REPO / "README.md").read_text())
    running = [b for b in blocks if b.runs]
    assert any(b.lang == "python" for b in running) and len(running) >= 10
    for b in blocks:
        assert b.lang in rb.RUNS + rb.NEVER, f"README line {b.line}: fence language {b.lang!r} is neither run nor known"
    parser = build_parser()
    n = 0
    for b in running:
        if b.lang != "bash":
            continue
        for argv in _commands(b.code):
            n += 1
            try:
                parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"README line {b.line}: `lookalike {' '.join(argv)}` does not parse: "
                            f"{capsys.readouterr().err.strip()}")
    assert n >= 20


def test_directives_and_substitutions(tmp_path):
    text = ("x\n<!-- readme-test: skip takes an hour -->\n```bash\nsleep 3600\n```\n"
            "<!-- readme-test: background http://127.0.0.1:8000/readyz -->\n```bash\nexport A=1\n"
            "lookalike serve --port 8000 \\\n  --index i\n```\n```text\nnot run\n```\n"
            "```python\nprint('hi')\n```\n")
    blocks = rb.parse(text)
    assert [b.lang for b in blocks] == ["bash", "bash", "text", "python"]
    assert blocks[0].skip == "takes an hour" and not blocks[0].runs
    script, notes = rb.script(blocks, rb.substitutions(tmp_path, 9999), podman_skip=None)
    assert notes == ["line 3: skipped: takes an hour"] and "sleep 3600" not in script
    assert "export A=1\n" in script and "lookalike serve --port 9999 \\\n  --index i &\n" in script
    assert "readme_wait http://127.0.0.1:9999/readyz" in script and "not run" not in script
    podman = rb.parse("```bash\npodman run -d -p 127.0.0.1:8000:8000 img\n```\n")
    assert "-p 127.0.0.1:9999:8000 img" in rb.script(podman, rb.substitutions(tmp_path, 9999), podman_skip=None)[0]
    with pytest.raises(ValueError, match="unknown readme-test directive"):
        rb.parse("<!-- readme-test: later -->\n```bash\ntrue\n```\n")


def test_a_failing_block_fails_the_session(tmp_path):
    import subprocess

    blocks = rb.parse("```bash\ntrue\n```\n\n```bash\nfalse\necho never\n```\n")
    script, _ = rb.script(blocks, [], podman_skip=None)
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and "never" not in p.stdout
    assert "README line 5" in p.stderr


def test_the_readme_run_refuses_a_venv_older_than_pyproject(tmp_path):
    """The scratch copy links the developer's .venv: with a stale install, scripts/setup in the quick
    start would reinstall the project from the scratch copy (which pytest deletes later)."""
    import os

    (tmp_path / ".venv").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    with pytest.raises(RuntimeError, match="run scripts/setup first"):
        rb.venv_current(tmp_path)  # never installed
    stamp = tmp_path / rb.STAMP
    stamp.touch()
    os.utime(tmp_path / "pyproject.toml", (stamp.stat().st_mtime + 10,) * 2)
    with pytest.raises(RuntimeError, match="older than pyproject.toml"):
        rb.venv_current(tmp_path)  # pyproject changed since the install
    os.utime(stamp, (stamp.stat().st_mtime + 20,) * 2)
    rb.venv_current(tmp_path)  # up to date: no error
