"""The metadata store: SQLite, the source of truth of an index.

One database ``meta.sqlite`` in WAL mode with ``synchronous=FULL``: a committed transaction is
on disk before :meth:`MetadataDB.add` / :meth:`MetadataDB.remove` return, so whatever the
index acknowledged survives a crash. It holds

* ``images``: id (INTEGER PRIMARY KEY AUTOINCREMENT: ids are never reused), path, label,
  sha256 (unique), size, mtime, added_at, source, and the float32 vector as a blob, so the
  FAISS index can be rebuilt without re-embedding;
* ``changes``: an append-only log ``(seq, op, id)`` of adds and deletes. A published FAISS
  generation records the ``seq`` it contains; opening replays the later changes.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from index.records import SOURCES, ImageRecord

log = logging.getLogger(__name__)

DB_FILE = "meta.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    label TEXT,
    sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    added_at REAL NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('folder', 'upload')),
    vector BLOB NOT NULL,
    UNIQUE (source, path)
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'del')),
    id INTEGER NOT NULL
);
"""

#: Lets a label filter find its ids without scanning the vectors. Compatible both ways: older
#: lookalike versions ignore it, and an index made before it gets it on its next writable open
#: (a read-only open of such an index still filters correctly, by a table scan).
_LABEL_INDEX = "CREATE INDEX IF NOT EXISTS images_label ON images (label)"

_RECORD_COLS = "id, path, label, sha256, size, mtime, added_at, source"


def _record(row: Sequence) -> ImageRecord:
    return ImageRecord(id=int(row[0]), path=row[1], label=row[2], sha256=row[3], size=int(row[4]),
                       mtime=float(row[5]), added_at=float(row[6]), source=row[7])


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to ``path``. ``readonly`` never writes: ``mode=ro`` while the directory is
    writable (WAL readers still see other processes' commits); on a read-only directory or mount
    (a container's ``:ro`` volume) WAL's shared-memory file cannot be made, so the database is
    opened ``immutable`` — a frozen view, which is what a read-only mount means anyway."""
    if readonly:
        if not os.access(path.parent, os.W_OK):
            log.info("%s is on a read-only location: opening it immutable", path)
            uri = f"file:{path}?mode=ro&immutable=1"
        else:
            uri = f"file:{path}?mode=ro"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False)
            con.execute("SELECT 1 FROM meta LIMIT 1")
        except sqlite3.Error as exc:
            raise PermissionError(f"{path}: cannot open the index metadata read-only ({exc})") from None
        con.execute("PRAGMA busy_timeout=30000")
        return con
    try:
        con = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA busy_timeout=30000")
    except sqlite3.Error as exc:
        raise PermissionError(f"{path}: cannot open the index metadata for writing ({exc}); "
                              "check that this user can write the index directory") from None
    return con


class MetadataDB:
    """Thread-safe access to ``meta.sqlite``: one write connection (serialised by a mutex) and
    a pool of read connections (WAL readers see the last committed state and never block)."""

    def __init__(self, path: Path, *, create: bool = False, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly and not create
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no metadata database")
        self._wcon = _connect(self.path, readonly=self.readonly)
        if create:
            self._wcon.execute("PRAGMA journal_mode=WAL")
            self._wcon.executescript(_SCHEMA)
            self._wcon.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        else:
            ver = self.get_meta("schema_version")
            if ver != str(SCHEMA_VERSION):
                raise ValueError(f"{self.path}: metadata schema version {ver}, this lookalike reads {SCHEMA_VERSION}")
        if not self.readonly:
            self._wcon.execute(_LABEL_INDEX)
        self._wlock = threading.Lock()
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = [self._wcon]

    # -- connections ---------------------------------------------------------------------
    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        try:
            con = self._pool.get_nowait()
        except queue.Empty:
            con = _connect(self.path, readonly=self.readonly)
            self._all.append(con)
        try:
            yield con
        finally:
            self._pool.put(con)

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees one committed state."""
        with self.reader() as con:
            con.execute("BEGIN")
            try:
                yield con
            finally:
                con.execute("COMMIT")

    def close(self) -> None:
        for con in self._all:
            try:
                con.close()
            except sqlite3.Error:
                pass
        self._all.clear()

    # -- meta ----------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._wcon.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -- writes --------------------------------------------------------------------------
    @contextmanager
    def write_transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable write transaction on the writer connection (``BEGIN IMMEDIATE`` under the
        write mutex): committed, and on disk, when the block exits; rolled back if it raises.
        For tables kept beside the images (e.g. :mod:`index.feedback`)."""
        if self.readonly:
            raise PermissionError(f"{self.path}: opened read-only")
        with self._wlock:
            con = self._wcon
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def add(self, vectors: np.ndarray, records: Sequence[dict]) -> tuple[list[int], list[tuple[int, int]], int]:
        """Insert records with their (N, D) float32 vectors in one durable transaction.

        A record whose sha256 is already stored (or earlier in the same call) is not inserted
        again: its existing id is returned in its place. Returns ``(ids, new, last_seq)`` where
        ``new`` lists ``(position in records, new id)`` of the rows actually inserted.
        """
        now = time.time()
        ids: list[int] = []
        new: list[tuple[int, int]] = []
        with self._wlock:
            con = self._wcon
            con.execute("BEGIN IMMEDIATE")
            try:
                for pos, (vec, r) in enumerate(zip(vectors, records)):
                    row = con.execute("SELECT id FROM images WHERE sha256 = ?", (r["sha256"],)).fetchone()
                    if row is not None:
                        ids.append(int(row[0]))
                        continue
                    cur = con.execute(
                        "INSERT INTO images (path, label, sha256, size, mtime, added_at, source, vector) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (r["path"], r.get("label"), r["sha256"], int(r["size"]), float(r["mtime"]),
                         float(r.get("added_at", now)), r["source"],
                         np.ascontiguousarray(vec, dtype=np.float32).tobytes()),
                    )
                    i = int(cur.lastrowid)
                    con.execute("INSERT INTO changes (op, id) VALUES ('add', ?)", (i,))
                    ids.append(i)
                    new.append((pos, i))
                seq = self._last_seq(con)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return ids, new, seq

    def remove(self, ids: Sequence[int]) -> tuple[list[int], int]:
        """Delete the given ids (unknown ones ignored) in one durable transaction.

        Returns ``(removed_ids, last_seq)``.
        """
        removed: list[int] = []
        with self._wlock:
            con = self._wcon
            con.execute("BEGIN IMMEDIATE")
            try:
                for i in dict.fromkeys(int(x) for x in ids):
                    if con.execute("DELETE FROM images WHERE id = ?", (i,)).rowcount:
                        con.execute("INSERT INTO changes (op, id) VALUES ('del', ?)", (i,))
                        removed.append(i)
                seq = self._last_seq(con)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return removed, seq

    def touch(self, id: int, size: int, mtime: float) -> None:
        """Record a new size/mtime for unchanged content (no vector change, so no log entry)."""
        with self._wlock:
            self._wcon.execute("UPDATE images SET size = ?, mtime = ? WHERE id = ?", (int(size), float(mtime), int(id)))

    def prune_changes(self, through_seq: int) -> None:
        """Forget log entries every kept generation already contains."""
        with self._wlock:
            self._wcon.execute("BEGIN IMMEDIATE")
            self._wcon.execute("DELETE FROM changes WHERE seq <= ?", (through_seq,))
            prev = int(self.get_meta("pruned_through") or 0)
            self._wcon.execute("INSERT OR REPLACE INTO meta VALUES ('pruned_through', ?)",
                               (str(max(prev, through_seq)),))
            self._wcon.execute("COMMIT")

    # -- reads ---------------------------------------------------------------------------
    @staticmethod
    def _last_seq(con: sqlite3.Connection) -> int:
        row = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return int(row[0]) if row else 0

    def last_seq(self, con: sqlite3.Connection | None = None) -> int:
        if con is not None:
            return self._last_seq(con)
        with self.reader() as c:
            return self._last_seq(c)

    def pruned_through(self) -> int:
        return int(self.get_meta("pruned_through") or 0)

    def count(self, con: sqlite3.Connection | None = None) -> int:
        if con is not None:
            return int(con.execute("SELECT count(*) FROM images").fetchone()[0])
        with self.reader() as c:
            return int(c.execute("SELECT count(*) FROM images").fetchone()[0])

    def get(self, id: int) -> ImageRecord | None:
        with self.reader() as con:
            row = con.execute(f"SELECT {_RECORD_COLS} FROM images WHERE id = ?", (int(id),)).fetchone()
        return _record(row) if row else None

    def get_many(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        ids = list(dict.fromkeys(int(i) for i in ids))
        out: dict[int, ImageRecord] = {}
        with self.reader() as con:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                q = f"SELECT {_RECORD_COLS} FROM images WHERE id IN ({','.join('?' * len(chunk))})"
                for row in con.execute(q, chunk):
                    out[int(row[0])] = _record(row)
        return out

    def ids_with_label(self, label: str) -> np.ndarray:
        """(M,) int64 ids of the images whose label is exactly ``label`` (committed state)."""
        with self.reader() as con:
            rows = con.execute("SELECT id FROM images WHERE label = ?", (label,)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def by_sha(self, sha256: str) -> ImageRecord | None:
        with self.reader() as con:
            row = con.execute(f"SELECT {_RECORD_COLS} FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        return _record(row) if row else None

    def shas_present(self, shas: Sequence[str]) -> dict[str, ImageRecord]:
        out: dict[str, ImageRecord] = {}
        shas = list(dict.fromkeys(shas))
        with self.reader() as con:
            for start in range(0, len(shas), 500):
                chunk = shas[start:start + 500]
                q = f"SELECT {_RECORD_COLS} FROM images WHERE sha256 IN ({','.join('?' * len(chunk))})"
                for row in con.execute(q, chunk):
                    out[row[3]] = _record(row)
        return out

    def by_path(self, source: str, path: str) -> ImageRecord | None:
        with self.reader() as con:
            row = con.execute(f"SELECT {_RECORD_COLS} FROM images WHERE source = ? AND path = ?",
                              (source, path)).fetchone()
        return _record(row) if row else None

    def folder_stats(self) -> dict[str, tuple[int, int, float, str]]:
        """path -> (id, size, mtime, sha256) of every ``folder`` record (for fast skip of unchanged files)."""
        with self.reader() as con:
            return {r[1]: (int(r[0]), int(r[2]), float(r[3]), r[4]) for r in
                    con.execute("SELECT id, path, size, mtime, sha256 FROM images WHERE source = 'folder'")}

    def vector(self, id: int) -> np.ndarray | None:
        with self.reader() as con:
            row = con.execute("SELECT vector FROM images WHERE id = ?", (int(id),)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    @staticmethod
    def all_vectors(con: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Every stored (id, vector) in ``con``'s view: ((N,) int64, (N, D) float32)."""
        n = int(con.execute("SELECT count(*) FROM images").fetchone()[0])
        ids = np.empty(n, dtype=np.int64)
        vecs = np.empty((n, dim), dtype=np.float32)
        i = 0
        for i, (rid, blob) in enumerate(con.execute("SELECT id, vector FROM images ORDER BY id")):
            ids[i] = rid
            vecs[i] = np.frombuffer(blob, dtype=np.float32)
        return ids, vecs

    @staticmethod
    def changes_since(con: sqlite3.Connection, seq: int, dim: int) -> tuple[list[int], np.ndarray, np.ndarray, int]:
        """Net effect of the log after ``seq`` in ``con``'s view.

        Returns ``(deleted_ids, added_ids (M,) int64, added_vectors (M, D) float32, last_seq)``.
        Ids are never reused, so an id has at most one add and one delete; an add whose row is
        gone (deleted later) is dropped, so replay never resurrects a deleted id.
        """
        deleted: list[int] = []
        add_ids: list[int] = []
        vecs: list[np.ndarray] = []
        last = seq
        rows = con.execute(
            "SELECT c.seq, c.op, c.id, i.vector FROM changes c LEFT JOIN images i ON i.id = c.id "
            "WHERE c.seq > ? ORDER BY c.seq", (seq,))
        for s, op, rid, blob in rows:
            last = s
            if op == "del":
                deleted.append(int(rid))
            elif blob is not None:
                add_ids.append(int(rid))
                vecs.append(np.frombuffer(blob, dtype=np.float32))
        dset = set(deleted)
        keep = [j for j, i in enumerate(add_ids) if i not in dset]
        ids = np.asarray([add_ids[j] for j in keep], dtype=np.int64)
        v = np.stack([vecs[j] for j in keep]) if keep else np.zeros((0, dim), dtype=np.float32)
        return deleted, ids, v, last

    def write_snapshot(self, con: sqlite3.Connection, dest: Path) -> None:
        """Copy the records (without vectors) visible in ``con`` into a new SQLite file ``dest``."""
        snap = sqlite3.connect(str(dest), isolation_level=None)
        try:
            snap.execute("PRAGMA journal_mode=DELETE")
            snap.execute(f"CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL, label TEXT, "
                         f"sha256 TEXT NOT NULL, size INTEGER NOT NULL, mtime REAL NOT NULL, added_at REAL NOT NULL, "
                         f"source TEXT NOT NULL)")
            snap.execute("BEGIN")
            cur = con.execute(f"SELECT {_RECORD_COLS} FROM images ORDER BY id")
            while True:
                rows = cur.fetchmany(10_000)
                if not rows:
                    break
                snap.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            snap.execute("COMMIT")
        finally:
            snap.close()


def validate_record(r: dict) -> dict:
    """Check one record dict for :meth:`IndexStore.add`; returns a normalised copy.

    Raises:
        ValueError: naming the bad key and value.
    """
    missing = [k for k in ("path", "sha256", "size", "mtime", "source") if k not in r]
    if missing:
        raise ValueError(f"record {r!r} lacks keys {missing}")
    if r["source"] not in SOURCES:
        raise ValueError(f"record source {r['source']!r} not allowed; allowed: {list(SOURCES)}")
    path = str(r["path"])
    parts = Path(path).parts
    if not path or Path(path).is_absolute() or ".." in parts:
        raise ValueError(f"record path {path!r} must be relative to its root and must not contain '..'")
    sha = str(r["sha256"]).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"record sha256 {r['sha256']!r} is not a 64-hex-digit sha256")
    label = r.get("label")
    return {"path": Path(path).as_posix(), "label": None if label is None else str(label), "sha256": sha,
            "size": int(r["size"]), "mtime": float(r["mtime"]), "source": r["source"],
            **({"added_at": float(r["added_at"])} if "added_at" in r else {})}
