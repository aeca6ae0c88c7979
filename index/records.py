"""Plain value types returned by the index."""

from __future__ import annotations

from dataclasses import dataclass

#: Where a record's image lives: ``folder`` (under the index's images_root) or ``upload``
#: (stored inside the index directory under ``uploads/``).
SOURCES = ("folder", "upload")


@dataclass(frozen=True)
class SearchHit:
    """One ranked result: a stable id, its cosine similarity, and display metadata."""

    id: int  #: stable int64 id, never -1
    score: float  #: cosine similarity in [-1, 1], higher first
    path: str  #: path relative to the record's root (as stored)
    label: str | None


@dataclass(frozen=True)
class ImageRecord:
    """Metadata of one indexed image (its vector lives in the store, not here)."""

    id: int
    path: str
    label: str | None
    sha256: str
    size: int
    mtime: float
    added_at: float
    source: str  #: "folder" or "upload"
