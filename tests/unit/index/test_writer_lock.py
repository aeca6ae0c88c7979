"""The single-writer lock holds across a refused second open in the same process (issue 12):
closing any descriptor of the lock file drops the process's POSIX lock, so the refusal must not
open it; and another process cannot take the lock while it is held."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from index.errors import IndexLockedError
from index.locking import WriterLock

REPO = Path(__file__).resolve().parents[3]

_OTHER = r"""
import sys
from index.errors import IndexLockedError
from index.locking import WriterLock
lock = WriterLock(sys.argv[1])
try:
    lock.acquire()
except IndexLockedError as exc:
    print("locked:", exc)
    sys.exit(3)
print("acquired")
lock.release()
"""


def _other_process_tries(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _OTHER, str(directory)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_refused_second_open_keeps_the_first_lock(tmp_path):
    first = WriterLock(tmp_path)
    first.acquire()
    try:
        for _ in range(3):  # each refusal used to drop the first writer's lock
            with pytest.raises(IndexLockedError, match="in this process"):
                WriterLock(tmp_path).acquire()
        assert first.held
        out = _other_process_tries(tmp_path)
        assert out.returncode == 3 and "locked" in out.stdout, out.stdout + out.stderr
        assert "pid " in out.stdout  # the refusal names the holder
    finally:
        first.release()
    out = _other_process_tries(tmp_path)
    assert out.returncode == 0 and "acquired" in out.stdout, out.stdout + out.stderr


def test_store_level_second_writable_open_keeps_the_lock(tmp_path, card, rng):
    from index import IndexStore

    store = IndexStore.create(tmp_path / "idx", card=card, images_root=tmp_path)
    try:
        with pytest.raises(IndexLockedError):
            IndexStore.open(tmp_path / "idx", card=card, writable=True)
        out = _other_process_tries(tmp_path / "idx")
        assert out.returncode == 3, out.stdout + out.stderr
    finally:
        store.close()
