#!/usr/bin/env python3
"""Mutation testing: single-line AST mutants of a core file, each run against its unit tests.

Why our own script and not mutmut 3 or cosmic-ray: mutmut 3 rewrites functions into
trampolines in a ``mutants/`` copy and runs pytest with ``--import-mode=append`` (ours is
``importlib``), and it cannot mutate module-level constants; cosmic-ray needs a session
database and a config per file. Here a mutant is one edited line (or one statement replaced by
``pass``), applied to a private copy of the source tree, and the file's own tests run on that
copy in a child forked from a warm interpreter (torch, faiss, pytest already imported; no project
module is), with a per-mutant timeout. A mutant is *killed* when the tests fail
or time out, *survived* when they pass.

Operators (each applied to one node on one line):

- comparisons: ``<``/``<=``, ``>``/``>=``, ``==``/``!=``, ``in``/``not in``, ``is``/``is not``;
- ``and``/``or``; ``not x`` -> ``x``;
- arithmetic: ``+``/``-``, ``*``/``/``, ``//``/``*``, ``%``/``*``, and each operand dropped
  (``a + b`` -> ``a`` and -> ``b``);
- constants: an int ``n`` -> ``n + 1``, a float ``x`` -> ``x + 1`` (``0.0`` -> ``1.0``),
  ``True``/``False`` flipped;
- statements: a ``raise``, a call statement, an ``assert``, an augmented assignment, a
  ``continue``/``break`` replaced by ``pass``; an ``if`` test replaced by ``False``.

Strings, docstrings, f-strings, annotations and logger calls are not mutated (their mutants
are equivalent by construction).

Known equivalent mutants are listed in ``docs/mutation.md`` under "Equivalent mutants", one
per line as ``path:line | mutated source`` with the argument after `` -- ``; the script reads that
list and reports them apart, so the kill rate is over non-equivalent mutants.

Usage (CPU heavy: it runs the tests once per mutant)::

    nice -n 19 .venv/bin/python scripts/mutate.py training/losses.py
    nice -n 19 .venv/bin/python scripts/mutate.py --all --jobs 2 --json artifacts/mutation.json
    .venv/bin/python scripts/mutate.py index/store.py --list      # the mutants, no test run
    .venv/bin/python scripts/mutate.py index/store.py --lines 120-180

Exit status: 0 when every file meets ``--target`` (default 0.9) of non-equivalent mutants
killed, 1 otherwise, 2 on a bad argument or when the unmutated tests fail.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The unit tests that state each core file's behaviour (run for every mutant of that file).
TESTS: dict[str, list[str]] = {
    "training/losses.py": ["tests/unit/training/test_losses.py", "tests/unit/training/test_loss_boundaries.py",
                           "tests/unit/training/test_xbm.py"],
    "training/miners.py": ["tests/unit/training/test_miners.py", "tests/unit/training/test_loss_boundaries.py"],
    "training/metrics.py": ["tests/unit/training/test_metrics.py"],
    "index/store.py": ["tests/unit/index"],
    "service/uploads.py": [
        "tests/unit/service/test_uploads.py",
        "tests/unit/service/test_upload_catalogue.py",
        "tests/unit/service/test_search_api.py",
        "tests/unit/service/test_api_errors.py",
        "tests/unit/service/test_error_contract.py",
    ],
}

#: What the private copy of the tree holds (source packages, tests, pytest config).
COPY = ("models", "training", "index", "service", "lookalike", "bench", "tests", "pyproject.toml")

EQUIVALENT_DOC = REPO / "docs" / "mutation.md"

_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
             ast.FloorDiv: ast.Mult, ast.Mod: ast.Mult, ast.Pow: ast.Mult}


@dataclass(frozen=True)
class Mutant:
    path: str        # repository-relative file
    line: int        # 1-based first line of the edit
    op: str          # operator name
    original: str    # the original source line(s), stripped
    mutated: str     # the mutated source line(s), stripped
    source: str      # the whole mutated file
    stmt: tuple[int, int] = (0, 0)  # lines of the enclosing statement (which tests reach it)

    @property
    def key(self) -> str:
        return f"{self.path}:{self.line} | {self.mutated}"


@dataclass
class Result:
    path: str
    line: int
    op: str
    original: str
    mutated: str
    status: str      # killed | timeout | survived | unreached (no test runs the line) | equivalent
    seconds: float


def _skip_ranges(tree: ast.Module) -> list[tuple[int, int]]:
    """Line ranges never mutated: docstrings, annotations' lines are handled per node."""
    ranges = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                ranges.append((body[0].lineno, body[0].end_lineno))
    return ranges


def _is_logger_call(node: ast.AST) -> bool:
    call = node.value if isinstance(node, ast.Expr) else node
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
        return False
    target = call.func.value
    name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
    return name in {"log", "logger", "_log", "LOG", "warnings"} or call.func.attr in {"warn"}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _excluded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside an f-string, an annotation, a logger call, or a default-less decorator."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.JoinedStr) or _is_logger_call(parent):
            return True
        if isinstance(parent, (ast.arg, ast.AnnAssign)) and child is getattr(parent, "annotation", None):
            return True
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)) and child is parent.returns:
            return True
        child, parent = parent, parents.get(parent)
    return False


def _expr_variants(node: ast.expr) -> list[tuple[str, ast.expr]]:
    out: list[tuple[str, ast.expr]] = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swap = _CMP_SWAP.get(type(op))
            if swap:
                new = copy.deepcopy(node)
                new.ops[i] = swap()
                out.append((f"{type(op).__name__}->{swap.__name__}", new))
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(("and<->or", new))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("drop-not", copy.deepcopy(node.operand)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        out.append(("drop-minus", copy.deepcopy(node.operand)))
    elif isinstance(node, ast.BinOp):
        swap = _BIN_SWAP.get(type(node.op))
        if swap:
            new = copy.deepcopy(node)
            new.op = swap()
            out.append((f"{type(node.op).__name__}->{swap.__name__}", new))
        if not isinstance(node.op, (ast.BitOr, ast.BitAnd, ast.MatMult)):
            out.append(("drop-right", copy.deepcopy(node.left)))
            out.append(("drop-left", copy.deepcopy(node.right)))
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            out.append(("flip-bool", ast.Constant(not value)))
        elif isinstance(value, int):
            out.append(("int+1", ast.Constant(value + 1)))
        elif isinstance(value, float):
            out.append(("float+1", ast.Constant(value + 1.0)))
    return out


def _stmt_variants(node: ast.stmt) -> list[tuple[str, str]]:
    """Statement mutants as replacement text for the statement's lines."""
    if isinstance(node, (ast.Raise, ast.Assert, ast.AugAssign, ast.Continue, ast.Break)):
        return [(f"delete-{type(node).__name__.lower()}", "pass")]
    if isinstance(node, ast.Expr) and isinstance(node.value, (ast.Call, ast.Await)) and not _is_logger_call(node):
        return [("delete-call", "pass")]
    return []


def generate(path: str) -> list[Mutant]:
    """Every single-line mutant of ``path`` (repository-relative) that compiles and differs."""
    text = (REPO / path).read_text()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text)
    parents = _parents(tree)
    skip = _skip_ranges(tree)
    original_dump = ast.dump(tree)
    seen: set[str] = set()
    mutants: list[Mutant] = []

    def in_skip(lineno: int) -> bool:
        return any(a <= lineno <= b for a, b in skip)

    def stmt_of(node: ast.AST) -> tuple[int, int]:
        while node is not None and not isinstance(node, ast.stmt):
            node = parents.get(node)
        return (node.lineno, node.end_lineno) if node is not None else (0, 0)

    def emit(op: str, first: int, last: int, new_lines: list[str], stmt: tuple[int, int]) -> None:
        source = "".join(lines[: first - 1] + new_lines + lines[last:])
        try:
            new_tree = ast.parse(source)
            compile(source, path, "exec")
        except SyntaxError:
            return
        if ast.dump(new_tree) == original_dump:
            return
        original = " ".join(l.strip() for l in lines[first - 1:last])
        mutated = " ".join(l.strip() for l in new_lines if l.strip())
        m = Mutant(path, first, op, original, mutated, source, stmt)
        if m.key in seen:
            return
        seen.add(m.key)
        mutants.append(m)

    for node in ast.walk(tree):
        lineno = getattr(node, "lineno", None)
        if lineno is None or in_skip(lineno) or _excluded(node, parents):
            continue
        if isinstance(node, ast.expr):
            if node.lineno != node.end_lineno or isinstance(getattr(node, "ctx", None), (ast.Store, ast.Del)):
                continue
            if isinstance(node, ast.Constant) and isinstance(parents.get(node), ast.UnaryOp):
                pass
            line = lines[node.lineno - 1]
            raw = line.encode()
            head, tail = raw[: node.col_offset].decode(), raw[node.end_col_offset:].decode()
            for op, new in _expr_variants(node):
                ast.fix_missing_locations(new)
                emit(op, node.lineno, node.lineno, [f"{head}({ast.unparse(new)}){tail}"], stmt_of(node))
        elif isinstance(node, ast.stmt):
            indent = re.match(r"\s*", lines[node.lineno - 1]).group(0)
            for op, repl in _stmt_variants(node):
                if node.col_offset != len(indent.expandtabs()):
                    continue  # a statement after ';' on one line: leave it
                blank = ["\n"] * (node.end_lineno - node.lineno)
                emit(op, node.lineno, node.end_lineno, [f"{indent}{repl}\n", *blank],
                     (node.lineno, node.end_lineno))
            if isinstance(node, (ast.If, ast.While)) and node.test.lineno == node.test.end_lineno:
                line = lines[node.test.lineno - 1]
                raw = line.encode()
                head, tail = raw[: node.test.col_offset].decode(), raw[node.test.end_col_offset:].decode()
                emit("if-false", node.test.lineno, node.test.lineno, [f"{head}False{tail}"],
                     (node.test.lineno, node.test.end_lineno))
    mutants.sort(key=lambda m: (m.line, m.op, m.mutated))
    return mutants


def read_equivalent(doc: Path = EQUIVALENT_DOC) -> dict[str, str]:
    """``key -> argument`` from the "Equivalent mutants" list in docs/mutation.md."""
    if not doc.exists():
        return {}
    out = {}
    for line in doc.read_text().splitlines():
        m = re.match(r"^- `(?P<key>[^`]+)` -- (?P<why>.+)$", line.strip())
        if m:
            out[m["key"]] = m["why"]
    return out


#: Imported once by the parent so that each forked mutant run starts warm. Importing them runs
#: no parallel region, so no OpenMP thread pool exists yet when the parent forks.
PRELOAD = ("numpy", "torch", "torchvision", "faiss", "PIL.Image", "starlette.applications", "fastapi",
           "fastapi.testclient", "httpx", "pydantic", "safetensors.torch", "yaml", "pytest", "hypothesis",
           "pytorch_metric_learning.losses", "pytorch_metric_learning.miners")


class LineTrace:
    """pytest plugin for the baseline run: which tests execute each line of the target file.

    A trace function on every thread, local to the target file's frames; lines run outside any
    test (at import) are kept apart, since every test depends on them."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)
        self.current: str | None = None
        self.hits: dict[int, set[str]] = {}
        self.import_lines: set[int] = set()

    def _global(self, frame, event, arg):  # noqa: ANN001 - sys.settrace signature
        return self._local if frame.f_code.co_filename == self.target else None

    def _local(self, frame, event, arg):  # noqa: ANN001
        if event == "line":
            if self.current is None:
                self.import_lines.add(frame.f_lineno)
            else:
                self.hits.setdefault(frame.f_lineno, set()).add(self.current)
        return self._local

    def install(self) -> None:
        import threading

        sys.settrace(self._global)
        threading.settrace(self._global)

    def pytest_runtest_protocol(self, item, nextitem):  # noqa: ANN001 - pytest hook
        self.current = item.nodeid

    def pytest_runtest_logfinish(self, nodeid, location):  # noqa: ANN001 - pytest hook
        self.current = None

    def dump(self) -> dict:
        return {"hits": {str(k): sorted(v) for k, v in self.hits.items()}, "import": sorted(self.import_lines)}


class Sandbox:
    """A private copy of the tree; one mutant at a time is written into it and tested in a fork."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lookalike-mutate-"))
        for name in COPY:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, self.root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, self.root / name)
        self.pid: int | None = None
        self.started = 0.0
        self.path = ""
        self.original = ""

    def start(self, path: str, source: str | None, tests: list[str], trace: bool = False) -> None:
        """Write the mutant and fork a child that runs ``tests`` on it (no project module is
        imported in the parent, so the child imports the sandbox's)."""
        self.path, self.original = path, (REPO / path).read_text()
        (self.root / path).write_text(source if source is not None else self.original)
        self.started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # child
            code = 3
            try:
                os.setsid()
                if source is not None:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1)
                    os.dup2(devnull, 2)
                os.chdir(self.root)
                sys.path.insert(0, str(self.root))
                os.environ.update({"PYTHONPATH": str(self.root), "PYTHONDONTWRITEBYTECODE": "1",
                                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
                sys.dont_write_bytecode = True
                import torch
                torch.set_num_threads(1)
                import pytest
                plugins = []
                if trace:
                    tracer = LineTrace((self.root / path).resolve())
                    tracer.install()
                    plugins.append(tracer)
                code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests],
                                       plugins=plugins))
                if trace:
                    sys.settrace(None)
                    (self.root / "lines.json").write_text(json.dumps(tracer.dump()))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid

    def poll(self, timeout: float) -> tuple[str, float] | None:
        """None while the child runs; (status, seconds) once it ended or was killed."""
        assert self.pid is not None
        done, status = os.waitpid(self.pid, os.WNOHANG)
        secs = time.monotonic() - self.started
        if done == 0:
            if secs < timeout:
                return None
            try:
                os.killpg(self.pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            result = "timeout"
        else:
            result = "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
        self.pid = None
        (self.root / self.path).write_text(self.original)
        return result, secs

    def close(self) -> None:
        if self.pid is not None:
            try:
                os.killpg(self.pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def _wait(box: Sandbox, timeout: float) -> tuple[str, float]:
    while (out := box.poll(timeout)) is None:
        time.sleep(0.05)
    return out


def run_file(path: str, mutants: list[Mutant], jobs: int, equivalent: dict[str, str],
             progress: bool) -> list[Result]:
    tests = TESTS[path]
    boxes = [Sandbox() for _ in range(jobs)]
    try:
        boxes[0].start(path, None, tests, trace=True)
        status, base = _wait(boxes[0], 1800)
        if status != "survived":
            raise SystemExit(f"{path}: the unmutated tests fail ({' '.join(tests)}); fix them first")
        lines = json.loads((boxes[0].root / "lines.json").read_text())
        hits = {int(k): v for k, v in lines["hits"].items()}
        at_import = set(lines["import"])
        timeout = max(2 * base, base + 30)
        print(f"{path}: {len(mutants)} mutants, traced baseline {base:.1f} s, per-mutant timeout {timeout:.0f} s",
              file=sys.stderr)

        def selection(m: Mutant) -> list[str] | None:
            """The tests that run the mutated statement; all of them for import-time lines;
            None when no test reaches it."""
            span = range(m.stmt[0], m.stmt[1] + 1)
            nodes = sorted({t for line in span for t in hits.get(line, ())})
            if nodes:
                return nodes
            return tests if any(line in at_import for line in span) else None

        results: dict[int, Result] = {}
        todo = list(enumerate(mutants))
        running: dict[int, tuple[int, Mutant]] = {}
        while todo or running:
            for b, box in enumerate(boxes):
                while b not in running and todo:
                    i, m = todo.pop(0)
                    chosen = selection(m)
                    if chosen is None:  # no test executes this line: it survives without a run
                        st = "equivalent" if m.key in equivalent else "unreached"
                        results[i] = Result(m.path, m.line, m.op, m.original, m.mutated, st, 0.0)
                        continue
                    box.start(path, m.source, chosen)
                    running[b] = (i, m)
            for b, (i, m) in list(running.items()):
                out = boxes[b].poll(timeout)
                if out is None:
                    continue
                del running[b]
                st, secs = out
                if st == "survived" and m.key in equivalent:
                    st = "equivalent"
                results[i] = r = Result(m.path, m.line, m.op, m.original, m.mutated, st, round(secs, 1))
                if progress:
                    print(f"  [{len(results)}/{len(mutants)}] {r.status:10s} {path}:{r.line} {r.op}: "
                          f"{r.mutated}", file=sys.stderr, flush=True)
            time.sleep(0.05)
        return [results[i] for i in sorted(results)]
    finally:
        for box in boxes:
            box.close()


def summary(path: str, results: list[Result]) -> dict:
    killed = sum(r.status in ("killed", "timeout") for r in results)
    equivalent = sum(r.status == "equivalent" for r in results)
    unreached = sum(r.status == "unreached" for r in results)
    total = len(results)
    rate = killed / (total - equivalent) if total > equivalent else 1.0
    return {"file": path, "mutants": total, "killed": killed, "equivalent": equivalent,
            "survived": total - killed - equivalent, "unreached": unreached, "kill_rate": round(rate, 3)}


def _table(summaries: list[dict]) -> None:
    print("\n| file | killed | non-equivalent | equivalent | rate |\n|---|---|---|---|---|")
    for s in summaries:
        print(f"| {s['file']} | {s['killed']} | {s['mutants'] - s['equivalent']} | {s['equivalent']} "
              f"| {100 * s['kill_rate']:.0f}% |")


def _rescore(path: Path, equivalent: dict[str, str], target: float) -> int:
    """The table of an earlier run with the current equivalent list (survivors it names become
    equivalent; the rest are listed)."""
    data = json.loads(path.read_text())
    by_file: dict[str, list[Result]] = {}
    for r in data["results"]:
        res = Result(**r)
        key = f"{res.path}:{res.line} | {res.mutated}"
        if res.status in ("survived", "unreached", "equivalent"):
            res.status = "equivalent" if key in equivalent else ("survived" if res.status == "equivalent" else res.status)
            if res.status != "equivalent":
                print(f"SURVIVED {key}  (was: {res.original})")
        by_file.setdefault(res.path, []).append(res)
    summaries = [summary(p, rs) for p, rs in by_file.items()]
    _table(summaries)
    return 0 if all(s["kill_rate"] >= target for s in summaries) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help=f"core files to mutate (from: {', '.join(TESTS)})")
    ap.add_argument("--all", action="store_true", help="every core file")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--lines", help="only mutants whose line is in A-B")
    ap.add_argument("--sample", type=int, default=1, metavar="N",
                    help="every N-th mutant only (deterministic; the same N gives the same mutants)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--target", type=float, default=0.9, help="kill rate each file must reach (default 0.9)")
    ap.add_argument("--quiet", action="store_true", help="no per-mutant line")
    ap.add_argument("--recheck", type=Path, metavar="JSON",
                    help="run only the mutants that survived in an earlier --json (same source), with the "
                         "current tests; the others keep their earlier status")
    ap.add_argument("--rescore", type=Path, metavar="JSON",
                    help="no run: re-read the equivalent list and print the table of an earlier --json")
    args = ap.parse_args(argv)
    if args.rescore:
        return _rescore(args.rescore, read_equivalent(), args.target)
    files = list(TESTS) if args.all else args.files
    bad = [f for f in files if f not in TESTS]
    if not files or bad:
        ap.error(f"unknown or no file {bad or ''}; choose from {', '.join(TESTS)} or --all")
    if args.jobs < 1 or args.sample < 1:
        ap.error("--jobs and --sample must be at least 1")
    equivalent = read_equivalent()
    if not args.list:
        for name in PRELOAD:
            __import__(name)
    everything: list[Result] = []
    summaries = []
    for path in files:
        mutants = generate(path)
        if args.lines:
            lo, _, hi = args.lines.partition("-")
            mutants = [m for m in mutants if int(lo) <= m.line <= int(hi or lo)]
        mutants = mutants[:: args.sample]
        earlier: list[Result] = []
        if args.recheck:
            # matched by their text, not their line, so that edits elsewhere in the file do not
            # lose them; a survivor whose line was edited is gone (reported)
            old = [Result(**r) for r in json.loads(args.recheck.read_text())["results"] if r["path"] == path]
            survivors = [r for r in old if r.status in ("survived", "unreached")]
            earlier = [r for r in old if r.status not in ("survived", "unreached")]
            pool = generate(path)
            mutants = []
            for r in survivors:  # one-to-one: the same text, nearest line (a line can repeat elsewhere)
                same = [m for m in pool if (m.op, m.original, m.mutated) == (r.op, r.original, r.mutated)
                        and m not in mutants]
                if same:
                    mutants.append(min(same, key=lambda m: abs(m.line - r.line)))
                else:
                    print(f"GONE {path}:{r.line} {r.op}: {r.original}  =>  {r.mutated}  (its line changed)")
        if args.list:
            for m in mutants:
                tag = "  (equivalent)" if m.key in equivalent else ""
                print(f"{m.path}:{m.line} {m.op}: {m.original}  =>  {m.mutated}{tag}")
            continue
        results = earlier + run_file(path, mutants, args.jobs, equivalent, progress=not args.quiet)
        everything += results
        summaries.append(summary(path, results))
        for r in results:
            if r.status in ("survived", "unreached"):
                print(f"SURVIVED {r.path}:{r.line} {r.op}: {r.original}  =>  {r.mutated}")
    if args.list:
        return 0
    _table(summaries)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summaries, "results": [asdict(r) for r in everything]},
                                        indent=1))
    return 0 if all(s["kill_rate"] >= args.target for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
