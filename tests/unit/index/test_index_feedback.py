"""Relevance feedback storage (index.feedback): round trip, refusals, uploads, deletes, concurrent
reads, reopening, and a mark acknowledged before SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from index import IndexStore, IndexStoreError
from index.feedback import FeedbackRecord, add_feedback, read_feedback

from .helpers import make_card, records, unit

REPO = Path(__file__).resolve().parents[3]


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path, rng):
    """A writable index of 6 folder images (labels a, a, a, b, b, b) under tmp_path/images."""
    root = tmp_path / "images"
    s = IndexStore.create(tmp_path / "idx", card=make_card(), images_root=root)
    s.add(unit(rng, 3), records(3, label="a"))
    s.add(unit(rng, 3), records(3, 3, label="b"))
    yield s
    s.close()


def test_round_trip_by_query_id(store, tmp_path):
    ids = [r.id for r in store.db.get_many(range(1, 7)).values()]
    assert ids == [1, 2, 3, 4, 5, 6]
    f1 = add_feedback(store, verdict="wrong", result_id=4, query_id=1)
    f2 = add_feedback(store, verdict="right", result_id=2, query_id=1)
    assert f2 > f1
    got = read_feedback(tmp_path / "idx")
    root = (tmp_path / "images").resolve()
    assert got == [
        FeedbackRecord(id=f1, verdict="wrong", query_image=root / "a/0.jpg", query_label="a",
                       result_image=root / "b/3.jpg", result_label="b", query_id=1, result_id=4),
        FeedbackRecord(id=f2, verdict="right", query_image=root / "a/0.jpg", query_label="a",
                       result_image=root / "a/1.jpg", result_label="a", query_id=1, result_id=2),
    ]
    assert all(r.query_image.is_absolute() and r.result_image.is_absolute() for r in got)
    # images_root override (e.g. where a container mounts the images)
    moved = read_feedback(tmp_path / "idx", images_root=tmp_path / "elsewhere")
    assert moved[0].query_image == (tmp_path / "elsewhere").resolve() / "a/0.jpg"


def test_columns_are_stored(store, tmp_path):
    add_feedback(store, verdict="wrong", result_id=5, query_id=2)
    with store.db.reader() as con:
        cols = [r[1] for r in con.execute("PRAGMA table_info(feedback)")]
        row = dict(zip(cols, con.execute("SELECT * FROM feedback").fetchone()))
    assert {"id", "created", "query_id", "query_file", "result_id", "verdict"} <= set(cols)
    assert row["query_id"] == 2 and row["query_file"] is None and row["result_id"] == 5
    assert row["verdict"] == "wrong" and abs(row["created"] - __import__("time").time()) < 60
    assert row["result_path"] == "b/4.jpg" and row["result_label"] == "b"
    assert row["result_sha256"] == hashlib.sha256(b"img4").hexdigest()


def test_refusals(store, tmp_path):
    with pytest.raises(ValueError, match="verdict 'maybe' is not allowed.*wrong.*right"):
        add_feedback(store, verdict="maybe", result_id=1, query_id=2)
    with pytest.raises(KeyError, match="no image with id 99"):
        add_feedback(store, verdict="wrong", result_id=99, query_id=2)
    with pytest.raises(KeyError, match="no image with id 77"):
        add_feedback(store, verdict="wrong", result_id=1, query_id=77)
    with pytest.raises(ValueError, match="exactly one"):
        add_feedback(store, verdict="wrong", result_id=1)
    with pytest.raises(ValueError, match="exactly one"):
        add_feedback(store, verdict="wrong", result_id=1, query_id=2, query_bytes=_png(1))
    with pytest.raises(ValueError, match="same image"):
        add_feedback(store, verdict="wrong", result_id=1, query_id=1)
    with pytest.raises(ValueError, match="not a JPEG, PNG"):
        add_feedback(store, verdict="wrong", result_id=1, query_bytes=b"II*\0 not an image we decode")
    assert read_feedback(tmp_path / "idx") == []
    assert not (tmp_path / "idx" / "feedback").exists()  # nothing half-written


def test_read_only_store_refuses_and_reader_without_marks(store, tmp_path):
    d = tmp_path / "idx"
    assert read_feedback(d) == []  # no feedback table yet
    ro = IndexStore.open(d, writable=False)
    try:
        with pytest.raises(IndexStoreError, match="read-only"):
            add_feedback(ro, verdict="wrong", result_id=1, query_id=2)
    finally:
        ro.close()
    with pytest.raises(FileNotFoundError, match="not a lookalike index"):
        read_feedback(tmp_path / "nothing")


def test_uploaded_query_is_stored_and_readable(store, tmp_path):
    data = _png(7)
    sha = hashlib.sha256(data).hexdigest()
    fid = add_feedback(store, verdict="wrong", result_id=3, query_bytes=data)
    again = add_feedback(store, verdict="right", result_id=1, query_bytes=data)  # same bytes: one file
    stored = tmp_path / "idx" / "feedback" / f"{sha}.png"
    assert stored.read_bytes() == data
    assert sorted(p.name for p in stored.parent.iterdir()) == [f"{sha}.png"]  # no temp files left
    got = {r.id: r for r in read_feedback(tmp_path / "idx")}
    assert got[fid].query_image == stored.resolve() and got[fid].query_image.read_bytes() == data
    assert got[fid].query_id is None and got[fid].query_label is None
    assert got[fid].result_label == "a" and got[again].verdict == "right"


def test_deleting_images_keeps_feedback_readable(store, tmp_path, rng):
    up = store.add_upload(_png(9), unit(rng, 1)[0], label="c", ext="png")
    add_feedback(store, verdict="wrong", result_id=up.id, query_id=1)
    add_feedback(store, verdict="right", result_id=2, query_id=up.id)
    add_feedback(store, verdict="wrong", result_id=5, query_id=4)
    assert store.remove([up.id, 4, 5]) == 3
    assert not (tmp_path / "idx" / "uploads" / up.path).exists()  # the index deleted its file
    got = read_feedback(tmp_path / "idx")
    assert [(r.query_id, r.result_id, r.verdict) for r in got] == [(1, up.id, "wrong"), (up.id, 2, "right"),
                                                                   (4, 5, "wrong")]
    # the uploaded image was kept for feedback: both marks point at a file with its bytes
    assert got[0].result_image.read_bytes() == _png(9) and got[0].result_label == "c"
    assert got[1].query_image == got[0].result_image and got[1].query_label == "c"
    # folder images: path and label as they were when marked
    assert got[2].query_label == "b" and got[2].result_image.name == "4.jpg"
    with pytest.raises(KeyError):  # but new marks need indexed images
        add_feedback(store, verdict="wrong", result_id=5, query_id=1)


def test_latest_mark_per_pair(store, tmp_path):
    add_feedback(store, verdict="right", result_id=4, query_id=1)
    last = add_feedback(store, verdict="wrong", result_id=4, query_id=1)  # corrected
    other = add_feedback(store, verdict="wrong", result_id=5, query_id=1)
    data = _png(3)
    add_feedback(store, verdict="wrong", result_id=4, query_bytes=data)
    up_last = add_feedback(store, verdict="wrong", result_id=4, query_bytes=data)  # clicked twice
    assert [r.id for r in read_feedback(tmp_path / "idx")] == [last, other, up_last]
    assert len(read_feedback(tmp_path / "idx", latest=False)) == 5


def test_survives_reopening(tmp_path, rng):
    d = tmp_path / "idx"
    s = IndexStore.create(d, card=make_card(), images_root=tmp_path)
    s.add(unit(rng, 3), records(3))
    first = add_feedback(s, verdict="wrong", result_id=2, query_id=1)
    s.close()
    s = IndexStore.open(d, writable=True)
    try:
        assert [r.id for r in read_feedback(d)] == [first]
        second = add_feedback(s, verdict="right", result_id=3, query_id=1)  # the table exists already
        s.checkpoint()
    finally:
        s.close()
    assert [(r.id, r.verdict) for r in read_feedback(d)] == [(first, "wrong"), (second, "right")]


def test_read_while_another_store_writes(store, tmp_path):
    """read_feedback opens its own read-only connection: it sees every committed mark and never
    blocks or fails while the writer keeps writing."""
    d = tmp_path / "idx"
    n = 60
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(n):
                add_feedback(store, verdict=("wrong", "right")[i % 2], result_id=1 + i % 5, query_id=6)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    seen = []
    while t.is_alive():
        seen.append(len(read_feedback(d, latest=False)))
    t.join()
    assert not errors, errors
    seen.append(len(read_feedback(d, latest=False)))
    assert seen == sorted(seen) and seen[-1] == n  # monotonic: only committed marks, never a partial one
    assert len(read_feedback(d)) == 5  # latest per (query, result) pair


def test_acknowledged_mark_survives_sigkill(store, tmp_path):
    d = tmp_path / "idx"
    store.close()
    script = (
        "import os, signal, sys\n"
        "from index import IndexStore\n"
        "from index.feedback import add_feedback\n"
        f"s = IndexStore.open({str(d)!r}, writable=True)\n"
        "i = add_feedback(s, verdict='wrong', result_id=4, query_id=1)\n"
        "print(i, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acked = int(proc.stdout.split()[0])
    assert [(r.id, r.verdict, r.query_id, r.result_id) for r in read_feedback(d)] == [(acked, "wrong", 1, 4)]
    # and the index still opens for writing (the killed writer's lock is gone)
    s = IndexStore.open(d, writable=True)
    s.close()
    assert not os.path.exists(d / "feedback")  # no uploads were involved


def test_cli_lists_counts_and_records(store, tmp_path, capsys):
    from lookalike.cli import main

    d = str(tmp_path / "idx")
    assert main(["index", "feedback", d]) == 0
    assert capsys.readouterr().out.startswith("0 marks (latest per query/result pair): 0 wrong, 0 right")
    add_feedback(store, verdict="right", result_id=4, query_id=1)
    add_feedback(store, verdict="wrong", result_id=4, query_id=1)  # supersedes the first
    add_feedback(store, verdict="right", result_id=2, query_id=1)
    add_feedback(store, verdict="wrong", result_id=5, query_bytes=_png(2))
    assert main(["index", "feedback", d]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 marks (latest per query/result pair): 2 wrong, 1 right"
    assert out[2].split() == ["2", "wrong", "#1", "[a]", "#4", "[b]"]
    assert out[4].split()[:3] == ["4", "wrong", "upload"] and out[4].split()[-2:] == ["#5", "[b]"]
    assert main(["index", "feedback", d, "--all", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["counts"] == {"wrong": 2, "right": 2} and len(body["records"]) == 4
    first = body["records"][0]
    assert (first["verdict"], first["query_id"], first["result_id"], first["result_label"]) == ("right", 1, 4, "b")
    assert first["result_image"] == str((tmp_path / "images").resolve() / "b/3.jpg")
    assert main(["index", "feedback", str(tmp_path / "none")]) == 2
    assert "not a lookalike index" in capsys.readouterr().err


def test_snapshot_and_restore_keep_the_marks(store, tmp_path, rng):
    from index.snapshot import restore, snapshot

    up = store.add_upload(_png(11), unit(rng, 1)[0], label="c", ext="png")
    add_feedback(store, verdict="wrong", result_id=up.id, query_bytes=_png(12))
    add_feedback(store, verdict="right", result_id=2, query_id=1)
    store.remove([up.id])  # its kept copy must still travel
    snapshot(tmp_path / "idx", tmp_path / "b.tar")
    restore(tmp_path / "b.tar", tmp_path / "r")
    got = read_feedback(tmp_path / "r")
    assert [(r.verdict, r.query_id, r.result_id) for r in got] == [("wrong", None, up.id), ("right", 1, 2)]
    assert got[0].query_image.read_bytes() == _png(12) and got[0].result_image.read_bytes() == _png(11)
    assert got[0].query_image.is_relative_to((tmp_path / "r").resolve())
