"""lookalike.index: image embeddings in a persistent, crash-safe FAISS index.

Cosine similarity by construction (unit vectors + inner product), stable int64 ids, SQLite
metadata (the source of truth, vectors included), versioned atomic generations, a single
writer with concurrent searches, and the batch job that indexes folders of images.
"""

from index.errors import (CorruptIndexError, IndexFullError, IndexLockedError, IndexStoreError,
                          ModelMismatchError)
from index.records import ImageRecord, SearchHit
from index.store import IndexStore
from models.lazy import lazy_getattr

_LAZY = {
    "IngestReport": "index.ingest",
    "index_folder": "index.ingest",
    "Embedder": "index.ingest",
    "FeedbackRecord": "index.feedback",
    "add_feedback": "index.feedback",
    "read_feedback": "index.feedback",
}

__getattr__ = lazy_getattr("index", _LAZY)


__all__ = [
    "SearchHit", "ImageRecord", "IndexStore", "IndexStoreError", "IndexLockedError",
    "ModelMismatchError", "CorruptIndexError", "IndexFullError", *_LAZY,
]
