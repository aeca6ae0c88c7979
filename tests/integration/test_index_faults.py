"""Fault tests of the index with real processes killed by SIGKILL.

* a batch job killed at several points and re-run indexes every file exactly once;
* a writer killed between (and during) acknowledged adds/deletes loses nothing it acknowledged
  and resurrects nothing it deleted;
* a second writer process is refused while the first lives, and admitted once it is killed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from index import IndexStore
from tests.unit.index.helpers import make_card, save_tiny_model, write_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m")

REPO = Path(__file__).resolve().parents[2]

# `lookalike index ...` with only the index commands registered, so these tests do not depend on
# the other packages' CLIs importing; errors are handled as the real dispatcher does.
LAUNCH = textwrap.dedent("""
    import argparse, logging, sys
    from index import cli
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="lookalike")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(sys.argv[1:])
    try:
        sys.exit(args.func(args))
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"lookalike: error: {exc}", file=sys.stderr)
        sys.exit(2)
""")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _spawn(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCH, *args], cwd=REPO, env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _kill9(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGKILL)  # the job and its DataLoader workers, as `kill -9` of a job would
    p.wait(timeout=30)


def _rows(index_dir: Path) -> int:
    db = index_dir / "meta.sqlite"
    if not db.exists() or not (index_dir / "store.json").exists():
        return -1
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT count(*) FROM images").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def test_batch_job_killed_anywhere_then_rerun_indexes_every_file_exactly_once(tmp_path, tiny_model):
    root = tmp_path / "images"
    files = write_images(root, {f"c{i}": 20 for i in range(6)}, size=(40, 48))
    out = tmp_path / "ix"
    args = ["index", "build", "--model", str(tiny_model), "--images", str(root), "--out", str(out),
            "--labels-from-folders", "--batch-size", "4", "--workers", "2", "--no-progress", "--no-bf16"]
    # kill points: during start-up/creation, then after various numbers of committed rows
    kills = [("time", 0.0), ("time", 1.5), ("rows", 8), ("rows", 40), ("rows", 64), ("rows", 100)]
    seen_rows = []
    for kind, when in kills:
        p = _spawn(args)
        t0 = time.monotonic()
        while p.poll() is None:
            n = _rows(out)
            if (kind == "time" and time.monotonic() - t0 >= when) or (kind == "rows" and n >= when):
                break
            if time.monotonic() - t0 > 120:
                break
            time.sleep(0.02)
        finished = p.poll() is not None
        if not finished:
            _kill9(p)
        seen_rows.append((kind, when, _rows(out), "finished" if finished else "killed"))
    p = _spawn(args)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    assert any(s[3] == "killed" and s[2] > 0 for s in seen_rows), seen_rows  # some kills hit mid-job

    store = IndexStore.open(out, writable=True)
    rel = sorted(f.relative_to(root).as_posix() for f in files)
    con = sqlite3.connect(out / "meta.sqlite")
    paths = [r[0] for r in con.execute("SELECT path FROM images ORDER BY path")]
    con.close()
    assert paths == rel  # every file exactly once
    assert len(store) == len(rel)
    ids = [store.get_by_path(p).id for p in rel]
    vecs = np.stack([store.vector(i) for i in ids])
    assert [row[0].id for row in store.search(vecs, 1)] == ids  # FAISS agrees with the metadata
    store.close()
    # and a run after completion adds nothing
    p = _spawn(args)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and f"added 0, unchanged {len(rel)}" in log, log


WRITER = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    from index import IndexStore
    d, seed = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(seed)
    s = IndexStore.open(d, writable=True)
    print("OPEN", flush=True)
    ids = []
    for b in range(10_000):
        v = rng.standard_normal((5, 16)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        recs = [{"path": f"s{seed}/{b}/{i}.jpg", "label": None, "size": 1, "mtime": 0.0, "source": "folder",
                 "sha256": hashlib.sha256(f"{seed}/{b}/{i}".encode()).hexdigest()} for i in range(5)]
        new = s.add(v, recs)
        print("ADD", ",".join(map(str, new)), flush=True)
        ids += new
        if b % 3 == 2:
            gone = [ids.pop(int(rng.integers(len(ids)))) for _ in range(2)]
            print("DELETING", ",".join(map(str, gone)), flush=True)  # intent: may land unacknowledged
            s.remove(gone)
            print("DEL", ",".join(map(str, gone)), flush=True)
        if b % 7 == 6:
            s.checkpoint()
            print("CKPT", flush=True)
""")


def test_writer_killed_between_acknowledged_writes_loses_nothing(tmp_path):
    d = tmp_path / "ix"
    IndexStore.create(d, card=make_card(), images_root=None).close()
    acked_add: set[int] = set()
    acked_del: set[int] = set()
    intended_del: set[int] = set()
    for round_, kill_after in enumerate([3, 11, 25, 40, 17]):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(round_)], cwd=REPO, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        acks = 0

        def note(line: str) -> int:
            op, _, rest = line.strip().partition(" ")
            if op == "ADD":
                acked_add.update(int(x) for x in rest.split(","))
            elif op == "DEL":
                acked_del.update(int(x) for x in rest.split(","))
            elif op == "DELETING":
                intended_del.update(int(x) for x in rest.split(","))
            return int(op in ("ADD", "DEL", "CKPT"))

        while acks < kill_after:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            acks += note(line)
        _kill9(p)  # lands wherever the writer is: mid-add, mid-delete, mid-checkpoint
        # what it printed before dying was acknowledged too; a last line without its newline was cut
        # by the kill mid-print and is not an acknowledgement
        for line in p.stdout.read().splitlines(keepends=True):
            if line.endswith("\n") and line.strip():
                note(line)
        s = IndexStore.open(d)
        live = acked_add - acked_del - (intended_del - acked_del)  # an in-flight delete may or may not be done
        con = sqlite3.connect(d / "meta.sqlite")
        db_ids = {r[0] for r in con.execute("SELECT id FROM images")}
        con.close()
        assert live <= db_ids, f"round {round_}: acknowledged adds lost: {sorted(live - db_ids)[:5]}"
        assert not (acked_del & db_ids), f"round {round_}: deleted ids resurrected"
        # the FAISS side equals the metadata (an unacknowledged in-flight add may be in both)
        assert len(s) == len(db_ids)
        vecs = np.stack([s.vector(i) for i in sorted(db_ids)])
        found = {h.id for row in s.search(vecs, 1) for h in row}
        assert found == db_ids
        acked_add |= db_ids - acked_add  # a committed-but-unacknowledged add is real state from now on
        acked_del |= (intended_del - db_ids)  # likewise a committed-but-unacknowledged delete
        s.close()
    info = IndexStore.open(d).info()
    assert info["generation"] >= 2 and info["ntotal"] == len(db_ids)


HOLDER = textwrap.dedent("""
    import sys, time
    from index import IndexStore
    s = IndexStore.open(sys.argv[1], writable=True)
    print("LOCKED", flush=True)
    time.sleep(120)
""")


def test_second_writer_process_refused_until_the_first_dies(tmp_path, tiny_model):
    d = tmp_path / "ix"
    IndexStore.create(d, card=make_card(), images_root=tmp_path).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert holder.stdout.readline().strip() == "LOCKED"
    from index import IndexLockedError

    with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
        IndexStore.open(d, writable=True)
    p = _spawn(["index", "checkpoint", str(d)])
    log, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and "another writer holds the index lock" in log, log
    r = IndexStore.open(d)  # readers are never blocked
    assert json.loads(json.dumps(r.info()))["ntotal"] == 0
    r.close()
    _kill9(holder)
    IndexStore.open(d, writable=True).close()  # the kernel released the dead writer's lock
