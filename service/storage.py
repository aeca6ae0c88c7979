"""A full index volume is answered clearly: free-space guard and disk-full detection.

* :class:`StorageGuard` reads the free space of the index volume (``statvfs``, microseconds) and
  refuses writes while it is under ``min_free_bytes`` (``LOOKALIKE_MIN_FREE_MB``), so the room
  left is kept for the index's own checkpoint. It is checked on every write and on ``/readyz``,
  so the service recovers by itself as soon as space is freed.
* :func:`is_disk_full` recognises ENOSPC / EDQUOT from the OS and SQLite's "database or disk is
  full", also when wrapped in another exception.

Either way the client gets ``507 insufficient_storage`` in the one JSON error shape, reads go on,
and ``/readyz`` reports ``writable: false``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from index.errors import is_disk_full

__all__ = ["MiB", "StorageGuard", "is_disk_full"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024

class StorageGuard:
    """Free space of the volume holding ``directory`` against ``min_free_bytes``."""

    def __init__(self, directory: str | Path, min_free_bytes: int) -> None:
        self.directory = Path(directory)
        self.min_free_bytes = int(min_free_bytes)

    def free_bytes(self) -> int | None:
        """Bytes an unprivileged writer may still use there; None if it cannot be read."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def low(self) -> bool:
        """True when the free space is under the guard (unknown free space is not low)."""
        free = self.free_bytes()
        return free is not None and free < self.min_free_bytes

    def message(self) -> str:
        free = self.free_bytes()
        have = "unknown" if free is None else f"{free / MiB:.1f} MB"
        return (f"the index volume is full: {have} free, writes need at least {self.min_free_bytes / MiB:.0f} MB "
                "(LOOKALIKE_MIN_FREE_MB); free space there and retry. Searches keep working")
