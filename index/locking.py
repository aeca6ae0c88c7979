"""Locks: the single-writer file lock (across processes) and a readers-writer lock (threads)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from index.errors import IndexLockedError

LOCK_FILE = "writer.lock"


_HELD: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of lock files this process holds
_HELD_GUARD = threading.Lock()


class WriterLock:
    """An exclusive, non-blocking POSIX record lock (``fcntl.lockf``) on ``<directory>/writer.lock``.

    The kernel drops the lock when the holder dies (even by SIGKILL), so a crashed job never
    leaves a stale lock. POSIX locks belong to the process and are not inherited by forked
    children (unlike ``flock``), so DataLoader workers outliving a killed job cannot keep the
    index locked; a registry refuses a second writer inside the same process. The holder's pid,
    host, command and start time are written into the file so the refusal can say who holds it.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`IndexLockedError` naming the holder.

        A second acquire in the holding process is refused *without opening the file*: closing
        any descriptor of a file drops every POSIX lock the process holds on it, so the refusal
        itself used to release the first writer's lock and let another process take it.
        """
        with _HELD_GUARD:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) in _HELD:
                raise IndexLockedError(
                    f"{self.path.parent}: another writer in this process holds the index lock "
                    f"({_HELD[(st.st_dev, st.st_ino)]})"
                )
            # Not held by this process (checked under the guard, so no thread of ours opens it
            # meanwhile): opening and, on refusal, closing this descriptor drops no lock of ours.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                self._raise_locked(exc)
            _HELD[key] = f"pid {os.getpid()}: {' '.join(sys.argv)[:200]!r}"
        self._key = key
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def _raise_locked(self, exc: OSError) -> None:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise IndexLockedError(
                f"{self.path.parent}: another writer holds the index lock ({self._describe_holder()}); "
                "wait for it to finish (only one writer at a time; searches need no lock)"
            ) from None
        raise exc

    def _describe_holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "holder unknown"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return f"pid {info.get('pid')} on {info.get('host')} since {since}: {info.get('command', '?')!r}"

    def release(self) -> None:
        if self._fd is not None:
            with _HELD_GUARD:
                try:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN)
                finally:
                    os.close(self._fd)
                    self._fd = None
                    _HELD.pop(self._key, None)

    @property
    def held(self) -> bool:
        return self._fd is not None


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
