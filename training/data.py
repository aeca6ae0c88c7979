"""Training data: ImageFolder discovery, class-disjoint splits, P×K sampling, augmentation.

Decoding always goes through :func:`models.decode_image`; the eval view of an image is the
card's :class:`models.Preprocess` (the one preprocessing definition). Small datasets are
decoded once and kept in RAM, already resized to ``resize_size`` (uint8), so an epoch costs
no JPEG decoding.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from models.card import ModelCard
from models.decode import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from models.io import read_class_list
from models.preprocess import Preprocess

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Split:
    """Paths and integer labels of one split; ``classes[label]`` is the class name."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def image_root(root: str | Path) -> Path:
    """``<root>/images`` if it exists (cub100 layout), else ``root`` itself."""
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"{r}: dataset directory not found")
    return r / "images" if (r / "images").is_dir() else r


def scan_image_folder(root: str | Path, *, skipped: list[tuple[Path, str]] | None = None) -> dict[str, list[Path]]:
    """Class name -> sorted image paths, from an ImageFolder layout (one sub-folder per class).

    Files without an image suffix are left out; with ``skipped`` each is appended to it as
    ``(path, reason)`` (hidden files are not counted).
    """
    base = image_root(root)
    out: dict[str, list[Path]] = {}
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        files = []
        for p in sorted(d.rglob("*")):
            if not p.is_file():
                continue
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
            elif skipped is not None and not p.name.startswith("."):
                skipped.append((p, f"not an image file (suffix {p.suffix or 'none'!r})"))
        if files:
            out[d.name] = files
    if not out:
        raise ValueError(f"{base}: no class folders with images ({', '.join(sorted(IMAGE_SUFFIXES))}) found; expected <root>/<class>/<image>")
    return out


def _read_class_list(root: Path, rel: str) -> list[str]:
    p = Path(rel) if Path(rel).is_absolute() else root / rel
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: class list not found. To hold out a seeded fraction of the classes instead, pass "
            "--data.train_classes null --data.test_classes null (--data.test_fraction sets the fraction)")
    return read_class_list(p)


def class_lists_present(root: str | Path, train_classes: str | None, test_classes: str | None) -> bool:
    """Whether the dataset has the class list files named (False when none is named or none exists).

    A dataset without them (any folder of class sub-folders) is split by ``test_fraction``
    instead; naming one list that exists and one that does not is still an error (in
    :func:`make_splits`)."""
    names = [n for n in (train_classes, test_classes) if n]
    return any((Path(n) if Path(n).is_absolute() else Path(root) / n).is_file() for n in names)


def make_splits(
    root: str | Path,
    *,
    train_classes: str | None,
    test_classes: str | None,
    test_fraction: float = 0.4,
    val_fraction: float = 0.0,
    seed: int = 0,
    skipped: list[tuple[Path, str]] | None = None,
) -> dict[str, Split]:
    """Class-disjoint ``train`` / ``val`` / ``test`` splits.

    With class files (relative to ``root``) they define train and test (no train file: every
    class not in the test file); otherwise a seeded
    ``test_fraction`` of classes is held out. ``val_fraction`` of the *train* classes is carved
    out as ``val`` (for choosing hyperparameters without touching test classes).
    """
    r = Path(root)
    by_class = scan_image_folder(r, skipped=skipped)
    names = sorted(by_class)
    if test_classes:
        test_names = _read_class_list(r, test_classes)
        train_names = _read_class_list(r, train_classes) if train_classes else sorted(set(names) - set(test_names))
        missing = sorted(set(train_names + test_names) - set(names))
        if missing:
            raise ValueError(f"class lists name folders that do not exist under {image_root(r)}: {missing[:5]}")
        overlap = sorted(set(train_names) & set(test_names))
        if overlap:
            raise ValueError(f"train and test class lists overlap (must be class-disjoint): {overlap[:5]}")
    else:
        rng = random.Random(seed)
        shuffled = names[:]
        rng.shuffle(shuffled)
        n_test = max(1, round(len(names) * test_fraction))
        test_names, train_names = sorted(shuffled[:n_test]), sorted(shuffled[n_test:])
    val_names: list[str] = []
    if val_fraction > 0:
        rng = random.Random(seed + 1)
        shuffled = sorted(train_names)
        rng.shuffle(shuffled)
        n_val = max(1, round(len(shuffled) * val_fraction))
        val_names, train_names = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])

    def build(cls_names: list[str]) -> Split:
        cls_names = sorted(cls_names)
        paths, labels = [], []
        for i, c in enumerate(cls_names):
            paths += by_class[c]
            labels += [i] * len(by_class[c])
        return Split(paths, labels, cls_names)

    out = {"train": build(train_names), "test": build(test_names)}
    if not test_names:
        raise ValueError(f"{image_root(r)}: no test classes (the folder has {len(names)} classes)")
    if val_names:
        out["val"] = build(val_names)
    if len(out["train"].classes) < 2:
        raise ValueError("need at least 2 training classes")
    return out


class PKSampler(Sampler[list[int]]):
    """Batch sampler yielding exactly P×K indices: P distinct classes, K images each.

    Each class's images are shuffled and consumed K at a time, so an epoch sees images
    roughly uniformly; a class with fewer than K images is sampled with replacement.
    Classes with a single image cannot form positive pairs and are excluded (logged).
    Deterministic given ``seed`` and the epoch (:meth:`set_epoch`).
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, *, batches_per_epoch: int | None = None,
                 seed: int = 0) -> None:
        by_class: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(labels):
            by_class[int(y)].append(i)
        single = [c for c, idx in by_class.items() if len(idx) < 2]
        if single:
            log.warning("%d classes have a single image and are not sampled (no positive pair)", len(single))
        self.by_class = {c: idx for c, idx in by_class.items() if len(idx) >= 2}
        if p > len(self.by_class):
            raise ValueError(f"P={p} classes per batch but only {len(self.by_class)} classes have >= 2 images")
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self.batches = batches_per_epoch or max(1, len(labels) // (p * k))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def choose_classes(self, rng: random.Random, classes: list[int]) -> list[int]:
        """The P distinct classes of one batch (the hook a subclass overrides): uniform at random."""
        return rng.sample(classes, self.p)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        pools: dict[int, list[int]] = {}
        classes = sorted(self.by_class)
        for _ in range(self.batches):
            batch: list[int] = []
            for c in self.choose_classes(rng, classes):
                idx = self.by_class[c]
                if len(idx) < self.k:
                    batch += [rng.choice(idx) for _ in range(self.k)]
                    continue
                pool = pools.get(c, [])
                if len(pool) < self.k:
                    fresh = idx[:]
                    rng.shuffle(fresh)
                    pool = [i for i in pool] + [i for i in fresh if i not in pool]
                batch += pool[: self.k]
                pools[c] = pool[self.k:]
            yield batch


def drop_unreadable(splits: dict[str, Split], *, workers: int = 2,
                    skipped: list[tuple[Path, str]] | None = None) -> dict[str, Split]:
    """The splits without the images that do not decode (corrupt, truncated, not really images).

    Every image is decoded once at a reduced JPEG scale (cheap; PNG/WebP/GIF decode in full),
    ``workers`` at a time. Each bad file is logged with its reason and appended to ``skipped``
    as ``(path, reason)``. A class left with no image is dropped from its split (labels are then
    renumbered so they stay ``0 .. len(classes) - 1``).
    """
    from concurrent.futures import ThreadPoolExecutor

    def check(path: Path) -> str | None:
        try:
            decode_image(path, draft_size=(32, 32))
        except (ImageDecodeError, OSError) as exc:
            return str(exc)
        return None

    out: dict[str, Split] = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for name, split in splits.items():
            reasons = list(pool.map(check, split.paths))
            bad = [(p, r) for p, r in zip(split.paths, reasons) if r is not None]
            for p, r in bad:
                log.warning("skipping an unreadable image: %s (%s)", p, r)
            if skipped is not None:
                skipped.extend(bad)
            if not bad:
                out[name] = split
                continue
            keep = [i for i, r in enumerate(reasons) if r is None]
            kept_labels = sorted({split.labels[i] for i in keep})
            remap = {old: new for new, old in enumerate(kept_labels)}
            out[name] = Split([split.paths[i] for i in keep], [remap[split.labels[i]] for i in keep],
                              [split.classes[c] for c in kept_labels])
    return out


def choose_p(requested: int, labels: Sequence[int], multiple_of: int = 1) -> int:
    """P of the P×K batches for these training labels: ``requested``, or fewer when fewer classes
    have the two images a positive pair needs (logged), rounded down to a multiple of
    ``multiple_of`` when it had to be lowered (the number of processes sharing a global batch).
    Raises ValueError below two such classes."""
    counts: dict[int, int] = defaultdict(int)
    for y in labels:
        counts[int(y)] += 1
    usable = sum(1 for n in counts.values() if n >= 2)
    if usable < 2:
        raise ValueError(f"only {usable} training classes have 2 or more images; P×K batches need at least 2 "
                         "(add images or classes, or hold out fewer classes with --data.test_fraction)")
    if requested > usable:
        p = usable - usable % multiple_of if usable >= max(2, multiple_of) else usable
        log.warning("data.p is %d but the training split has %d classes with 2+ images: using P=%d "
                    "(--data.p sets it)", requested, usable, p)
        return p
    return requested


def too_small_warning(n_classes: int, n_images: int) -> str | None:
    """A warning when a training split is too small to learn much from (None when it is not)."""
    if n_classes < 8 or n_images < 200:
        return (f"the training split has only {n_classes} classes and {n_images} images: expect little gain over "
                "the starting model (more classes matter more than more images per class)")
    return None


def train_transform(card: ModelCard, *, scale_min: float = 0.25, color_jitter: float = 0.0) -> v2.Compose:
    """Augmentation on a uint8 (3, H, W) tensor already resized to ``card.resize_size``:
    random resized crop to ``card.image_size``, horizontal flip, optional colour jitter,
    then the card's mean/std -> (3, S, S) float32."""
    ops: list = [
        v2.RandomResizedCrop(card.image_size, scale=(scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if color_jitter > 0:
        ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(card.mean), list(card.std))]
    return v2.Compose(ops)


def _load_resized(path: Path, pre: Preprocess) -> np.ndarray:
    img = decode_image(path, draft_size=pre.draft_size())
    return np.array(pre.resize(img), dtype=np.uint8)  # writable copy (torch.from_numpy warns on read-only)


class ImageDataset(Dataset):
    """(image, label) pairs of a :class:`Split`.

    ``train=True`` yields augmented (3, S, S) float32 tensors; ``train=False`` yields the
    card's exact eval preprocessing. With ``cache`` the decoded, resized uint8 images are
    kept in RAM (decode once). Unreadable images raise :class:`models.ImageDecodeError`
    naming the file.
    """

    def __init__(self, split: Split, card: ModelCard, *, train: bool, cache: bool = False,
                 scale_min: float = 0.25, color_jitter: float = 0.0, _shared_cache: list | None = None) -> None:
        self.split, self.card, self.train = split, card, train
        self.pre = Preprocess(card)
        self.tf = train_transform(card, scale_min=scale_min, color_jitter=color_jitter) if train else None
        self.cache: list[np.ndarray] | None = _shared_cache
        if cache and self.cache is None:
            self.cache = self._fill_cache()

    def _fill_cache(self) -> list[np.ndarray]:
        from tqdm import tqdm

        out = []
        for p in tqdm(self.split.paths, desc="decoding images", unit="img", leave=False, mininterval=2):
            out.append(_load_resized(p, self.pre))
        return out

    def view(self, *, train: bool, **kw) -> "ImageDataset":
        """The same images (sharing the RAM cache) with the other transform."""
        return ImageDataset(self.split, self.card, train=train, _shared_cache=self.cache, **kw)

    def __len__(self) -> int:
        return len(self.split)

    def resized(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 image resized to the card's resize_size."""
        return self.cache[i] if self.cache is not None else _load_resized(self.split.paths[i], self.pre)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = self.resized(i)
        if self.train:
            x = self.tf(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
        else:
            x = torch.from_numpy(self.pre.to_array(self.pre.center_crop(Image.fromarray(arr))))
        return x, self.split.labels[i]


def should_cache(n_images: int, card: ModelCard, mode: str, budget_mb: int) -> bool:
    """Whether decoded images fit the RAM budget (estimated at resize_size², 3 bytes/pixel)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    est_mb = n_images * card.resize_size * card.resize_size * 3 * 1.3 / 2**20
    return est_mb <= budget_mb


__all__ = [
    "Split", "image_root", "scan_image_folder", "make_splits", "drop_unreadable", "choose_p", "too_small_warning",
    "PKSampler", "train_transform",
    "ImageDataset", "should_cache", "ImageDecodeError",
]
