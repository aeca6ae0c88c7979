"""Relevance feedback: users' "right" / "wrong" marks on search results, kept beside the index.

A mark says that, for a query image, one result image is a right (same kind) or wrong match.
Training (``lookalike train --feedback INDEX``) turns wrong marks into hard negative pairs and
right marks into positive pairs. Storage, in the index directory:

* a ``feedback`` table in ``meta.sqlite`` (WAL, ``synchronous=FULL``): a mark is committed, and
  on disk, before :func:`add_feedback` returns. It is created on the first mark, so an index
  without feedback is unchanged, and lookalike versions that do not know it ignore it;
* ``feedback/<sha256>.<ext>``: uploaded query images (written atomically), and a hard link
  (or copy) of any marked image that lives in ``uploads/``, which deleting that image removes.

Each row copies the query's and the result's path, label, source and sha256 at write time, so
deleting an image from the index never breaks reading older feedback. Marks are appended,
never rewritten: :func:`read_feedback` gives, by default, the latest mark of each (query,
result) pair, so a corrected or repeated click counts once.

Torch-free: only SQLite and the standard library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from index.errors import IndexStoreError
from index.metadata import DB_FILE, _connect
from models.decode import image_ext
from models.io import atomic_write, fsync_dir

if TYPE_CHECKING:
    from index.store import IndexStore

log = logging.getLogger(__name__)

#: The verdicts a mark may carry.
VERDICTS = ("wrong", "right")
#: Folder in the index directory holding uploaded query images and kept copies of uploads.
FEEDBACK_DIR = "feedback"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('wrong', 'right')),
    query_id INTEGER,
    query_file TEXT,
    query_source TEXT CHECK (query_source IN ('folder', 'upload')),
    query_path TEXT,
    query_label TEXT,
    query_sha256 TEXT NOT NULL,
    result_id INTEGER NOT NULL,
    result_file TEXT,
    result_source TEXT NOT NULL CHECK (result_source IN ('folder', 'upload')),
    result_path TEXT NOT NULL,
    result_label TEXT,
    result_sha256 TEXT NOT NULL,
    CHECK (query_id IS NOT NULL OR query_file IS NOT NULL)
)""",
    "CREATE INDEX IF NOT EXISTS feedback_pair ON feedback (query_sha256, result_id)",
)

_COLS = ("id, created, verdict, query_id, query_file, query_source, query_path, query_label, query_sha256, "
         "result_id, result_file, result_source, result_path, result_label, result_sha256")

@dataclass(frozen=True)
class FeedbackRecord:
    """One mark, ready for training: absolute image paths, labels and the verdict."""

    id: int
    verdict: str                 #: "wrong" | "right"
    query_image: Path            #: absolute path of the query image (indexed, or the stored upload)
    query_label: str | None      #: label of the indexed query image; None for uploads
    result_image: Path           #: absolute path of the result image
    result_label: str | None
    query_id: int | None         #: None when the query was an uploaded image
    result_id: int


@dataclass(frozen=True)
class FeedbackRow:
    """One stored mark as written (paths relative to their roots), for listing."""

    id: int
    created: float               #: unix time
    verdict: str
    query_id: int | None
    query_file: str | None       #: copy inside the index directory (uploaded query, or an upload's copy)
    query_source: str | None     #: "folder" / "upload" for an indexed query; None for an uploaded one
    query_path: str | None
    query_label: str | None
    query_sha256: str
    result_id: int
    result_file: str | None
    result_source: str
    result_path: str
    result_label: str | None
    result_sha256: str


def _row(r: tuple) -> FeedbackRow:
    return FeedbackRow(id=int(r[0]), created=float(r[1]), verdict=r[2], query_id=None if r[3] is None else int(r[3]),
                       query_file=r[4], query_source=r[5], query_path=r[6], query_label=r[7], query_sha256=r[8],
                       result_id=int(r[9]), result_file=r[10], result_source=r[11], result_path=r[12],
                       result_label=r[13], result_sha256=r[14])


def check_verdict(verdict: str) -> str:
    """``verdict`` if it is one of :data:`VERDICTS`.

    Raises:
        ValueError: naming the bad value and the allowed ones.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not allowed; allowed: {list(VERDICTS)}")
    return verdict


def _has_table(con: sqlite3.Connection) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'feedback'").fetchone() is not None


def _keep_upload_copy(directory: Path, name: str) -> str:
    """Keep ``uploads/<name>`` alive as ``feedback/<name>`` (hard link, else copy); returns that
    path relative to ``directory``. Names are ``<sha256>.<ext>``, so an existing one is the same file."""
    from index.store import UPLOADS_DIR

    rel = f"{FEEDBACK_DIR}/{name}"
    dst = directory / rel
    if dst.is_file():
        return rel
    src = directory / UPLOADS_DIR / name
    dst.parent.mkdir(exist_ok=True)
    tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError:  # no hard links on this file system: copy
        tmp.unlink(missing_ok=True)
        atomic_write(dst, src.read_bytes())
    return rel


def add_feedback(store: IndexStore, *, verdict: str, result_id: int, query_id: int | None = None,
                 query_bytes: bytes | None = None) -> int:
    """Record one mark; durable (committed with ``synchronous=FULL``) before it returns.

    Args:
        store: a writable :class:`index.IndexStore` (its metadata writer serialises the write).
        verdict: ``"wrong"`` or ``"right"``.
        result_id: the indexed image that was shown as a result.
        query_id: the indexed image that was the query, or
        query_bytes: the uploaded query image (JPEG, PNG, GIF or WebP bytes), stored as
            ``feedback/<sha256>.<ext>``. Exactly one of ``query_id`` / ``query_bytes``.

    Returns:
        The new mark's id.

    Raises:
        ValueError: bad verdict, not exactly one query, query equal to the result, bytes that
            are not an image.
        KeyError: ``result_id`` or ``query_id`` is not indexed (the message names it).
        IndexStoreError: the store is read-only.
    """
    check_verdict(verdict)
    if (query_id is None) == (query_bytes is None):
        raise ValueError("give exactly one of query_id (an indexed image) and query_bytes (an uploaded image)")
    if not store.writable:
        raise IndexStoreError(f"{store.directory}: opened read-only; open with writable=True to record feedback")
    result_id = int(result_id)
    query_id = None if query_id is None else int(query_id)
    if query_id is not None and query_id == result_id:
        raise ValueError(f"query_id and result_id are the same image ({result_id})")
    directory = Path(store.directory)
    query_file = None
    query_sha = None
    if query_bytes is not None:
        if not query_bytes:
            raise ValueError("query_bytes is empty")
        ext = image_ext(query_bytes)
        query_sha = hashlib.sha256(query_bytes).hexdigest()
        query_file = f"{FEEDBACK_DIR}/{query_sha}.{ext}"
        target = directory / query_file
        if not target.is_file():  # content-addressed: an existing file holds these very bytes
            target.parent.mkdir(exist_ok=True)
            atomic_write(target, bytes(query_bytes))  # before the row that points to it
    cols = "id, path, label, sha256, source"
    with store.db.write_transaction() as con:
        for stmt in _SCHEMA:
            con.execute(stmt)
        res = con.execute(f"SELECT {cols} FROM images WHERE id = ?", (result_id,)).fetchone()
        if res is None:
            raise KeyError(f"no image with id {result_id}")
        qry = None
        if query_id is not None:
            qry = con.execute(f"SELECT {cols} FROM images WHERE id = ?", (query_id,)).fetchone()
            if qry is None:
                raise KeyError(f"no image with id {query_id}")
            query_sha = qry[3]
            if qry[4] == "upload":  # deleting the image would delete its file: keep it
                query_file = _keep_upload_copy(directory, qry[1])
        result_file = _keep_upload_copy(directory, res[1]) if res[4] == "upload" else None
        cur = con.execute(
            f"INSERT INTO feedback ({_COLS.partition(', ')[2]}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), verdict, query_id, query_file, qry[4] if qry else None, qry[1] if qry else None,
             qry[2] if qry else None, query_sha, result_id, result_file, res[4], res[1], res[2], res[3]))
        new_id = int(cur.lastrowid)
    log.info("feedback %d: %s result %d for query %s", new_id, verdict, result_id,
             query_id if query_id is not None else query_file)
    return new_id


def list_feedback(con: sqlite3.Connection, *, limit: int | None = None, offset: int = 0,
                  latest: bool = False) -> tuple[int, list[FeedbackRow]]:
    """Stored marks in ``con``'s view (a connection to ``meta.sqlite``), oldest first.

    ``latest``: only the newest mark of each (query image, result id) pair. Returns
    ``(total, rows)``: ``total`` counts every mark that matches, ``rows`` is the page
    ``offset .. offset+limit-1`` (all of them when ``limit`` is None).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if not _has_table(con):
        return 0, []
    where = ("WHERE id IN (SELECT max(id) FROM feedback GROUP BY query_sha256, result_id)" if latest else "")
    total = int(con.execute(f"SELECT count(*) FROM feedback {where}").fetchone()[0])
    rows = con.execute(f"SELECT {_COLS} FROM feedback {where} ORDER BY id LIMIT ? OFFSET ?",
                       (-1 if limit is None else int(limit), int(offset))).fetchall()
    return total, [_row(r) for r in rows]


def stored_files(con: sqlite3.Connection) -> list[str]:
    """Paths, relative to the index directory, of every image file the marks in ``con``'s view
    keep under ``feedback/`` (for backups: :func:`index.snapshot.snapshot`)."""
    if not _has_table(con):
        return []
    rows = con.execute("SELECT query_file FROM feedback WHERE query_file IS NOT NULL UNION "
                       "SELECT result_file FROM feedback WHERE result_file IS NOT NULL ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def _images_root(directory: Path) -> Path | None:
    from index.store import read_store_config

    root = read_store_config(directory).get("images_root")
    return Path(root) if root else None


def _image_path(directory: Path, images_root: Path | None, file: str | None, source: str | None,
                path: str | None, what: str) -> Path:
    from index.store import UPLOADS_DIR

    if file is not None:
        return directory / file
    if source == "upload":
        return directory / UPLOADS_DIR / str(path)
    if images_root is None:
        raise ValueError(f"{directory}: the index records no images root, so the {what} {path!r} cannot be "
                         "located; pass images_root=")
    return images_root / str(path)


def read_feedback(index_dir: str | Path, *, images_root: str | Path | None = None,
                  latest: bool = True) -> list[FeedbackRecord]:
    """Every mark of the index at ``index_dir``, oldest first, with absolute image paths.

    Opens ``meta.sqlite`` read-only, so it works while a server writes (it sees the marks
    committed when it starts). ``images_root`` overrides where the indexed folder's images are
    (as ``LOOKALIKE_IMAGES_ROOT`` does for the service). ``latest`` (default): only the newest
    mark of each (query image, result) pair, so a corrected or repeated click counts once;
    False gives every mark. The image files are not checked: a folder image deleted from disk
    since is still listed.

    Raises:
        FileNotFoundError: not an index.
    """
    directory = Path(index_dir).resolve()
    root = Path(images_root).resolve() if images_root is not None else _images_root(directory)
    con = _connect(directory / DB_FILE, readonly=True)
    try:
        con.execute("BEGIN")
        _, rows = list_feedback(con, latest=latest)
        con.execute("COMMIT")
    finally:
        con.close()
    return [FeedbackRecord(
        id=r.id, verdict=r.verdict,
        query_image=_image_path(directory, root, r.query_file, r.query_source, r.query_path, "query image"),
        query_label=r.query_label if r.query_id is not None else None,
        result_image=_image_path(directory, root, r.result_file, r.result_source, r.result_path, "result image"),
        result_label=r.result_label, query_id=r.query_id, result_id=r.result_id,
    ) for r in rows]
