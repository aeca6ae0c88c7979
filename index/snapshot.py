"""Backups of an index: ``lookalike index snapshot INDEX OUT.tar`` and ``lookalike index restore``.

A snapshot is consistent while a server (or a batch job) writes to the index, without its
lock: the metadata database, which holds every record *and* its vector, is copied with
SQLite's online backup in one read transaction, so it is one committed state. Each add or
delete is committed (``synchronous=FULL``) before it is acknowledged, so **every write
acknowledged before the snapshot began is in it**. Then:

* the uploaded image files of the records in that state are copied (an upload is written
  before its record is committed). If one was deleted in the meantime (a delete acknowledged
  after the snapshot began), its record is dropped from the snapshot too, so the snapshot
  never holds a record without its image;
* the newest published FAISS generation not newer than the copied state is included when it
  is complete, so a restore only replays the later changes; otherwise a restore rebuilds the
  FAISS index from the stored vectors (no re-embedding either way).

The tar holds ``snapshot.json`` (format, versions, source, counts, sha256 of every file),
``store.json``, ``meta.sqlite``, ``uploads/``, ``feedback/`` and ``generations/NNNNNN/``. It is
written to a temporary file, fsynced and renamed, so ``OUT.tar`` is either complete or absent.

``restore`` extracts into a new directory (refusing links and paths outside it), verifies
every file's sha256, opens the index, which replays or rebuilds as needed, and publishes a
generation of the restored state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from index import generations as gens
from index.errors import CorruptIndexError
from index.feedback import stored_files
from index.metadata import DB_FILE, SCHEMA_VERSION, _connect
from index.store import DELETED_DIR, STORE_FILE, STORE_VERSION, TRAINED_FILE, UPLOADS_DIR, read_store_config
from models.io import fsync_dir, sha256_file

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "lookalike-index-snapshot"
SNAPSHOT_VERSION = 1
MANIFEST = "snapshot.json"


@dataclass
class SnapshotReport:
    """What a snapshot holds."""

    path: Path
    images: int
    uploads: int
    last_seq: int  #: the change-log position of the copied state
    generation: int | None  #: the FAISS generation included (None: a restore rebuilds it)
    dropped: list[int] = field(default_factory=list)  #: records whose upload was deleted meanwhile

    def summary(self) -> str:
        gen = f"generation {self.generation}" if self.generation is not None else "no generation (rebuilt on restore)"
        extra = f"; {len(self.dropped)} deleted meanwhile left out" if self.dropped else ""
        return (f"snapshot {self.path}: {self.images} images ({self.uploads} uploads), change seq {self.last_seq}, "
                f"{gen}{extra}")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_database(src: Path, dst: Path) -> None:
    """SQLite online backup of ``src`` into a new file ``dst``: one read transaction, so one
    committed state; writers to ``src`` are never blocked (WAL)."""
    source = _connect(src, readonly=True)
    target = sqlite3.connect(str(dst), isolation_level=None)
    try:
        source.backup(target)  # pages=-1: the whole database in one step
        target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file in the tar
    finally:
        target.close()
        source.close()


def snapshot(index_dir: str | Path, out: str | Path) -> SnapshotReport:
    """Write a consistent snapshot of the index at ``index_dir`` to the tar file ``out``.

    Safe while another process writes to the index (no lock is taken). Raises
    FileNotFoundError if ``index_dir`` is not an index, FileExistsError if ``out`` exists.
    """
    d = Path(index_dir)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose another name")
    config = read_store_config(d)
    with tempfile.TemporaryDirectory(prefix=".snapshot-", dir=out.parent) as tmp_s:
        tmp = Path(tmp_s)
        stage = tmp / "stage"
        stage.mkdir()
        db = stage / DB_FILE
        _copy_database(d / DB_FILE, db)
        con = sqlite3.connect(str(db), isolation_level=None)
        try:
            uploads = con.execute("SELECT id, path FROM images WHERE source = 'upload' ORDER BY id").fetchall()
            dropped = []
            for rid, rel in uploads:
                try:
                    _link_or_copy(d / UPLOADS_DIR / rel, stage / UPLOADS_DIR / rel)
                except FileNotFoundError:
                    try:  # deleted after the copied state: its bytes wait in uploads/.deleted/ for a while
                        _link_or_copy(d / UPLOADS_DIR / DELETED_DIR / rel, stage / UPLOADS_DIR / rel)
                    except FileNotFoundError:  # purged too: leave the record out as well
                        dropped.append(int(rid))
            if dropped:
                con.execute("BEGIN")
                for rid in dropped:
                    con.execute("DELETE FROM images WHERE id = ?", (rid,))
                    con.execute("INSERT INTO changes (op, id) VALUES ('del', ?)", (rid,))
                con.execute("COMMIT")
                log.info("left out %d records whose uploads were deleted during the snapshot", len(dropped))
            for rel in stored_files(con):  # relevance feedback's query images (append-only, never deleted)
                try:
                    _link_or_copy(d / rel, stage / rel)
                except FileNotFoundError:
                    log.warning("%s: feedback image %s is missing; its marks are kept without it", d, rel)
            row = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
            last_seq = int(row[0]) if row else 0
            images = int(con.execute("SELECT count(*) FROM images").fetchone()[0])
        finally:
            con.close()
        generation = _stage_generation(d, stage, last_seq)
        shutil.copy2(d / STORE_FILE, stage / STORE_FILE)
        for name in (TRAINED_FILE, TRAINED_FILE + ".json"):  # a sharded build's common trained index
            if (d / name).is_file():
                shutil.copy2(d / name, stage / name)
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        manifest = {
            "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "created_at": time.time(),
            "source": str(d.resolve()), "store_version": config["version"], "schema_version": SCHEMA_VERSION,
            "fingerprint": config["fingerprint"], "images": images, "uploads": len(uploads) - len(dropped),
            "last_seq": last_seq, "generation": generation,
            "files": {p.relative_to(stage).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in files},
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        part = tmp / "out.tar"
        with tarfile.open(part, "w") as tar:
            tar.add(stage / MANIFEST, arcname=MANIFEST)
            for p in files:
                tar.add(p, arcname=p.relative_to(stage).as_posix())
        gens.fsync_file(part)
        os.replace(part, out)
        fsync_dir(out.parent)
    report = SnapshotReport(path=out, images=images, uploads=manifest["uploads"], last_seq=last_seq,
                            generation=generation, dropped=dropped)
    log.info("%s", report.summary())
    return report


def _stage_generation(d: Path, stage: Path, last_seq: int) -> int | None:
    """Copy the newest generation whose state is not newer than ``last_seq`` into ``stage``.

    Generations are immutable once published, but the writer prunes old ones: one that
    vanishes while being copied is skipped (the restore then replays from an older one or
    rebuilds). Returns its number, or None.
    """
    for number in gens.list_generations(d):
        src = gens.gen_path(d, number)
        dst = stage / gens.GEN_DIR / src.name
        try:
            manifest = json.loads((src / gens.MANIFEST_FILE).read_text())
            if int(manifest["last_seq"]) > last_seq:
                continue  # published after the copied state: it holds writes the snapshot lacks
            for f in sorted(p for p in src.iterdir() if p.is_file()):
                _link_or_copy(f, dst / f.name)
            return number
        except (OSError, ValueError, KeyError) as exc:
            log.info("generation %d not included (%s)", number, exc)
            shutil.rmtree(dst, ignore_errors=True)
    return None


def restore(snapshot_tar: str | Path, out: str | Path) -> dict:
    """Restore the snapshot ``snapshot_tar`` into the new index directory ``out``.

    Returns the restored index's :meth:`IndexStore.info`. Raises FileExistsError if ``out``
    exists and is not empty, CorruptIndexError if the tar is not a complete, intact snapshot.
    """
    from index.store import IndexStore

    src = Path(snapshot_tar)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not empty; restore into a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.restore-", dir=out.parent))
    try:
        try:
            with tarfile.open(src, "r") as tar:
                for member in tar.getmembers():
                    if not (member.isfile() or member.isdir()):
                        raise CorruptIndexError(f"{src}: {member.name!r} is not a plain file; not a lookalike snapshot")
                tar.extractall(tmp, filter="data")  # refuses absolute paths and '..'
        except tarfile.TarError as exc:
            raise CorruptIndexError(f"{src}: not a readable tar ({exc})") from None
        _verify_extracted(src, tmp)
        con = sqlite3.connect(str(tmp / DB_FILE), isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")  # as an index made by `index build`
        finally:
            con.close()
        (tmp / MANIFEST).unlink()
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with IndexStore.open(out, writable=True) as store:  # verifies; replays or rebuilds FAISS
        store.checkpoint()
        info = store.info()
    log.info("restored %s into %s: %d images, generation %d", src, out, info["ntotal"], info["generation"])
    return info


def _verify_extracted(src: Path, root: Path) -> None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptIndexError(f"{src}: no readable {MANIFEST} ({exc}); not a lookalike snapshot") from None
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise CorruptIndexError(f"{src}: not a lookalike snapshot")
    if manifest.get("version") != SNAPSHOT_VERSION or manifest.get("store_version") != STORE_VERSION \
            or manifest.get("schema_version") != SCHEMA_VERSION:
        raise CorruptIndexError(
            f"{src}: snapshot version {manifest.get('version')} of index format {manifest.get('store_version')} "
            f"(metadata schema {manifest.get('schema_version')}); this lookalike restores snapshot version "
            f"{SNAPSHOT_VERSION} of index format {STORE_VERSION} (schema {SCHEMA_VERSION}). Restore it with the "
            "lookalike version that made it")
    listed = manifest.get("files", {})
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    if present != set(listed):
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        raise CorruptIndexError(f"{src}: files differ from its manifest (missing {missing[:5]}, extra {extra[:5]})")
    for rel, meta in listed.items():
        if sha256_file(root / rel) != meta["sha256"]:
            raise CorruptIndexError(f"{src}: {rel} is corrupt (sha256 differs from the manifest)")
