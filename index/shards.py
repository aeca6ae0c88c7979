"""Sharded batch indexing: shard assignment, the common trained index, and the merge.

A collection too large for one job is indexed as N shards, by N processes on any machines
(``lookalike index build --shard i/N``, or one shard per rank under ``torchrun``), then merged
into one index (``lookalike index merge``)::

    lookalike index train-quantizer --model M --images DIR --out trained.faiss   # IVF: once, on a sample
    lookalike index build --model M --images DIR --out shards --shard 0/3 --trained-from trained.faiss
    ...                                                   # shards 1/3 and 2/3, anywhere, in parallel
    lookalike index merge shards/shard-000-of-003 shards/shard-001-of-003 shards/shard-002-of-003 --out INDEX

* **Assignment.** An image belongs to shard ``sha256(relative path) mod N``: stable across
  re-runs and resumes, and independent of the order in which the folder is walked.
* **IVF.** The coarse quantizer (and PQ / OPQ) is trained once, on a sample, into an empty
  index; every shard adds its vectors to a copy of it, so the shards' inverted lists share one
  set of centroids and the merge concatenates them with FAISS's ``IndexIVF.merge_from``: no
  vector is re-assigned or re-encoded.
* **Flat.** The merge concatenates the shards' vectors.
* **Ids.** The merged index numbers its images in the order one process would have met them
  (the walk order of :func:`index.ingest.walk_images`), so ``merge`` of N shards gives the same
  ids, records and lists as one ``lookalike index build`` of the whole folder. An image whose
  bytes another image (earlier in that order) already has is dropped, as one job drops it.
* **Checks.** Every shard must be a finished shard of the same N, model fingerprint, card,
  images root, label mode and trained index, and each record must belong to its shard; a
  mismatch is refused with a message naming the shard and what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from index import ann
from index import generations as gens
from index.store import STORE_FILE, TRAINED_FILE, IndexStore, read_store_config
from models.io import atomic_write

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``.

    Raises:
        ValueError: naming the text and the expected form.
    """
    m = _SHARD_RE.match(str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_from_env(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when launched by ``torchrun`` (or Slurm/Kubernetes setting them), else None."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")


def shard_of(rel: str, n: int) -> int:
    """The shard (of ``n``) of the image at relative path ``rel``: sha256 of the POSIX path, mod n."""
    digest = hashlib.sha256(Path(rel).as_posix().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def shard_dir(out: str | Path, shard: tuple[int, int]) -> Path:
    """Where shard ``(i, N)`` of a build with ``--out OUT`` goes: ``OUT/shard-iii-of-NNN``."""
    return Path(out) / f"shard-{shard[0]:03d}-of-{shard[1]:03d}"


def walk_key(rel: str) -> tuple:
    """Sort key equal to the order :func:`index.ingest.walk_images` meets paths (one folder's
    files by name, then its subfolders by name, depth first)."""
    parts = Path(rel).parts
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


# ---------------------------------------------------------------------- the common trained index
def train_quantizer(vectors: np.ndarray, factory: str, out: str | Path, *, fingerprint: str,
                    n_planned: int) -> dict:
    """Train an empty IVF index on (S, D) float32 unit ``vectors`` and write it to ``out``.

    ``out.json`` beside it records the factory, dim, model fingerprint, sample size, the
    collection size it was chosen for and the file's sha256 (checked by every shard).
    Returns that record.

    Raises:
        ValueError: not an IVF factory, or fewer sample vectors than lists.
    """
    out = Path(out)
    index = ann.empty_index(factory, vectors.shape[1])
    nlist = ann.nlist_of(index)
    if nlist is None:
        raise ValueError(f"factory {factory!r}: only IVF indexes are trained before sharding; "
                         "Flat shards need no --trained-from")
    if len(vectors) < nlist:
        raise ValueError(f"factory {factory!r} needs at least {nlist} sample vectors to train; got {len(vectors)}")
    t0 = time.perf_counter()
    ann.set_search_threads(os.cpu_count() or 1)
    try:
        index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    finally:
        ann.set_search_threads(1)
    atomic_write(out, faiss.serialize_index(index).tobytes())
    meta = {"format": "lookalike-trained-index", "factory": factory, "dim": int(vectors.shape[1]),
            "fingerprint": fingerprint, "sample": int(len(vectors)), "n_planned": int(n_planned),
            "faiss_version": ann.faiss_version(), "train_seconds": round(time.perf_counter() - t0, 3),
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    atomic_write(out.with_name(out.name + ".json"), (json.dumps(meta, indent=2) + "\n").encode())
    log.info("trained %s on %d vectors in %.1fs -> %s", factory, len(vectors), meta["train_seconds"], out)
    return meta


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``min(n, size)`` sorted row numbers of ``n``, a seeded uniform sample."""
    return np.sort(np.random.default_rng(seed).permutation(n)[: min(n, size)])


# ---------------------------------------------------------------------- FAISS-level merge
def remap_ids(index: faiss.Index, mapping: np.ndarray) -> None:
    """Rewrite, in place, every id ``i`` stored in an IVF index's inverted lists to ``mapping[i]``.

    ``mapping``: (max id + 1,) int64. The lists must be in RAM (not memory-mapped).
    """
    invlists = faiss.extract_index_ivf(index).invlists
    for lst in range(invlists.nlist):
        size = invlists.list_size(lst)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)  # a view of the list's ids
            ids[:] = mapping[ids]


def merge_ivf(template: faiss.Index, parts: list[faiss.Index]) -> faiss.Index:
    """One IVF index holding every part's lists: a copy of ``template`` (trained, empty) into which
    each part's inverted lists are moved by ``IndexIVF.merge_from`` (the parts are left empty).

    Every part must have been filled from a copy of ``template`` (same centroids and codes).
    """
    merged = faiss.clone_index(template)
    ivf = faiss.extract_index_ivf(merged)
    for part in parts:
        ivf.merge_from(faiss.extract_index_ivf(part), 0)
    merged.ntotal = ivf.ntotal  # a wrapper (OPQ's IndexPreTransform) keeps its own count
    return merged


# ---------------------------------------------------------------------- merging shard directories
@dataclass
class MergeReport:
    out: Path
    shards: int = 0
    images: int = 0
    duplicates: int = 0
    factory: str = ""
    generation: int = 0
    recall_at_10: float = 1.0
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"merged {self.shards} shards into {self.out}: {self.images} images"
                + (f" ({self.duplicates} duplicates across shards dropped)" if self.duplicates else "")
                + f", {self.factory}, generation {self.generation}, recall@10 {self.recall_at_10:.3f}, "
                + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))


@dataclass
class _Shard:
    path: Path
    config: dict
    ids: np.ndarray  # (n,) int64, the shard's own ids
    vectors: np.ndarray  # (n, D) float32
    records: list  # ImageRecord per id
    index: faiss.Index | None  # the shard's IVF (from its newest generation), None for Flat


def check_shards(dirs: list[Path]) -> list[dict]:
    """The shards' store.json configs, refused unless they are the complete, matching shards of one build.

    Raises:
        ValueError: naming the shard and the mismatch (not a shard, other N, a missing or repeated
            shard, another model fingerprint, card, dim, images root, label mode or trained index).
    """
    if not dirs:
        raise ValueError("give the shard directories to merge")
    configs = [read_store_config(d, hint="; give the shard directories made by `lookalike index build --shard i/N`")
               for d in dirs]
    first, f0 = dirs[0], configs[0]
    for d, c in zip(dirs, configs):
        if not c.get("shard"):
            raise ValueError(f"{d}: not a shard (built without --shard i/N)")
        for key, what in (("fingerprint", "model fingerprint"), ("dim", "embedding dim"), ("card", "model card"),
                          ("images_root", "images root"), ("factory", "factory"), ("metric", "metric")):
            if c.get(key) != f0.get(key):
                raise ValueError(f"{d}: {what} {c.get(key)!r} differs from {first}'s {f0.get(key)!r}; "
                                 "every shard must come from the same build command")
        for key, what in (("count", "shard count N"), ("labels_from_folders", "--labels-from-folders")):
            if c["shard"].get(key) != f0["shard"].get(key):
                raise ValueError(f"{d}: {what} is {c['shard'].get(key)!r}, but {first} has {f0['shard'].get(key)!r}")
        sha, sha0 = (c.get("trained") or {}).get("sha256"), (f0.get("trained") or {}).get("sha256")
        if sha != sha0:
            raise ValueError(f"{d}: started from trained index {sha or 'none'}, but {first} from {sha0 or 'none'}; "
                             "every IVF shard must use the same --trained-from file")
    n = f0["shard"]["count"]
    seen: dict[int, Path] = {}
    for d, c in zip(dirs, configs):
        i = c["shard"]["index"]
        if i in seen:
            raise ValueError(f"{d}: shard {i}/{n} is given twice (also {seen[i]})")
        seen[i] = d
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise ValueError(f"shards {', '.join(f'{i}/{n}' for i in missing)} are missing; all {n} are needed")
    return configs


def _load_shard(d: Path, config: dict) -> _Shard:
    """A finished shard's records, vectors and (IVF) FAISS index, each record checked to belong to it."""
    from index.metadata import MetadataDB

    shard = (config["shard"]["index"], config["shard"]["count"])
    with IndexStore.open(d, mmap=False) as store:
        info = store.info()
        if info["pending_changes"]:
            raise ValueError(f"{d}: shard {shard[0]}/{shard[1]} is unfinished ({info['pending_changes']} changes "
                             "not in a generation); re-run its `lookalike index build` to finish it")
        with store.db.snapshot() as con:
            ids, vecs = MetadataDB.all_vectors(con, store.dim)
        recs = store.db.get_many(ids.tolist())
        generation = store.generation
    records = [recs[int(i)] for i in ids]
    for r in records:
        if r.source != "folder":
            raise ValueError(f"{d}: record {r.id} is an upload ({r.path}); shards hold folder images only")
        if shard_of(r.path, shard[1]) != shard[0]:
            raise ValueError(f"{d}: {r.path} belongs to shard {shard_of(r.path, shard[1])}/{shard[1]}, "
                             f"not {shard[0]}/{shard[1]}")
    index = None
    if config.get("trained"):
        g = gens.verify(d, generation, dim=int(config["dim"]), fingerprint=config["fingerprint"])
        index = gens.read_index(g)
        if index.ntotal != len(ids) or ann.nlist_of(index) is None:
            raise ValueError(f"{d}: generation {generation} holds {index.ntotal} vectors (IVF: "
                             f"{ann.nlist_of(index) is not None}), metadata {len(ids)}")
    return _Shard(d, config, ids, vecs, records, index)


def merge(shard_dirs: list[str | Path], out: str | Path, *, on_disk: bool | None = None) -> MergeReport:
    """Merge finished shards into one new, verified index at ``out`` (see the module docstring).

    ``on_disk``: mark the result for memory-mapped lists on read-only opens (default: as the shards).

    Raises:
        ValueError: the shards do not belong together (see :func:`check_shards`), or one is unfinished.
        FileExistsError: ``out`` is already an index.
    """
    from models import ModelCard

    t0 = time.perf_counter()
    dirs = [Path(d) for d in shard_dirs]
    out = Path(out)
    if (out / STORE_FILE).exists():
        raise FileExistsError(f"{out}: an index already exists here; merge into a new --out")
    configs = check_shards(dirs)
    shards = [_load_shard(d, c) for d, c in zip(dirs, configs)]
    t_read = time.perf_counter()

    # the order one job would have met the images in, and one image per content
    order = sorted(((walk_key(r.path), s, row) for s, sh in enumerate(shards) for row, r in enumerate(sh.records)),
                   key=lambda t: t[0])
    kept: list[tuple[int, int]] = []
    shas: set[str] = set()
    for _key, s, row in order:
        sha = shards[s].records[row].sha256
        if sha not in shas:
            shas.add(sha)
            kept.append((s, row))
    report = MergeReport(out=out, shards=len(shards), images=len(kept), duplicates=len(order) - len(kept))
    n = len(kept)
    new_id = [np.full(int(sh.ids.max(initial=0)) + 1, -1, dtype=np.int64) for sh in shards]
    for nid, (s, row) in enumerate(kept, start=1):
        new_id[s][shards[s].ids[row]] = nid
    dim = int(configs[0]["dim"])
    vectors = np.empty((n, dim), dtype=np.float32)
    records = []
    for nid, (s, row) in enumerate(kept, start=1):
        vectors[nid - 1] = shards[s].vectors[row]
        r = shards[s].records[row]
        records.append({"path": r.path, "label": r.label, "sha256": r.sha256, "size": r.size, "mtime": r.mtime,
                        "source": r.source, "added_at": r.added_at})

    t_merge = time.perf_counter()
    c0 = configs[0]
    trained_file = dirs[0] / TRAINED_FILE if c0.get("trained") else None
    if trained_file is not None:
        parts = []
        for s, sh in enumerate(shards):
            dropped = sh.ids[new_id[s][sh.ids] < 0]
            if len(dropped):
                sh.index.remove_ids(dropped)
            remap_ids(sh.index, new_id[s])
            parts.append(sh.index)
        index = merge_ivf(faiss.read_index(str(trained_file)), parts)
        factory = c0["trained"]["factory"]
    else:
        index = ann.empty_index("Flat", dim)  # Flat: the concatenation, in merged id order
        if n:
            index.add_with_ids(vectors, np.arange(1, n + 1, dtype=np.int64))
        factory = "Flat"
    t_publish = time.perf_counter()

    store = IndexStore.create(
        out, card=ModelCard.from_dict(c0["card"]), images_root=c0["images_root"], factory=c0["factory"],
        recall_target=float(c0["recall_target"]), model_dir=c0.get("model_dir"), max_ram=c0.get("max_ram"),
        on_disk=bool(c0.get("on_disk")) if on_disk is None else on_disk, trained_from=trained_file,
        extra={"merged_from": {"shards": [str(d.resolve()) for d in dirs], "count": len(dirs)}})
    try:
        report.generation = store.import_records(vectors, records, index, factory)
        info = store.info()
    finally:
        store.close()
    report.factory, report.recall_at_10 = info["factory"], info["recall_at_10"]
    t_end = time.perf_counter()
    report.seconds = {"read": t_read - t0, "order": t_merge - t_read, "merge": t_publish - t_merge,
                      "tune+publish": t_end - t_publish}
    log.info("%s", report.summary())
    return report
