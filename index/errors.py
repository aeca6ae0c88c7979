"""Errors raised by the index. All derive from :class:`IndexStoreError` (a ``RuntimeError``),
so the ``lookalike`` CLI prints them as one-line user errors."""

from __future__ import annotations


class IndexStoreError(RuntimeError):
    """Base class of every refusal raised by :mod:`index`."""


class IndexLockedError(IndexStoreError):
    """Another writer holds the index's single-writer lock; the message says who and where."""


class ModelMismatchError(IndexStoreError):
    """The model's fingerprint differs from the one the index was built with (both are named)."""


class CorruptIndexError(IndexStoreError):
    """A generation's files do not match their manifest (truncated, corrupt, or missing)."""


#: Alias spelled in the service contract.
IndexError_ = IndexStoreError
