"""IndexStore: a persistent, searchable index of image embeddings.

An index directory::

    store.json          fixed at creation: model fingerprint + card, dim, requested factory,
                        recall target, images_root
    meta.sqlite         the source of truth (WAL, synchronous=FULL): records, vectors and the
                        change log; an add/remove is durable before it returns
    generations/NNNNNN  published FAISS checkpoints (see :mod:`index.generations`)
    uploads/            image bytes added through :meth:`IndexStore.add_upload`
    writer.lock         the single-writer lock
    trained.faiss       optional: the empty, trained IVF every shard of a sharded build starts
                        from (see :mod:`index.shards`); its sha256 is in store.json

Opening loads the newest generation that verifies (falling back to older ones, then to a
rebuild from the stored vectors) and replays the change log past it, so the in-memory index
always equals the committed metadata. Searches run concurrently with writes under a
readers-writer lock: each search sees the index either before or after a write, never half
of one, and hits whose metadata was deleted meanwhile are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from index import ann
from index import generations as gens
from index.errors import CorruptIndexError, IndexStoreError, ModelMismatchError
from index.locking import RWLock, WriterLock
from index.metadata import DB_FILE, MetadataDB, validate_record
from index.records import ImageRecord, SearchHit
from models.io import atomic_write, sha256_file

log = logging.getLogger(__name__)

STORE_FILE = "store.json"
UPLOADS_DIR = "uploads"
#: Removed uploads wait here (``uploads/.deleted/``) for ``DELETED_GRACE_S`` before they are purged,
#: so a snapshot that began before the delete still finds the bytes of a record it copied.
DELETED_DIR = ".deleted"
DELETED_GRACE_S = 600.0
STORE_VERSION = 1
TRAINED_FILE = "trained.faiss"
#: Re-tune an ANN index at checkpoint when its size moved by more than this fraction.
RETUNE_DRIFT = 0.2
_EXT_RE = re.compile(r"^[a-z0-9]{1,8}$")


def _check_window(k: int, offset: int) -> tuple[int, int]:
    """``(k, offset)`` as ints; ValueError unless k >= 1 and offset >= 0."""
    k, offset = int(k), int(offset)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return k, offset


@dataclass(frozen=True)
class _Filter:
    """A FAISS ``IDSelector`` for one search, with the objects it points into kept alive."""

    selector: faiss.IDSelector
    empty: bool = False  # nothing can match: skip the search
    keep: tuple = ()


def _read_trained(path: Path, dim: int) -> tuple[faiss.Index, dict]:
    """An empty trained FAISS index file and its sidecar ``<file>.json`` (factory, fingerprint...).

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    side = path.with_name(path.name + ".json")
    if not path.is_file() or not side.is_file():
        raise FileNotFoundError(f"{path}: no trained index here (with its {side.name}); make one with "
                                "`lookalike index train-quantizer`")
    try:
        meta = json.loads(side.read_text())
        index = faiss.read_index(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: unreadable trained index ({str(exc).splitlines()[0][:200]})") from None
    if not index.is_trained or index.ntotal or index.d != dim or ann.nlist_of(index) is None:
        raise ValueError(f"{path}: must be an empty, trained IVF index of dimension {dim} "
                         f"(it is d={index.d}, ntotal={index.ntotal}, trained={index.is_trained})")
    if sha256_file(path) != meta.get("sha256"):
        raise ValueError(f"{path}: sha256 differs from {side.name} (replaced or corrupt)")
    return index, meta


def _card_fingerprint(card) -> str:
    fp = getattr(card, "fingerprint", "")
    if not fp:
        raise ValueError("the model card has no fingerprint; save the model with models.save_model first")
    return fp


def read_store_config(directory: str | Path, *, hint: str = "") -> dict:
    """The ``store.json`` of the index in ``directory``, checked to be a lookalike index of this
    format version (without opening the index or taking any lock).

    Raises:
        FileNotFoundError: no ``store.json`` (``hint`` is appended: how to get an index).
        ValueError: the file cannot be read or parsed.
        CorruptIndexError: another format or version.
    """
    path = Path(directory) / STORE_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: not a lookalike index (no {STORE_FILE}){hint}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != "lookalike-index" or config.get("version") != STORE_VERSION:
        raise CorruptIndexError(f"{path}: not a version-{STORE_VERSION} lookalike index")
    return config


def check_model(directory: str | Path, index_fingerprint: str, card) -> None:
    """The one check that a model may embed for an index: its card's fingerprint is the index's.

    Raises:
        ValueError: the card has no fingerprint (an unsaved model).
        ModelMismatchError: the fingerprints differ (both named).
    """
    fp = _card_fingerprint(card)
    if fp != index_fingerprint:
        raise ModelMismatchError(
            f"{directory}: the index was built with model fingerprint {index_fingerprint}, but the model given "
            f"has fingerprint {fp}; use the same model or build a new index")


class IndexStore:
    """Searchable, persistent, crash-safe index of (N, D) float32 unit embeddings.

    Build with :meth:`create` or :meth:`open`; do not call the constructor directly.
    """

    def __init__(self, directory: Path, config: dict, db: MetadataDB, *, lock: WriterLock | None) -> None:
        self.directory = directory
        self._config = config
        self.db = db
        self._lock = lock
        self.fingerprint: str = config["fingerprint"]
        self.dim: int = int(config["dim"])
        self.images_root: Path | None = Path(config["images_root"]) if config.get("images_root") else None
        self.factory_requested: str = config["factory"]
        self.recall_target: float = float(config["recall_target"])
        #: FAISS OpenMP threads per search call (1: parallelism comes from concurrent requests,
        #: and it avoids the torch/faiss OpenMP contention measured on this machine).
        self.search_threads: int = 1
        self.generation: int = 0
        self.refused: list[str] = []
        self._index: faiss.Index = ann.empty_index("Flat", self.dim)
        self._factory = "Flat"
        self._tuning = ann.Tuning()
        #: the last measured early-ANN trial (``auto`` below the exact bound, :meth:`_build_auto`):
        #: {"n", "factory", "recall_at_10", "nprobe", "kept"}; persisted in the manifest
        self._early: dict | None = None
        self._seq = 0
        self.max_ram: int | None = config.get("max_ram")
        #: an on-disk index (``--on-disk``): read-only opens memory-map the IVF lists
        self.on_disk: bool = bool(config.get("on_disk"))
        self._mmap = False  # set by open(): map the lists of the generations loaded
        self._mmapped = False  # the in-memory index's lists are mapped (read-only) right now
        self._newest_seen = 0  # newest generation number present at the last load
        self._trained: faiss.Index | None = None
        self._rw = RWLock()
        self._wmutex = threading.RLock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, directory: str | Path, *, card, images_root: str | Path | None, factory: str = "auto",
               recall_target: float = 0.95, model_dir: str | Path | None = None, max_ram: int | None = None,
               on_disk: bool = False, trained_from: str | Path | None = None,
               extra: dict | None = None) -> "IndexStore":
        """Create a new, empty index for ``card``'s model and take the writer lock.

        ``images_root``: folder that ``source="folder"`` record paths are relative to.
        ``factory``: ``auto``, ``Flat`` or an IVF factory (see :mod:`index.ann`).
        ``model_dir``: remembered so the CLI can embed queries without ``--model``.
        ``max_ram``: bytes the FAISS index may take; ``auto`` picks IVF-PQ above it.
        ``on_disk``: read-only opens memory-map the IVF lists (replicas share the page cache).
        ``trained_from``: an empty trained FAISS index (``lookalike index train-quantizer``):
        copied in, and every FAISS index of this store starts from it (no training here).
        ``extra``: more keys for store.json (a shard's identity, :mod:`index.shards`).

        Raises:
            FileExistsError: an index already exists there.
            ValueError: bad factory / recall target / card.
        """
        d = Path(directory)
        if (d / STORE_FILE).exists():
            raise FileExistsError(f"{d}: an index already exists here; add to it with `lookalike index add` "
                                  "(or choose another --out)")
        fac = ann.normalize_factory(factory)
        if not 0.0 < recall_target <= 1.0:
            raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
        fp = _card_fingerprint(card)
        trained = _read_trained(Path(trained_from), card.embedding_dim) if trained_from is not None else None
        if trained is not None:
            if trained[1].get("fingerprint") != fp:
                raise ModelMismatchError(f"{trained_from}: trained for model fingerprint {trained[1].get('fingerprint')}, "
                                         f"but the model given has fingerprint {fp}")
            fac = trained[1]["factory"]
        d.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(d)
        lock.acquire()
        try:
            for leftover in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm"):  # from a crash mid-create
                (d / leftover).unlink(missing_ok=True)
            shutil.rmtree(d / gens.GEN_DIR, ignore_errors=True)
            config = {
                "format": "lookalike-index", "version": STORE_VERSION, "created_at": time.time(),
                "fingerprint": fp, "dim": int(card.embedding_dim), "card": card.to_dict(),
                "factory": fac, "recall_target": float(recall_target), "metric": ann.METRIC_NAME,
                "images_root": str(Path(images_root).resolve()) if images_root is not None else None,
                "model_dir": str(Path(model_dir).resolve()) if model_dir is not None else None,
                "max_ram": int(max_ram) if max_ram is not None else None, "on_disk": bool(on_disk),
                **(extra or {}),
            }
            if trained is not None:
                atomic_write(d / TRAINED_FILE, Path(trained_from).read_bytes())
                atomic_write(d / (TRAINED_FILE + ".json"), (json.dumps(trained[1]) + "\n").encode())
                config["trained"] = {"file": TRAINED_FILE, "sha256": sha256_file(d / TRAINED_FILE),
                                     "factory": fac}
            db = MetadataDB(d / DB_FILE, create=True)
            store = cls(d, config, db, lock=lock)
            store._load_trained()
            store.checkpoint()  # generation 1: empty, so a reader can open at once
            # store.json last: its presence marks a completely created index
            atomic_write(d / STORE_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        except BaseException:
            lock.release()
            raise
        log.info("created index %s (model %s, factory %s)", d, fp[:12], fac)
        return store

    @classmethod
    def open(cls, directory: str | Path, *, card=None, writable: bool = False,
             images_root: str | Path | None = None, mmap: bool | None = None) -> "IndexStore":
        """Open an index; with ``card`` its fingerprint must match; ``writable`` takes the lock.

        ``images_root`` overrides, for this process only, where the indexed folder's images are
        (e.g. where a container mounts them); the stored root is unchanged.
        ``mmap``: memory-map the IVF lists of the generation loaded instead of reading them
        into RAM (read-only opens only; default: when the index was built ``--on-disk``).

        Raises:
            FileNotFoundError: not an index.
            ModelMismatchError: the card's fingerprint differs (both named).
            IndexLockedError: ``writable`` and another writer holds the lock.
        """
        d = Path(directory)
        cfg_path = d / STORE_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{d}: not a lookalike index (no {STORE_FILE}); create one with "
                                    "`lookalike index build`")
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise CorruptIndexError(f"{cfg_path}: unreadable ({exc})") from None
        if config.get("format") != "lookalike-index" or config.get("version") != STORE_VERSION:
            raise CorruptIndexError(f"{cfg_path}: not a version-{STORE_VERSION} lookalike index")
        if card is not None:
            check_model(d, config["fingerprint"], card)
        lock = None
        if writable:
            lock = WriterLock(d)
            lock.acquire()
        try:
            store = cls(d, config, MetadataDB(d / DB_FILE, readonly=not writable), lock=lock)
            if images_root is not None:
                store.images_root = Path(images_root)
            store._mmap = (store.on_disk if mmap is None else bool(mmap)) and not writable
            store._load_trained()
            store._load()
            if writable:
                store.sweep()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return store

    def sweep(self) -> dict[str, int]:
        """Remove what a killed writer can leave behind; returns and logs the counts.

        * ``temporary``: ``.<name>.*.tmp`` files of unfinished atomic writes (index root and
          ``uploads/``) and ``generations/.tmp-*`` directories of unfinished publishes;
        * ``orphan_uploads``: files in ``uploads/`` that no record points to (written before a
          kill or a failed metadata write, never acknowledged).

        Only a writer (holding the lock, so nothing is mid-write) may sweep.
        """
        self._require_writable()
        counts = {"temporary": 0, "orphan_uploads": 0}
        for d in (self.directory, self.directory / UPLOADS_DIR):
            if d.is_dir():
                for p in d.glob(".*.tmp"):
                    if p.is_file() and not p.is_symlink():
                        p.unlink(missing_ok=True)
                        counts["temporary"] += 1
        gdir = self.directory / gens.GEN_DIR
        if gdir.is_dir():
            for p in gdir.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
                counts["temporary"] += 1
        up = self.directory / UPLOADS_DIR
        if up.is_dir():
            for p in up.iterdir():
                if p.name.startswith(".") or not p.is_file():
                    continue
                rec = self.db.by_sha(p.name.split(".", 1)[0].lower())
                if rec is None or rec.source != "upload" or rec.path != p.name:
                    p.unlink(missing_ok=True)
                    counts["orphan_uploads"] += 1
        if any(counts.values()):
            log.warning("%s: start-up sweep removed %d temporary files and %d orphan uploads",
                        self.directory, counts["temporary"], counts["orphan_uploads"])
        else:
            log.info("%s: start-up sweep found no temporary files or orphan uploads", self.directory)
        return counts

    def close(self) -> None:
        """Close the metadata database and release the writer lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.db.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def writable(self) -> bool:
        return self._lock is not None and self._lock.held

    def _require_writable(self) -> None:
        if self._closed:
            raise IndexStoreError(f"{self.directory}: the index is closed")
        if not self.writable:
            raise IndexStoreError(f"{self.directory}: opened read-only; open with writable=True to change it")

    def check_model(self, card) -> None:
        """Refuse a model this index was not built with (see :func:`check_model`)."""
        check_model(self.directory, self.fingerprint, card)

    @property
    def model_dir(self) -> Path | None:
        m = self._config.get("model_dir")
        return Path(m) if m else None

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        """Newest verified generation + replay of the change log; rebuild when none is usable."""
        self.refused = []
        index = None
        gen = None
        pruned = self.db.pruned_through()
        self._newest_seen = max(gens.list_generations(self.directory), default=0)
        for number in gens.list_generations(self.directory):
            try:
                g = gens.verify(self.directory, number, dim=self.dim, fingerprint=self.fingerprint)
                if int(g.manifest.get("last_seq", -1)) < pruned:
                    raise CorruptIndexError(f"{g.path}: older than the change log kept (seq {pruned}); cannot replay")
                index = gens.read_index(g, mmap=self._mmap)
                gen = g
                break
            except CorruptIndexError as exc:
                log.error("refusing index generation %d: %s", number, exc)
                self.refused.append(str(exc))
        if gen is None:
            if self.refused or self.db.count():
                log.warning("%s: no usable generation; rebuilding the FAISS index from the stored vectors",
                            self.directory)
            self._rebuild_from_db()
            return
        if self.refused:
            log.warning("%s: using previous generation %d", self.directory, gen.number)
        m = gen.manifest
        tuning = m.get("tuning") or {}
        self._tuning = ann.Tuning(params=tuning.get("params") or {}, recall_at_10=float(m.get("recall_at_10", 1.0)),
                                  n_queries=int(tuning.get("n_queries", 0)),
                                  n_at_tuning=int(tuning.get("n_at_tuning", m["ntotal"])),
                                  curve=[tuple(x) for x in tuning.get("curve", [])])
        ann.set_params(index, self._tuning.params)
        self._early = m.get("early_ann")
        self._mmapped = self._mmap and ann.nlist_of(index) is not None
        self._index = index
        self._factory = m["factory"]
        self.generation = gen.number
        self._seq = int(m["last_seq"])
        self._replay()

    def _replay(self) -> int:
        """Apply the committed changes after ``self._seq``; returns how many ids changed."""
        with self.db.snapshot() as con:
            deleted, ids, vecs, last = MetadataDB.changes_since(con, self._seq, self.dim)
            count = self.db.count(con)
        if self._mmapped and (deleted or len(ids)):
            self._unmap()
        with self._rw.write():
            if deleted:
                self._index.remove_ids(np.asarray(deleted, dtype=np.int64))
            if len(ids):
                self._index.add_with_ids(vecs, ids)
            self._seq = last
            ntotal = self._index.ntotal
        if deleted or len(ids):
            log.info("replayed %d adds and %d deletes from the change log", len(ids), len(deleted))
        if ntotal != count:
            log.warning("%s: FAISS holds %d vectors but the metadata %d; rebuilding from the stored vectors",
                        self.directory, ntotal, count)
            self._rebuild_from_db()
        return len(deleted) + len(ids)

    def _rebuild_from_db(self, factory: str | None = None) -> None:
        with self.db.snapshot() as con:
            ids, vecs = MetadataDB.all_vectors(con, self.dim)
            seq = self.db.last_seq(con)
        factory = factory or self._desired_factory(len(ids))
        trained = self._trained if self._trained is not None and factory == self._trained_factory() else None
        if trained is None and self._early_band(len(ids)) and factory != "Flat":
            factory, index, tuning = self._build_early(factory, vecs, ids)
        else:
            index, tuning = ann.build(factory, vecs, ids, recall_target=self.recall_target, trained=trained)
        with self._rw.write():
            self._index, self._tuning, self._factory, self._seq = index, tuning, factory, seq
            self._mmapped = False

    def _early_band(self, n: int) -> bool:
        """``auto`` at ``n`` vectors is below the exact bound but where an IVF index may replace Flat."""
        return (self.factory_requested == "auto" and self._trained is None
                and ann.early_ann_candidate(n, self.dim, max_ram=self.max_ram) is not None)

    def _build_early(self, factory: str, vecs: np.ndarray, ids: np.ndarray) -> tuple[str, faiss.Index, ann.Tuning]:
        """Build ``factory`` (IVF) below the exact bound and keep it only if it measures as good as
        exact at a fraction of the scan (:func:`index.ann.passes_early_gate`); else build Flat.
        Records the trial in ``self._early`` (and so in the next manifest)."""
        target = ann.early_ann_target(self.recall_target)
        nlist = ann.nlist_of(ann.empty_index(factory, self.dim)) or 1
        index, tuning = ann.build(factory, vecs, ids, recall_target=target,
                                  max_nprobe=ann.early_ann_max_nprobe(nlist))
        kept = ann.passes_early_gate(index, tuning, self.recall_target)
        self._early = {"n": int(len(ids)), "factory": factory, "recall_at_10": float(tuning.recall_at_10),
                       "nprobe": int(tuning.params.get("nprobe", nlist)), "nlist": int(nlist), "kept": kept}
        if kept:
            log.info("%s: %s replaces exact search at %d vectors: recall@10 %.4f probing %d of %d lists",
                     self.directory, factory, len(ids), tuning.recall_at_10, self._early["nprobe"], nlist)
            return factory, index, tuning
        log.info("%s: staying exact at %d vectors: %s reached recall@10 %.4f probing %d of %d lists (needs %.3f "
                 "probing at most %d); tried again at %d vectors", self.directory, len(ids), factory,
                 tuning.recall_at_10, self._early["nprobe"], nlist, target, ann.early_ann_max_nprobe(nlist),
                 2 * len(ids))
        index, tuning = ann.build("Flat", vecs, ids)
        return "Flat", index, tuning

    # ------------------------------------------------------------------ trained template, on-disk lists
    def _load_trained(self) -> None:
        """Load ``trained.faiss`` (the shards' common trained empty index) if this index has one."""
        meta = self._config.get("trained")
        if not meta:
            return
        path = self.directory / meta.get("file", TRAINED_FILE)
        if not path.is_file() or sha256_file(path) != meta.get("sha256"):
            raise CorruptIndexError(f"{path}: missing or its sha256 differs from store.json; restore it from "
                                    "the file given to --trained-from")
        self._trained = faiss.read_index(str(path))

    def _trained_factory(self) -> str | None:
        return (self._config.get("trained") or {}).get("factory")

    def _unmap(self) -> None:
        """Read the memory-mapped IVF lists into RAM, so changes can be applied to them.

        A mapped generation is read-only; a replica that must replay changes past it holds its
        own copy until it loads the next generation (which it maps again).
        """
        path = gens.gen_path(self.directory, self.generation) / gens.INDEX_FILE
        log.info("%s: copying the memory-mapped lists of generation %d into RAM to apply changes past it",
                 self.directory, self.generation)
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:  # the generation was pruned meanwhile: rebuild from the stored vectors
            self._rebuild_from_db(self._factory)
            return
        ann.set_params(index, self._tuning.params)
        with self._rw.write():
            self._index, self._mmapped = index, False

    def import_records(self, vectors: np.ndarray, records: list[dict], index: faiss.Index, factory: str) -> int:
        """Fill an empty index with records and the FAISS index made for them, then publish it.

        For :func:`index.shards.merge`: ``index`` (``factory``) already holds (N, D) float32
        ``vectors`` under the ids 1..N that the records get here, in order (the metadata of a new
        index numbers from 1). The records are written in durable batches, the index is tuned to
        the recall target and published as a generation. Returns the generation number.

        Raises:
            IndexStoreError: the index is not empty, or the ids do not come out as 1..N.
        """
        self._require_writable()
        n = len(records)
        with self._wmutex:
            if len(self) or self.db.count():
                raise IndexStoreError(f"{self.directory}: records can only be imported into an empty index")
            if index.ntotal != n or index.d != self.dim:
                raise IndexStoreError(f"{self.directory}: FAISS index holds {index.ntotal} x {index.d}, "
                                      f"expected {n} x {self.dim}")
            v = self._check_vectors(vectors)
            got: list[int] = []
            for start in range(0, n, 10_000):
                ids, _new, seq = self.db.add(v[start:start + 10_000],
                                             [validate_record(r) for r in records[start:start + 10_000]])
                got.extend(ids)
            if got != list(range(1, n + 1)):
                raise IndexStoreError(f"{self.directory}: imported records got ids {got[:3]}..., expected 1..{n} "
                                      "(duplicate sha256 among them?)")
            ids = np.arange(1, n + 1, dtype=np.int64)
            rng = np.random.default_rng(n)
            q_rows = rng.permutation(n)[: min(ann.TUNING_QUERIES, n // 10)]
            ann.set_search_threads(os.cpu_count() or 1)
            try:
                tuning = ann.tune(index, v, ids, q_rows, recall_target=self.recall_target)
            finally:
                ann.set_search_threads(1)
            with self._rw.write():
                self._index, self._tuning, self._factory, self._seq = index, tuning, factory, seq
                self._mmapped = False
        return self.checkpoint()

    def refresh(self) -> int:
        """Catch up with changes committed by another process (for read-only opens).

        Returns the number of ids added or removed. Reloads fully if the writer published
        generations and pruned the log past what this store holds.
        """
        with self._wmutex:
            newer = self._mmap and max(gens.list_generations(self.directory), default=0) > self._newest_seen
            if self.db.pruned_through() > self._seq or newer:
                self._load()  # a memory-mapped replica swaps to the newest generation (mapped too)
                return -1
            return self._replay()

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        with self._rw.read():
            return int(self._index.ntotal)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}) float32, got shape {np.shape(queries)}")
        if not np.isfinite(q).all():
            raise ValueError("queries contain NaN or infinity")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if (norms < 1e-6).any():
            raise ValueError("a query vector is zero; it has no direction to compare")
        return np.ascontiguousarray(q / norms, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int, *, offset: int = 0, label: str | None = None,
               exclude_label: str | None = None, exclude_ids: Sequence[int] = (),
               threads: int = 1) -> list[list[SearchHit]]:
        """Top-``k`` neighbours of each query by cosine similarity, optionally filtered and paged.

        Args:
            queries: (Q, D) float32 (normalised here again, so any non-zero vector is fine).
            k: hits wanted per query (>= 1).
            offset: skip this many best hits first (pagination: ranks ``offset .. offset+k-1``).
            label: only images with exactly this label.
            exclude_label: no image with exactly this label (unlabelled images stay).
            exclude_ids: never return these ids.
            threads: cores for this call. An unfiltered single query over an exact index on 2+
                threads is one BLAS product on that many cores (:func:`index.ann.lone_exact_search`,
                ~2.5x faster than FAISS's one-thread scan over 20k x 1280); otherwise the store's
                FAISS thread count applies. (2-3 unfiltered queries over an exact index read the
                rows once, :func:`index.ann.blocked_exact_search`.)

        Filters run inside FAISS as an ``IDSelector``, so a filtered search returns exactly
        ``min(k, matches - offset)`` hits: with an IVF index ``nprobe`` is raised (up to every
        list) for queries whose probed lists hold too few matches.

        Returns:
            Q lists of at most ``k`` :class:`SearchHit`, score descending, no -1 ids.
            Thread-safe; each call sees one consistent snapshot of the index.
        """
        q = self._check_queries(queries)
        k, offset = _check_window(k, offset)
        return self._search(q, k, offset, self._filter(label, exclude_label, exclude_ids), threads=threads)

    def search_by_id(self, id: int, k: int, *, offset: int = 0, label: str | None = None,
                     exclude_label: str | None = None) -> list[SearchHit]:
        """Top-``k`` neighbours of the stored image ``id`` (itself excluded). KeyError if unknown.

        ``offset``, ``label`` and ``exclude_label`` as in :meth:`search`.
        """
        v = self.db.vector(int(id))
        if v is None:
            raise KeyError(id)
        q = self._check_queries(v[None, :])
        k, offset = _check_window(k, offset)
        # One hit more and drop the image itself: cheaper than a selector over every vector.
        return self._search(q, k, offset, self._filter(label, exclude_label, ()), drop=int(id))[0]

    def _filter(self, label: str | None, exclude_label: str | None,
                exclude_ids: Sequence[int]) -> "_Filter | None":
        """The FAISS selector for a filter, or None when nothing is filtered."""
        excluded = np.unique(np.asarray(list(exclude_ids), dtype=np.int64))
        if label is None and exclude_label is None and not len(excluded):
            return None
        if label is not None:
            allowed = self.db.ids_with_label(label) if label != exclude_label else np.zeros(0, np.int64)
            allowed = np.ascontiguousarray(allowed[~np.isin(allowed, excluded)])
            return _Filter(faiss.IDSelectorBatch(allowed), empty=not len(allowed))
        banned = excluded
        if exclude_label is not None:
            banned = np.unique(np.concatenate([banned, self.db.ids_with_label(exclude_label)]))
        inner = faiss.IDSelectorBatch(np.ascontiguousarray(banned))
        return _Filter(faiss.IDSelectorNot(inner), keep=(inner,))

    def _search(self, q: np.ndarray, k: int, offset: int, filt: "_Filter | None",
                drop: int | None = None, threads: int = 1) -> list[list[SearchHit]]:
        """Ranks ``offset .. offset+k-1`` of each (Q, D) unit query, ``drop`` left out."""
        want = offset + k + (drop is not None)
        if filt is not None and filt.empty:
            return [[] for _ in range(len(q))]
        with self._rw.read():
            n = self._index.ntotal
            if n == 0 or len(q) == 0:
                return [[] for _ in range(len(q))]
            ann.set_search_threads(self.search_threads)
            ann.route_exact_search(self.dim)
            flat = ann.flat_rows(self._index)
            # exact: a few more candidates than wanted, rescored one way below (rank_exact)
            fetch = min(want + (ann.RESCORE_MARGIN if flat is not None else 0), n)
            if flat is not None and threads > 1 and len(q) == 1 and filt is None:
                scores, ids = ann.lone_exact_search(*flat, q, fetch, threads)
            elif flat is not None and 2 <= len(q) <= ann.BLOCKED_MAX_QUERIES and filt is None:
                scores, ids = ann.blocked_exact_search(*flat, q, fetch)
            elif filt is None:
                scores, ids = self._index.search(q, fetch)
            else:
                scores, ids = self._filtered_search(q, fetch, filt)
            if flat is not None:
                scores, ids = ann.rank_exact(self._index, q, ids, min(want, n))
        return [row[offset: offset + k] for row in self._hits(scores, ids, exclude=drop)]

    def _filtered_search(self, q: np.ndarray, kk: int, filt: "_Filter") -> tuple[np.ndarray, np.ndarray]:
        """FAISS search with ``filt``'s selector -> ((Q, kk) float32 scores, (Q, kk) int64 ids).

        Call under the read lock. IVF: start at the tuned ``nprobe`` and multiply it by 4 while
        some query got fewer than ``kk`` hits, up to ``nlist`` (an exhaustive scan of every list,
        so every matching vector is then a candidate).
        """
        index = faiss.downcast_index(self._index)
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:  # Flat (IDMap2): exact, the selector is all it needs
            params = faiss.SearchParameters()
            params.sel = filt.selector
            return index.search(q, kk, params=params)
        nprobe, nlist = int(ivf.nprobe), int(ivf.nlist)
        while True:
            ivf_params = faiss.SearchParametersIVF()
            ivf_params.sel = filt.selector
            ivf_params.nprobe = nprobe
            params = ivf_params
            if isinstance(index, faiss.IndexPreTransform):  # e.g. OPQ16,IVF1024,PQ16
                params = faiss.SearchParametersPreTransform()
                params.index_params = ivf_params
            scores, ids = index.search(q, kk, params=params)
            if nprobe >= nlist or not (ids[:, -1] < 0).any():
                return scores, ids
            nprobe = min(nlist, nprobe * 4)
            log.debug("filtered IVF search found fewer than %d hits; retrying with nprobe=%d", kk, nprobe)

    def _hits(self, scores: np.ndarray, ids: np.ndarray, exclude: int | None = None) -> list[list[SearchHit]]:
        recs = self.db.get_many(ids[ids >= 0].tolist())
        out = []
        for srow, irow in zip(scores, ids):
            hits = []
            for s, i in zip(srow.tolist(), irow.tolist()):
                if i < 0 or i == exclude:
                    continue
                r = recs.get(i)
                if r is None:  # deleted after the snapshot this search saw
                    continue
                hits.append(SearchHit(id=i, score=min(1.0, max(-1.0, s)), path=r.path, label=r.label))
            out.append(hits)
        return out

    def get(self, id: int) -> ImageRecord | None:
        return self.db.get(id)

    def folder_stats(self) -> dict[str, tuple[int, int, float, str]]:
        """path -> (id, size, mtime, sha256) of every folder record (the batch job's skip list)."""
        return self.db.folder_stats()

    def shas_present(self, shas: Sequence[str]) -> dict[str, ImageRecord]:
        """sha256 -> record, for the given hashes that are indexed."""
        return self.db.shas_present(shas)

    def touch(self, id: int, size: int, mtime: float) -> None:
        """Record a new size/mtime for an image whose bytes did not change (no vector change)."""
        self._require_writable()
        with self._wmutex:
            self.db.touch(id, size, mtime)

    def get_by_path(self, path: str, source: str = "folder") -> ImageRecord | None:
        return self.db.by_path(source, Path(path).as_posix())

    def get_by_sha256(self, sha256: str) -> ImageRecord | None:
        return self.db.by_sha(sha256.lower())

    def vector(self, id: int) -> np.ndarray | None:
        """The stored (D,) float32 unit vector of ``id``, or None."""
        return self.db.vector(id)

    def image_path(self, id: int) -> Path | None:
        """Absolute path of the image of ``id``, only if it resolves inside its root."""
        rec = self.db.get(id)
        if rec is None:
            return None
        root = self.images_root if rec.source == "folder" else self.directory / UPLOADS_DIR
        if root is None:
            return None
        root = root.resolve()
        p = (root / rec.path).resolve()
        if not p.is_relative_to(root) or p == root:
            return None
        return p

    def info(self) -> dict:
        """Summary for ``lookalike index info`` and the service."""
        with self._rw.read():
            ntotal = int(self._index.ntotal)
            factory = self._factory
            tuning = self._tuning
        return {
            "directory": str(self.directory),
            "ntotal": ntotal,
            "dim": self.dim,
            "factory": factory,
            "factory_requested": self.factory_requested,
            "metric": ann.METRIC_NAME,
            "fingerprint": self.fingerprint,
            "generation": self.generation,
            "recall_at_10": float(tuning.recall_at_10),
            "recall_target": self.recall_target,
            "search_params": dict(tuning.params),
            "recall_measured_on": {"queries": tuning.n_queries, "ntotal": tuning.n_at_tuning},
            "early_ann": dict(self._early) if self._early else None,
            "faiss_version": ann.faiss_version(),
            "images_root": str(self.images_root) if self.images_root else None,
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "pending_changes": self.db.last_seq() - self._published_seq(),
            "refused_generations": list(self.refused),
            "writable": self.writable,
        }

    # ------------------------------------------------------------------ writes
    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"vectors must be (N, {self.dim}) float32, got shape {np.shape(vectors)}")
        if not np.isfinite(v).all():
            raise ValueError("vectors contain NaN or infinity")
        norms = np.linalg.norm(v, axis=1)
        if len(v) and np.abs(norms - 1.0).max() > 1e-3:
            raise ValueError(f"vectors must be unit norm (cosine by construction); norms range "
                             f"{norms.min():.4f}..{norms.max():.4f}")
        return np.ascontiguousarray(v / norms[:, None], dtype=np.float32) if len(v) else v

    def add(self, vectors: np.ndarray, records: list[dict]) -> list[int]:
        """Add (N, D) float32 unit ``vectors`` with their record dicts; durable before return.

        Records need ``path``, ``sha256``, ``size``, ``mtime``, ``source`` (``folder``|``upload``)
        and optionally ``label``. A record whose sha256 is already indexed (or repeated in this
        call) is not added twice: its existing id is returned. Returns one id per record.
        """
        self._require_writable()
        v = self._check_vectors(vectors)
        recs = [validate_record(r) for r in records]
        if len(v) != len(recs):
            raise ValueError(f"{len(v)} vectors but {len(recs)} records")
        if not recs:
            return []
        with self._wmutex:
            ids, new, seq = self.db.add(v, recs)
            if new:
                pos = np.asarray([p for p, _ in new])
                with self._rw.write():
                    self._index.add_with_ids(v[pos], np.asarray([i for _, i in new], dtype=np.int64))
            self._seq = seq
        return ids

    def add_upload(self, data: bytes, vector: np.ndarray, *, label: str | None, ext: str) -> ImageRecord:
        """Store uploaded image bytes in ``uploads/<sha256>.<ext>`` and index ``vector`` (D,) float32.

        Returns the existing record if these bytes are already indexed. Durable before return.
        """
        self._require_writable()
        ext = ext.lower().lstrip(".")
        if not _EXT_RE.match(ext):
            raise ValueError(f"file extension {ext!r} is not allowed (letters/digits, at most 8)")
        v = self._check_vectors(np.asarray(vector, dtype=np.float32).reshape(1, -1))  # before writing any file
        sha = hashlib.sha256(data).hexdigest()
        existing = self.db.by_sha(sha)
        if existing is not None:
            return existing
        up = self.directory / UPLOADS_DIR
        up.mkdir(exist_ok=True)
        name = f"{sha}.{ext}"
        atomic_write(up / name, bytes(data))
        try:
            (i,) = self.add(v, [{"path": name, "label": label, "sha256": sha, "size": len(data),
                                 "mtime": time.time(), "source": "upload"}])
        except BaseException:
            # not indexed (e.g. the disk filled up): leave no orphan file behind
            if self.db.by_sha(sha) is None:
                (up / name).unlink(missing_ok=True)
            raise
        rec = self.db.get(i)
        assert rec is not None
        return rec

    def remove(self, ids: list[int]) -> int:
        """Delete ids (unknown ones ignored); durable before return. Returns how many were removed."""
        self._require_writable()
        ids = [int(i) for i in ids]
        uploads = [r for r in self.db.get_many(ids).values() if r.source == "upload"]
        with self._wmutex:
            removed, seq = self.db.remove(ids)
            if removed:
                with self._rw.write():
                    self._index.remove_ids(np.asarray(removed, dtype=np.int64))
            self._seq = seq
        trash = self.directory / UPLOADS_DIR / DELETED_DIR
        for r in uploads:
            if r.id in removed:
                src = self.directory / UPLOADS_DIR / r.path
                try:
                    trash.mkdir(exist_ok=True)
                    os.replace(src, trash / r.path)  # purged after DELETED_GRACE_S (see purge_deleted)
                except FileNotFoundError:
                    pass
                except OSError:
                    src.unlink(missing_ok=True)
        return len(removed)

    def purge_deleted(self, grace_s: float = DELETED_GRACE_S) -> int:
        """Remove the bytes of deleted uploads older than ``grace_s`` seconds; returns how many."""
        trash = self.directory / UPLOADS_DIR / DELETED_DIR
        if not trash.is_dir():
            return 0
        now, n = time.time(), 0
        for p in trash.iterdir():
            try:
                if p.is_file() and now - p.stat().st_ctime > grace_s:  # ctime: when it was moved here
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                continue
        return n

    # ------------------------------------------------------------------ checkpoints
    def _desired_factory(self, n: int) -> str:
        if self._trained is not None:  # a shard (or a merge of shards): the structure trained for all
            return self._trained_factory()
        if self.factory_requested == "auto":
            factory = ann.choose_factory("auto", n, self.dim, max_ram=self.max_ram)
            early = ann.early_ann_candidate(n, self.dim, max_ram=self.max_ram) if factory == "Flat" else None
            if early is not None and (self._factory != "Flat" or self._early is None
                                      or n >= 2 * int(self._early.get("n", 0))):
                return early  # measured by _build_early; kept only if it is as good as exact
            return factory
        if self.factory_requested == "Flat":
            return "Flat"
        nlist = ann.nlist_of(ann.empty_index(self.factory_requested, self.dim)) or 1
        # too few vectors to train this IVF well (faiss asks for ~39 per centroid): stay exact
        return self.factory_requested if n >= 39 * nlist else "Flat"

    def _needs_rebuild(self, desired: str) -> bool:
        if desired == self._factory:
            return False
        if self.factory_requested == "auto" and desired != "Flat" and self._factory != "Flat":
            cur = ann.nlist_of(self._index) or 1
            want = ann.nlist_of(ann.empty_index(desired, self.dim)) or 1
            return not (0.5 <= cur / want <= 2.0)  # hysteresis: retrain only when 4x off
        return True

    def _published_seq(self) -> int:
        """The change seq the current generation holds; 0 (before the first change, seqs start at
        1) when none is published or readable, so that every change counts as pending."""
        for number in gens.list_generations(self.directory):
            if number == self.generation:
                try:
                    return int(json.loads((gens.gen_path(self.directory, number) / gens.MANIFEST_FILE)
                                          .read_text())["last_seq"])
                except (OSError, ValueError, KeyError):
                    return 0
        return 0

    def checkpoint(self) -> int:
        """Publish the current state as a new generation (atomically); returns its number.

        With ``auto`` this is where the structure follows the collection: Flat while small,
        IVF (trained on the stored vectors and tuned to the recall target) above the bound.
        Writers wait meanwhile; searches continue.
        """
        self._require_writable()
        self.purge_deleted()
        with self._wmutex:
            n = len(self)
            desired = self._desired_factory(n)
            if self._needs_rebuild(desired):
                log.info("restructuring index: %s -> %s at %d vectors", self._factory, desired, n)
                self._rebuild_from_db(desired)
            elif self._factory != "Flat" and abs(n - self._tuning.n_at_tuning) > RETUNE_DRIFT * max(1, self._tuning.n_at_tuning):
                self._retune()
            with self.db.snapshot() as con:
                seq = self.db.last_seq(con)
                count = self.db.count(con)
                if seq != self._seq or count != self._index.ntotal:
                    raise IndexStoreError(f"{self.directory}: in-memory index (seq {self._seq}, "
                                          f"{self._index.ntotal} vectors) differs from the metadata (seq {seq}, "
                                          f"{count} rows); another writer changed it?")
                t = self._tuning
                manifest = {
                    "factory": self._factory, "factory_requested": self.factory_requested,
                    "fingerprint": self.fingerprint, "last_seq": seq,
                    "recall_at_10": float(t.recall_at_10), "recall_target": self.recall_target,
                    "early_ann": self._early,
                    "tuning": {"params": t.params, "n_queries": t.n_queries, "n_at_tuning": t.n_at_tuning,
                               "curve": t.curve,
                               "method": "held-out sample of the collection: k-means trained without it, "
                                         "each query's own id dropped; recall@10 vs exact search"},
                }
                gen = gens.publish(self.directory, self._index, manifest,
                                   lambda p: self.db.write_snapshot(con, p))
            self.generation = gen.number
            self.refused = []
            kept = []
            for number in gens.list_generations(self.directory):
                try:
                    kept.append(int(json.loads((gens.gen_path(self.directory, number) / gens.MANIFEST_FILE)
                                               .read_text())["last_seq"]))
                except (OSError, ValueError, KeyError):
                    continue
            if kept:
                self.db.prune_changes(min(kept))
            return gen.number

    def _retune(self) -> None:
        with self.db.snapshot() as con:
            ids, vecs = MetadataDB.all_vectors(con, self.dim)
        rng = np.random.default_rng(len(ids))
        q_rows = rng.permutation(len(ids))[: min(ann.TUNING_QUERIES, len(ids) // 10)]
        early = self._early_band(len(ids))
        with self._rw.write():
            ann.set_search_threads(2)
            try:
                if early:
                    nlist = ann.nlist_of(self._index) or 1
                    self._tuning = ann.tune(self._index, vecs, ids, q_rows,
                                            recall_target=ann.early_ann_target(self.recall_target),
                                            max_nprobe=ann.early_ann_max_nprobe(nlist))
                else:
                    self._tuning = ann.tune(self._index, vecs, ids, q_rows, recall_target=self.recall_target)
            finally:
                ann.set_search_threads(1)
        if early and not ann.passes_early_gate(self._index, self._tuning, self.recall_target):
            t = self._tuning
            log.info("%s: the IVF index no longer matches exact search at %d vectors (recall@10 %.4f "
                     "probing %s lists); going back to exact", self.directory, len(ids), t.recall_at_10,
                     t.params.get("nprobe"))
            self._early = {**(self._early or {}), "n": int(len(ids)), "kept": False,
                           "recall_at_10": float(t.recall_at_10), "nprobe": int(t.params.get("nprobe", 0))}
            self._rebuild_from_db("Flat")
