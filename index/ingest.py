"""The batch indexing job: a folder of images -> embeddings -> the index.

Walks a folder recursively; files whose (path, size, mtime) match their stored record are
``unchanged`` without being read. The rest go through DataLoader worker processes, one batch
per item: read, hash (sha256), decode + preprocess with :meth:`models.Preprocess.load` (JPEG draft decoding at
the model's resize size), preprocess, and embed the batch (torch: inference_mode, channels_last,
bf16 autocast where supported; or ONNX Runtime). The main process drops ``duplicates`` (content
already indexed, or seen earlier in this run) and adds each batch in one durable transaction. Files that cannot be read or decoded are ``failed``, each with a one-line reason
in the log file and the module log.

Crash safety: a batch is either committed (and then ``unchanged`` on the next run, because its
records hold the size and mtime read) or not at all, so a run killed at any point and re-run
indexes every file exactly once. A changed file (same path, new bytes) replaces its record.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.decode import DEFAULT_LIMITS, DecodeLimits, ImageDecodeError
from models.decode import IMAGE_SUFFIXES as DECODABLE_SUFFIXES
from models.preprocess import Preprocess

from index.errors import IndexFullError, is_disk_full
from index.store import IndexStore

log = logging.getLogger(__name__)

#: File name endings treated as images (others are ignored). Formats the decoder refuses
#: (TIFF, BMP, HEIC...) are still listed so that they are reported as failures, not skipped.
IMAGE_SUFFIXES = DECODABLE_SUFFIXES | frozenset({".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"})
LOG_DIR = "logs"


@dataclass
class IngestReport:
    """Counts of one run. ``failures``: (relative path, code, reason)."""

    added: int = 0
    unchanged: int = 0
    duplicates: int = 0
    failed: int = 0
    replaced: int = 0
    ignored: int = 0
    seen: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0  #: read + sha256 + decode + preprocess, summed over workers
    embed_seconds: float = 0.0
    wait_seconds: float = 0.0  #: main process blocked waiting for decoded batches
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    log_path: Path | None = None
    generation: int | None = None

    @property
    def images_per_s(self) -> float:
        done = self.added + self.duplicates + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        s = (f"added {self.added}, unchanged {self.unchanged}, duplicates {self.duplicates}, failed {self.failed}"
             + (f", replaced {self.replaced}" if self.replaced else "")
             + f" in {self.seconds:.1f}s")
        if self.log_path is not None and self.failed:
            s += f"; failures listed in {self.log_path}"
        return s


def walk_images(root: Path, *, include: Sequence[str] | None = None,
                exclude: Sequence[Path] = ()) -> tuple[list[Path], int]:
    """Image files under ``root`` (recursive, sorted, hidden entries and ``exclude`` dirs skipped).

    ``include``: only these first-level subfolder names. Returns (files, number ignored).

    The images root is a boundary: symlinked folders are not descended into, and a symlinked
    file is taken only if it resolves inside ``root``; the others are ignored with one warning
    that counts them (a link to ``/etc`` must not end up indexed and served).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    excluded = {p.resolve() for p in exclude}
    tops = [root / c for c in include] if include is not None else [root]
    for t in tops:
        if not t.is_dir():
            raise FileNotFoundError(f"{t}: no such folder under {root}")
    files: list[Path] = []
    ignored = 0
    outside: list[str] = []
    root_real = root.resolve()
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            dp = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (dp / d).resolve() not in excluded)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    p = dp / name
                    if (p.is_symlink() or top.is_symlink()) and not p.resolve().is_relative_to(root_real):
                        outside.append(str(p.relative_to(root)))
                        ignored += 1
                        continue
                    files.append(p)
                else:
                    ignored += 1
    if outside:
        log.warning("%s: ignored %d symlinks that point outside the images root (first: %s)",
                    root, len(outside), ", ".join(outside[:3]))
    return files, ignored


class Embedder:
    """Wraps an :class:`models.backends.InferenceBackend`: (N, 3, S, S) float32 -> (N, D) float32 unit.

    Built with :meth:`load`, it also knows how to rebuild itself (``spec``) inside a worker
    process, so decode workers can embed their own batches.
    """

    def __init__(self, backend, spec: tuple | None = None) -> None:
        self.backend = backend
        self.card = backend.card
        self.preprocess = backend.preprocess
        self.spec = spec

    @classmethod
    def load(cls, model_dir: str | Path, *, backend: str = "torch", bf16: bool | None = None) -> "Embedder":
        from models.backends import load_backend

        if backend == "auto":
            from models.backend_choice import choose_backend

            backend = choose_backend(model_dir)  # measured on this CPU, saved beside the model
            if bf16 is None:
                bf16 = False  # auto is fp32 (bf16 changes 3% of top-10 neighbours; models.backend_choice)
        kwargs = {"bf16": bf16} if backend == "torch" else {}
        b = load_backend(model_dir, backend, **kwargs)
        return cls(b, spec=(str(model_dir), backend, getattr(b, "bf16", None)))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.backend.embed_array(batch)


_WORKER_EMBEDDERS: dict[tuple, Embedder] = {}


def _embedder_here(embedder: Embedder) -> Embedder:
    """The embedder to use in this process: the given one in the main process and, for torch,
    in forked workers too (the inherited model is used as is, no reload); an ONNX Runtime
    session must not cross a fork, so workers rebuild that one from its spec, once each."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None or embedder.spec is None or embedder.spec[1] == "torch":
        return embedder
    if embedder.spec not in _WORKER_EMBEDDERS:
        model_dir, backend, bf16 = embedder.spec
        _WORKER_EMBEDDERS[embedder.spec] = Embedder.load(model_dir, backend=backend, bf16=bf16)
    return _WORKER_EMBEDDERS[embedder.spec]


class _BatchDataset:
    """torch Dataset whose item ``b`` is batch ``b``: read + sha256 + safe decode + preprocess of
    each file, then one embedding call for the decodable ones. Runs in DataLoader workers, each
    a single-threaded process, so the cores run independent batches (no OpenMP barriers)."""

    def __init__(self, files: Sequence[Path], rels: Sequence[str], embedder: Embedder, limits: DecodeLimits,
                 draft: bool, batch_size: int) -> None:
        self.files = list(files)
        self.rels = list(rels)
        self.embedder = embedder
        self.preprocess = embedder.preprocess
        self.limits = limits
        self.draft_size = self.preprocess.draft_size() if draft else None
        self.starts = list(range(0, len(self.files), batch_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.starts)

    def _decode(self, i: int) -> dict:
        rel = self.rels[i]
        out = {"rel": rel, "array": None, "vector": None, "code": None, "reason": None, "sha256": None,
               "size": 0, "mtime": 0.0}
        try:
            with open(self.files[i], "rb") as fh:
                st = os.fstat(fh.fileno())
                out["size"], out["mtime"] = st.st_size, st.st_mtime
                if st.st_size > self.limits.max_bytes:
                    raise ImageDecodeError("too_large", f"file is {st.st_size} bytes, over the limit of "
                                           f"{self.limits.max_bytes}", rel)
                data = fh.read()
            out["sha256"] = hashlib.sha256(data).hexdigest()
            # decode + crop-first preprocess: the cost is bounded by the crop (models.preprocess)
            out["array"] = self.preprocess.load(data, limits=self.limits, source=rel,
                                                jpeg_draft=self.draft_size is not None)
        except ImageDecodeError as exc:
            out["code"], out["reason"] = exc.code, exc.reason
        except OSError as exc:
            out["code"], out["reason"] = "unreadable", f"cannot read file ({exc.strerror or exc})"
        return out

    def __getitem__(self, b: int) -> tuple[list[dict], float, float]:
        """-> (items, decode seconds, embed seconds); items carry ``vector`` (D,) float32 or a failure."""
        t0 = time.perf_counter()
        start = self.starts[b]
        items = [self._decode(i) for i in range(start, min(start + self.batch_size, len(self.files)))]
        t1 = time.perf_counter()
        ok = [it for it in items if it["array"] is not None]
        if ok:
            vecs = _embedder_here(self.embedder)(np.stack([it["array"] for it in ok]))
            for it, v in zip(ok, vecs):
                it["vector"] = v
        for it in items:
            it["array"] = None  # do not ship pixels back to the main process
        return items, t1 - t0, time.perf_counter() - t1


def embed_files(embedder: Embedder, files: Sequence[Path], rels: Sequence[str], *, batch_size: int = 64,
                workers: int | None = None, limits: DecodeLimits = DEFAULT_LIMITS,
                draft: bool = True) -> tuple[list[str], np.ndarray]:
    """Embed image files without an index (e.g. the sample an IVF is trained on).

    Returns the relative paths that decoded and their (M, D) float32 unit vectors; the others
    are logged with their reason and left out.
    """
    from torch.utils.data import DataLoader

    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    ds = _BatchDataset(list(files), list(rels), embedder, limits, draft, batch_size)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                        prefetch_factor=2 if workers else None)
    ok_rels: list[str] = []
    vecs: list[np.ndarray] = []
    for items, _dec, _emb in loader:
        for it in items:
            if it["vector"] is None:
                log.warning("skipped %s: %s (%s)", it["rel"], it["reason"], it["code"])
            else:
                ok_rels.append(it["rel"])
                vecs.append(it["vector"])
    dim = embedder.card.embedding_dim
    return ok_rels, (np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, dim), np.float32))


def in_shard(rel: str, shard: tuple[int, int] | None) -> bool:
    """Whether the image at relative path ``rel`` belongs to ``shard`` = (i, N); None: every image.

    Decided by a stable hash of the path (see :func:`index.shards.shard_of`), so a re-run or a
    resumed job keeps each image in its shard.
    """
    if shard is None:
        return True
    from index.shards import shard_of

    return shard_of(rel, shard[1]) == shard[0]


@dataclass
class _Plan:
    """What a run has to read: the files to embed (absolute and relative to the images root) and
    the records known before it started (path -> (id, size, mtime, sha256))."""

    todo: list[Path]
    rels: list[str]
    known: dict[str, tuple[int, int, float, str]]


def _plan(store: IndexStore, folder: Path, root: Path, report: IngestReport, *, include: Sequence[str] | None,
          shard: tuple[int, int] | None) -> _Plan:
    """Walk ``folder`` and diff it against the index: count unchanged files and stat failures."""
    files, report.ignored = walk_images(folder, include=include, exclude=[store.directory])
    known = store.folder_stats()
    plan = _Plan([], [], known)
    outside = 0
    for f in files:
        rel = f.relative_to(root).as_posix()
        if not in_shard(rel, shard):
            outside += 1
            continue
        report.seen += 1
        try:
            st = f.stat()
        except OSError as exc:
            report.failed += 1
            report.failures.append((rel, "unreadable", f"cannot stat ({exc.strerror or exc})"))
            continue
        k = known.get(rel)
        if k is not None and k[1] == st.st_size and k[2] == st.st_mtime:
            report.unchanged += 1
            continue
        plan.todo.append(f)
        plan.rels.append(rel)
    where = f" (shard {shard[0]}/{shard[1]}: {outside} files belong to other shards)" if shard else ""
    log.info("%s: %d image files, %d unchanged, %d to read%s", folder, report.seen, report.unchanged,
             len(plan.todo), where)
    return plan


def _open_job_log(store: IndexStore, folder: Path, log_path: str | Path | None, report: IngestReport):
    if log_path is None:
        (store.directory / LOG_DIR).mkdir(exist_ok=True)
        log_path = store.directory / LOG_DIR / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    report.log_path = Path(log_path)
    logf = open(report.log_path, "a", encoding="utf-8")
    logf.write(f"# lookalike index ingest of {folder} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    for rel, code, reason in report.failures:
        logf.write(f"FAILED\t{rel}\t{code}\t{reason}\n")
    return logf


class _BatchWriter:
    """Commits embedded batches to the store: failures logged, duplicates and unchanged bytes
    skipped, a changed file's old record replaced, each batch one durable transaction."""

    def __init__(self, store: IndexStore, report: IngestReport, known: dict, logf, *,
                 labels_from_folders: bool) -> None:
        self.store, self.report, self.known, self.logf = store, report, known, logf
        self.label = (lambda rel: Path(rel).parent.name or None) if labels_from_folders else (lambda rel: None)
        self.seen_shas: dict[str, str] = {}

    def write(self, items: list[dict]) -> int:
        """Commit one batch of items (``rel``, ``vector`` or failure, ``sha256``...); returns how many were added."""
        report, store = self.report, self.store
        ok = []
        for it in items:
            if it["vector"] is None:
                report.failed += 1
                report.failures.append((it["rel"], it["code"], it["reason"]))
                log.warning("skipped %s: %s (%s)", it["rel"], it["reason"], it["code"])
                self.logf.write(f"FAILED\t{it['rel']}\t{it['code']}\t{it['reason']}\n")
            else:
                ok.append(it)
        present = store.shas_present([it["sha256"] for it in ok])
        new, replace_ids = [], []
        for it in ok:
            sha, rel = it["sha256"], it["rel"]
            prev = self.known.get(rel)
            if prev is not None and prev[3] != sha:
                replace_ids.append(prev[0])  # this path's old content is gone whatever happens next
            if sha in present and present[sha].source == "folder" and present[sha].path == rel:
                store.touch(present[sha].id, it["size"], it["mtime"])  # same bytes, new mtime
                report.unchanged += 1
            elif sha in present or sha in self.seen_shas:
                other = present[sha].path if sha in present else self.seen_shas[sha]
                report.duplicates += 1
                self.logf.write(f"DUPLICATE\t{rel}\tsame sha256 as {other}\n")
            else:
                self.seen_shas[sha] = rel
                new.append(it)
        if replace_ids:
            report.replaced += store.remove(replace_ids)
        if new:
            store.add(np.stack([it["vector"] for it in new]),
                      [{"path": it["rel"], "label": self.label(it["rel"]), "sha256": it["sha256"],
                        "size": it["size"], "mtime": it["mtime"], "source": "folder"} for it in new])
            report.added += len(new)
        return len(new)


def index_folder(store: IndexStore, embedder: Embedder, folder: str | Path, *, labels_from_folders: bool = False,
                 include: Sequence[str] | None = None, batch_size: int = 64, workers: int | None = None,
                 limits: DecodeLimits = DEFAULT_LIMITS, draft: bool = True, progress: bool = True,
                 checkpoint: bool = True, checkpoint_every: int = 100_000, threads: int | None = None,
                 log_path: str | Path | None = None, shard: tuple[int, int] | None = None) -> IngestReport:
    """Index every image under ``folder`` (which must lie inside ``store.images_root``).

    Args:
        store: a writable :class:`IndexStore` built for ``embedder``'s model.
        embedder: the model; its card must match the store's fingerprint.
        labels_from_folders: label = the image's parent folder name (ImageFolder layout).
        include: only these first-level subfolders of ``folder``.
        batch_size: images per embedding batch (and per durable commit).
        workers: DataLoader processes that decode and embed (default: CPU count, at most 4;
            0 = everything in this process).
        checkpoint: publish a generation at the end (and every ``checkpoint_every`` adds).
        threads: torch threads of the main process when ``workers=0`` (default: torch's own).
            With workers, each worker is one single-threaded process that decodes *and* embeds
            its batches: measured on the shared 2-core machine, two 1-thread processes beat one
            2-thread process by ~3x (OpenMP barriers stall when other jobs take a core).
        log_path: failure log (default ``<index>/logs/ingest-<time>.log``).
        shard: ``(i, N)``: only the images of shard i of N (:func:`in_shard`); ``seen`` and the
            other counts are of this shard's images.

    Returns:
        The :class:`IngestReport` with counts and failures.
    """
    folder, root = _check_job(store, embedder, folder)
    t_start = time.perf_counter()
    report = IngestReport()
    plan = _plan(store, folder, root, report, include=include, shard=shard)
    logf = _open_job_log(store, folder, log_path, report)
    try:
        _run_batches(store, embedder, plan, report, logf, labels_from_folders=labels_from_folders,
                     batch_size=batch_size, workers=workers, limits=limits, draft=draft, progress=progress,
                     checkpoint=checkpoint, checkpoint_every=checkpoint_every, threads=threads)
    finally:
        report.seconds = time.perf_counter() - t_start
        try:
            logf.write(f"# {report.summary()}\n")
            logf.close()
        except OSError as exc:  # the log may sit on the full volume too
            log.warning("could not finish the job log %s: %s", report.log_path, exc)
    log.info("%s", report.summary())
    return report


def _check_job(store: IndexStore, embedder: Embedder, folder: str | Path) -> tuple[Path, Path]:
    """Refuse a job that cannot run; returns (folder, images root), both resolved."""
    if not store.writable:
        raise ValueError(f"{store.directory}: open the index writable to add images")
    store.check_model(embedder.card)
    if store.images_root is None:
        raise ValueError(f"{store.directory}: the index has no images root; folder images cannot be added")
    folder = Path(folder).resolve()
    root = store.images_root.resolve()
    if not folder.is_relative_to(root):
        raise ValueError(f"{folder} is outside the index's images root {root}; index images under it "
                         "(or build a new index with --images pointing at a common parent)")
    return folder, root


def _run_batches(store: IndexStore, embedder: Embedder, plan: _Plan, report: IngestReport, logf, *,
                 labels_from_folders: bool, batch_size: int, workers: int | None, limits: DecodeLimits,
                 draft: bool, progress: bool, checkpoint: bool, checkpoint_every: int, threads: int | None) -> None:
    """Decode + embed ``plan.todo`` in workers and commit batch by batch (see :class:`_BatchWriter`)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    prev_threads = torch.get_num_threads()
    if threads and not workers:
        torch.set_num_threads(threads)
    ds = _BatchDataset(plan.todo, plan.rels, embedder, limits, draft, batch_size)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    writer = _BatchWriter(store, report, plan.known, logf, labels_from_folders=labels_from_folders)
    since_ckpt = 0
    bar = tqdm(total=len(plan.todo), unit="img", desc="indexing", disable=not progress, smoothing=0.1)
    try:
        batches = iter(loader)
        while True:
            t_wait = time.perf_counter()
            got = next(batches, None)
            report.wait_seconds += time.perf_counter() - t_wait
            if got is None:
                break
            items, dec_s, emb_s = got
            report.decode_seconds += dec_s
            report.embed_seconds += emb_s
            since_ckpt += writer.write(items)
            bar.update(len(items))
            bar.set_postfix(added=report.added, dup=report.duplicates, failed=report.failed, refresh=False)
            if checkpoint and since_ckpt >= checkpoint_every:
                store.checkpoint()
                since_ckpt = 0
        if checkpoint and (report.added or report.replaced or store.info()["pending_changes"]):
            report.generation = store.checkpoint()
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        # Each batch is one durable transaction: what was added is kept, the batch in flight is
        # not, and the next run skips what is indexed (unchanged) and goes on from there.
        raise IndexFullError(
            f"{store.directory}: the volume is full ({exc}); {report.added} images were added and are "
            "durable. Free space there and re-run the same command: it resumes where it stopped"
        ) from None
    finally:
        torch.set_num_threads(prev_threads)
        bar.close()
