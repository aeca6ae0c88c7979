"""Errors raised by the index. All derive from :class:`IndexStoreError` (a ``RuntimeError``),
so the ``lookalike`` CLI prints them as one-line user errors."""

from __future__ import annotations

import errno
import sqlite3


class IndexStoreError(RuntimeError):
    """Base class of every refusal raised by :mod:`index`."""


class IndexLockedError(IndexStoreError):
    """Another writer holds the index's single-writer lock; the message says who and where."""


class ModelMismatchError(IndexStoreError):
    """The model's fingerprint differs from the one the index was built with (both are named)."""


class CorruptIndexError(IndexStoreError):
    """A generation's files do not match their manifest (truncated, corrupt, or missing)."""


class IndexFullError(IndexStoreError):
    """The index volume is full: what was added before is durable; free space and re-run."""


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) means the volume is full:
    ENOSPC / EDQUOT from the OS, or SQLite's "database or disk is full"."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.Error) and "full" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
