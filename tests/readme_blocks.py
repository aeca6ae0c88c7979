"""Run the README's shell blocks as written (the runner behind tests/e2e/test_readme_run.py).

The convention, for whoever adds a block to README.md:

* A block fenced as ```` ```bash ```` runs; so does ```` ```python ```` (with the venv's
  ``python``, at its place in the order). ```` ```text ````, ```` ```console ````, ```` ```yaml ````
  and unlabelled fences are never run: use them for output and layouts.
* All running blocks run in README order in **one** bash session (``set -euo pipefail``), so a
  block may use what an earlier one made: the activated venv, an exported variable, a running
  server, ``runs/demo``. A command that fails fails the test, which names the block's line.
  ``curl`` fails on an HTTP error status (``--fail-with-body``), so a 4xx/5xx answer counts.
* An HTML comment on the line just before a block changes how it runs:

  - ``<!-- readme-test: skip REASON -->``: not run; the reason is printed (benchmarks that take
    hours). Say why in REASON.
  - ``<!-- readme-test: background URL -->``: the block's last command is a server; it runs in
    the background and the runner waits until ``URL`` answers 200. Servers started earlier are
    stopped first; all are stopped at the end.
  - ``<!-- readme-test: wait URL -->``: the block starts a detached server itself (``podman run -d``);
    earlier servers are stopped first and the runner waits until ``URL`` answers 200.
  - ``<!-- readme-test: podman -->``: runs only where podman can build and run the image (root,
    podman installed, ``scripts/podman_setup.sh`` done); otherwise it and every later podman block
    are skipped with the reason. May be combined: ``<!-- readme-test: podman; wait URL -->``.

The session runs in a scratch copy of the repository (tracked and untracked, not ignored,
files; the ``.venv`` is linked), in which the runner places stand-ins for the user's files and
makes the long steps short. Every stand-in is listed in :data:`SUBSTITUTIONS` and :func:`stand_ins`:

* ``../shared/data/cub100`` -> a generated ImageFolder of 20 classes x 25 images with one corrupt
  JPEG and one ``.txt`` file and no class lists (the "first run on any folder" target);
* ``--budget X`` -> ``--budget 20s``, ``--epochs N`` -> ``--epochs 1``, ``--steps N`` -> ``--steps 10``,
  ``--factory IVF<n>,`` -> ``--factory IVF4,`` (an IVF for a few dozen images);
* port ``8000`` -> a free port;
* ``podman build`` gets the CA mounts the README's hint describes, where ``scripts/podman_setup.sh``
  wrote a ``pip.conf`` (this machine's pip needs its CA bundle inside the build);
* environment: this machine's podman configuration (``CONTAINERS_CONF``, see :func:`podman_env`),
  ``NO_SERVE=1`` and ``BUDGET=20s`` (``scripts/demo``'s own variables: the REST
  section starts the server), ``PYTEST_ADDOPTS`` selecting one small test file (so
  ``scripts/test`` in the quick start does not run the whole suite inside the suite);
* files the README names as the user's own: ``bird.jpg``, ``gull.jpg``, ``new.jpg``,
  ``query.jpg`` and ``photos/`` (with ``photos/more/``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUNS = ("bash", "python")
NEVER = ("text", "console", "yaml", "json", "")
_FENCE = re.compile(r"^```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
BUDGET = "20s"


@dataclass
class Block:
    """One fenced block: ``line`` is the README line of its opening fence (1-based)."""

    line: int
    lang: str
    code: str
    skip: str | None = None
    background: str | None = None
    wait: str | None = None
    podman: bool = False
    directives: list[str] = field(default_factory=list)

    @property
    def runs(self) -> bool:
        return self.lang in RUNS and self.skip is None


def parse(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with the directive comment just before it.

    Raises:
        ValueError: an unclosed fence, or a directive this runner does not know.
    """
    lines = text.splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"README line {start + 1}: code fence never closed")
        block = Block(start + 1, lang, "\n".join(lines[i + 1:j]) + "\n")
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        d = _DIRECTIVE.match(lines[k]) if k >= 0 else None
        if d:
            for part in (p.strip() for p in d.group(1).split(";") if p.strip()):
                word, _, arg = part.partition(" ")
                if word == "skip" and arg:
                    block.skip = arg
                elif word == "background" and arg:
                    block.background = arg
                elif word == "wait" and arg:
                    block.wait = arg
                elif word == "podman" and not arg:
                    block.podman = True
                else:
                    raise ValueError(f"README line {k + 1}: unknown readme-test directive {part!r} "
                                     "(skip REASON, background URL, wait URL, podman)")
                block.directives.append(part)
        out.append(block)
        i = j + 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ca_mounts() -> str:
    """The README's hint for pip behind a TLS-inspecting proxy (host CA bundle and a pip.conf
    mounted into the build), where ``scripts/podman_setup.sh`` found this machine needs it."""
    pip_conf = Path(os.environ.get("LOOKALIKE_CTR_DIR", "/tmp/lookalike-ctr")) / "pip.conf"
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if pip_conf.is_file() and ca.is_file():
        return f"-v {ca}:/run/host-ca.crt:ro -v {pip_conf}:/etc/pip.conf:ro "
    return ""


def substitutions(data: Path, port: int) -> list[tuple[str, str]]:
    """(regex, replacement) pairs applied to every running block, in order (the port last)."""
    return [
        (r"\bpodman build ", "podman build " + ca_mounts()),
        (r"(?<![\w/.])\.\./shared/data/cub100", str(data)),
        (r"--budget \S+", f"--budget {BUDGET}"),
        (r"--epochs \d+", "--epochs 1"),
        (r"--steps \d+", "--steps 10"),
        (r"--factory IVF\d+,", "--factory IVF4,"),
        (r"(?<!\d{4}:)\b8000\b", str(port)),  # not a container's own port (-p 127.0.0.1:8000:8000)
    ]


#: What the substitutions stand for (printed with the test's output).
SUBSTITUTIONS = ("../shared/data/cub100 -> a generated 20x25 ImageFolder (one corrupt JPEG, one .txt, no class lists)",
                 f"--budget X -> --budget {BUDGET}", "--epochs N -> --epochs 1", "--steps N -> --steps 10",
                 "--factory IVF<n>, -> --factory IVF4, (the stand-in photos/ has 64 images)", "port 8000 -> a free port", "podman build -> + the README's CA-bundle mounts where this machine needs them")


def stand_ins(work: Path) -> Path:
    """Write the user's files the README names into ``work``; returns the dataset root."""
    from PIL import Image

    from tests.helpers import make_image_folder

    data = work / "data" / "birds"
    make_image_folder(data / "images", n_classes=20, per_class=25, size=64, kind="pattern", seed=7)
    (data / "images" / "class_03" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 300)  # cut short
    (data / "images" / "class_05" / "notes.txt").write_text("a note someone left among the photos\n")
    photos = make_image_folder(work / "photos", n_classes=3, per_class=20, size=64, kind="pattern", seed=8)
    make_image_folder(photos / "more", n_classes=1, per_class=4, size=64, kind="pattern", seed=9)
    src = sorted((data / "images" / "class_00").glob("*.jpg"))
    for name, path in zip(("bird.jpg", "gull.jpg", "new.jpg", "query.jpg"), src):
        Image.open(path).convert("RGB").resize((96, 96)).save(work / name, quality=92)
    return data


def scratch_copy(work: Path) -> None:
    """Copy the repository's tracked and untracked (not ignored) files into ``work``, keeping
    modification times (``scripts/setup`` compares them), and link the ``.venv``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if not src.is_file():  # deleted in the work tree
            continue
        dst = work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    venv_current(REPO)
    (work / ".venv").symlink_to(REPO / ".venv")


#: Written by ``scripts/setup`` after it installed the project into ``.venv``.
STAMP = ".venv/.lookalike-installed"


def venv_current(repo: Path) -> None:
    """Refuse to run on a ``.venv`` older than ``pyproject.toml``: the scratch copy links that venv,
    and ``scripts/setup`` in the README's quick start would otherwise reinstall the project from the
    scratch copy, pointing the developer's editable install at a folder pytest later deletes.

    Raises:
        RuntimeError: naming the command that brings the venv up to date.
    """
    stamp = repo / STAMP
    if not stamp.is_file() or (repo / "pyproject.toml").stat().st_mtime > stamp.stat().st_mtime:
        raise RuntimeError(f"{repo / '.venv'} is older than pyproject.toml: run scripts/setup first (the README "
                           "run links this venv and must not reinstall the project from its scratch copy)")


def podman_reason() -> str | None:
    """Why the podman blocks cannot run here (None: they can)."""
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/podman_setup.sh installs it)"
    if os.geteuid() != 0:
        return "podman builds and runs the image as root on these machines"
    probe = subprocess.run(["podman", "image", "exists", "docker.io/library/debian:bookworm-slim"],
                           capture_output=True)
    if probe.returncode != 0:
        return "the base image is not in podman's store (run scripts/podman_setup.sh)"
    return None


def podman_env() -> dict[str, str]:
    """This machine's podman configuration, as ``scripts/podman_setup.sh`` leaves it (runc,
    cgroupfs: podman's own defaults fail here); empty where it was not run."""
    conf = Path(os.environ.get("LOOKALIKE_CTR_DIR", "/tmp/lookalike-ctr")) / "containers.conf"
    if "CONTAINERS_CONF" in os.environ:
        return {"CONTAINERS_CONF": os.environ["CONTAINERS_CONF"]}
    return {"CONTAINERS_CONF": str(conf)} if conf.is_file() else {}


_WAIT = """readme_wait() {  # URL: poll until it answers 200 (120 s)
  for _ in $(seq 240); do command curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.5; done
  echo "README runner: $1 did not answer within 120 s" >&2; return 1
}
readme_stop_servers() {
  for pid in "${README_SERVERS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  README_SERVERS=()
  command podman rm -f lookalike >/dev/null 2>&1 || true
}
"""


def _last_command_start(code: str) -> int:
    """Index in ``code`` where its last logical command starts (continuation lines joined)."""
    lines = code.rstrip("\n").split("\n")
    i = len(lines) - 1
    while i > 0 and lines[i - 1].rstrip().endswith("\\"):
        i -= 1
    return sum(len(ln) + 1 for ln in lines[:i])


def script(blocks: list[Block], subs: list[tuple[str, str]], *, podman_skip: str | None) -> tuple[str, list[str]]:
    """The bash script that runs ``blocks`` in order, and the list of notes on what was skipped."""
    out = ["set -euo pipefail", "README_SERVERS=()", _WAIT,
           "curl() { command curl --fail-with-body \"$@\"; }",
           "trap 'readme_stop_servers' EXIT",
           "trap 'echo \"README runner: the block at README line $README_LINE failed: $BASH_COMMAND\" >&2' ERR"]
    notes = []
    for b in blocks:
        if b.lang not in RUNS:
            continue
        if b.skip:
            notes.append(f"line {b.line}: skipped: {b.skip}")
            continue
        if b.podman and podman_skip:
            notes.append(f"line {b.line}: skipped: {podman_skip}")
            continue
        code = b.code
        for pattern, repl in subs:
            code = re.sub(pattern, repl, code)
        out.append(f"README_LINE={b.line}; echo '--- README line {b.line} ({b.lang})' >&2")
        if b.background or b.wait:
            out.append("readme_stop_servers")
        if b.lang == "python":
            out.append(f"python - <<'README_PY_{b.line}'\n{code}README_PY_{b.line}")
        elif b.background:
            cut = _last_command_start(code)
            out.append(code[:cut])
            out.append(code[cut:].rstrip("\n") + " &\nREADME_SERVERS+=($!)")
        else:
            out.append(code)
        if b.background or b.wait:
            out.append(f"readme_wait {re.sub(subs[-1][0], subs[-1][1], b.background or b.wait)}")
    out.append("echo 'README runner: every block passed' >&2")
    return "\n".join(out) + "\n", notes
