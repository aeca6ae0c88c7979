"""Versioned, atomically published generations of the FAISS index.

Layout under ``<index>/generations/``::

    000007/
        index.faiss      the FAISS index (ids inside), a checkpointed cache of meta.sqlite
        records.sqlite   the records it holds (no vectors), for inspection and audits
        manifest.json    factory, metric, dim, ntotal, model fingerprint, faiss version,
                         last change seq, tuning + measured recall@10, sha256 and size per file

Publishing writes everything into a temporary sibling directory, fsyncs each file and the
directory, renames it to its final name and fsyncs ``generations/``: a reader sees either the
whole generation or none of it. The previous generation is kept (``keep`` newest).

Loading verifies the manifest (every file's size and sha256, and the index's dim / ntotal /
metric) before FAISS parses a byte; a generation that fails is refused with a message naming
the file and what is wrong, and the next older one is tried.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss

from index.ann import METRIC, METRIC_NAME, faiss_version
from index.errors import CorruptIndexError
from models.io import fsync_dir, sha256_file

log = logging.getLogger(__name__)

GEN_DIR = "generations"
INDEX_FILE = "index.faiss"
SNAPSHOT_FILE = "records.sqlite"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_GEN_RE = re.compile(r"^\d{6}$")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Generation:
    number: int
    path: Path
    manifest: dict


def list_generations(root: Path) -> list[int]:
    """Generation numbers present under ``root/generations``, newest first."""
    d = root / GEN_DIR
    if not d.is_dir():
        return []
    return sorted((int(p.name) for p in d.iterdir() if p.is_dir() and _GEN_RE.match(p.name)), reverse=True)


def gen_path(root: Path, number: int) -> Path:
    return root / GEN_DIR / f"{number:06d}"


def publish(root: Path, index: faiss.Index, manifest: dict, write_snapshot, *, keep: int = 2) -> Generation:
    """Publish ``index`` as the next generation.

    ``manifest`` holds the caller's fields (factory, fingerprint, last_seq, tuning...); this
    adds number, metric, dim, ntotal, faiss version, time and the per-file sha256/size.
    ``write_snapshot(path)`` writes the metadata snapshot file. Older generations beyond the
    ``keep`` newest are deleted after the new one is durable.
    """
    gdir = root / GEN_DIR
    gdir.mkdir(exist_ok=True)
    existing = list_generations(root)
    number = (existing[0] + 1) if existing else 1
    final = gen_path(root, number)
    tmp = gdir / f".tmp-{number:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        write_snapshot(tmp / SNAPSHOT_FILE)
        files = {}
        for name in (INDEX_FILE, SNAPSHOT_FILE):
            fsync_file(tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "size": (tmp / name).stat().st_size}
        full = {
            "format": "lookalike-index-generation",
            "version": MANIFEST_VERSION,
            "generation": number,
            "created_at": time.time(),
            "metric": METRIC_NAME,
            "dim": int(index.d),
            "ntotal": int(index.ntotal),
            "faiss_version": faiss_version(),
            **manifest,
            "files": files,
        }
        data = (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()
        with open(tmp / MANIFEST_FILE, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(gdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("published generation %d (%s, ntotal=%d)", number, manifest.get("factory"), index.ntotal)
    for old in list_generations(root)[keep:]:
        shutil.rmtree(gen_path(root, old), ignore_errors=True)
    for stale in gdir.glob(".tmp-*"):  # left by a crash mid-publish
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return Generation(number, final, full)


def verify(root: Path, number: int, *, dim: int, fingerprint: str) -> Generation:
    """Check a generation against its manifest without parsing the FAISS file.

    Raises:
        CorruptIndexError: naming the generation, the file and what is wrong.
    """
    path = gen_path(root, number)
    where = f"{path}"
    mpath = path / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CorruptIndexError(f"{where}: manifest.json is missing") from None
    except (OSError, ValueError) as exc:
        raise CorruptIndexError(f"{where}: manifest.json is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lookalike-index-generation":
        raise CorruptIndexError(f"{where}: manifest.json is not a lookalike generation manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CorruptIndexError(f"{where}: manifest version {manifest.get('version')}, expected {MANIFEST_VERSION}")
    if manifest.get("metric") != METRIC_NAME or manifest.get("dim") != dim:
        raise CorruptIndexError(f"{where}: manifest says metric={manifest.get('metric')} dim={manifest.get('dim')}, "
                                f"index expects {METRIC_NAME} dim={dim}")
    if manifest.get("fingerprint") != fingerprint:
        raise CorruptIndexError(f"{where}: built with model {manifest.get('fingerprint')}, index is {fingerprint}")
    for name, meta in (manifest.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise CorruptIndexError(f"{where}: {name} is missing")
        size = f.stat().st_size
        if size != meta.get("size"):
            raise CorruptIndexError(f"{where}: {name} is {size} bytes, manifest says {meta.get('size')} "
                                    "(truncated or overwritten)")
        if sha256_file(f) != meta.get("sha256"):
            raise CorruptIndexError(f"{where}: {name} sha256 does not match the manifest (corrupt)")
    if INDEX_FILE not in (manifest.get("files") or {}):
        raise CorruptIndexError(f"{where}: manifest lists no {INDEX_FILE}")
    return Generation(number, path, manifest)


def read_index(gen: Generation, *, mmap: bool = False) -> faiss.Index:
    """Parse a verified generation's FAISS file and check it against the manifest.

    ``mmap``: an IVF index's inverted lists are not read into RAM but memory-mapped from the
    file, read-only (FAISS loads them as an ``OnDiskInvertedLists``): processes serving the
    same generation share those pages in the page cache. Such an index must not be changed
    (FAISS refuses, and then the object is unusable); a Flat index is read into RAM either way.
    """
    where = gen.path / INDEX_FILE
    try:
        index = faiss.read_index(str(where), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    except RuntimeError as exc:
        raise CorruptIndexError(f"{where}: FAISS cannot read it ({str(exc).splitlines()[0][:200]})") from None
    if index.d != gen.manifest["dim"] or index.ntotal != gen.manifest["ntotal"] or index.metric_type != METRIC:
        raise CorruptIndexError(f"{where}: holds d={index.d} ntotal={index.ntotal} metric={index.metric_type}, "
                                f"manifest says d={gen.manifest['dim']} ntotal={gen.manifest['ntotal']}")
    return index
