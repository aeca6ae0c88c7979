"""Users' relevance feedback as hard pairs: ``lookalike train --feedback INDEX``.

Marks come from the search page or ``POST /v1/feedback`` and are read with
:func:`index.feedback.read_feedback`. A result marked *wrong* is a negative pair with its
query, a result marked *right* a positive pair. Every training step adds the contrastive
terms of a sample of these pairs (``½·max(0, D - pos_margin)²`` for right, ``½·max(0, m - D)²``
for wrong, D the cosine distance), weighted by ``loss.feedback_weight``, to the batch loss.

:func:`still_wrong` is what ``lookalike eval --feedback`` and ``bench/bench_feedback.py``
report: a wrong pair is still wrong while the model scores its result above one of the
query's right results (the ones marked right for that query, or, when none were, the
query's nearest image of its own label in the evaluated set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedbackPairs:
    """Marks as index pairs into a list of unique image files.

    Attributes:
        images: unique image paths (queries and results); labels: their labels (None: unknown,
            e.g. an uploaded query).
        query: (P,) int64 index into ``images``; result: (P,) int64; right: (P,) bool.
    """

    images: list[Path]
    labels: list[str | None]
    query: np.ndarray
    result: np.ndarray
    right: np.ndarray

    def __len__(self) -> int:
        return len(self.query)


#: Reads an index's marks: ``reader(index_dir)`` -> records with ``query_image``, ``query_label``,
#: ``result_image``, ``result_label`` and ``verdict`` (``index.feedback.read_feedback``). training
#: does not import index (its dependencies point to models only); the ``lookalike`` command wires
#: the reader in with :func:`set_feedback_reader`.
FeedbackReader = Callable[[str | Path], Sequence[Any]]
_reader: FeedbackReader | None = None


def set_feedback_reader(reader: FeedbackReader | None) -> None:
    """Register how relevance feedback is read from an index directory (None: unregister)."""
    global _reader
    _reader = reader


def load_feedback_pairs(index_dir: str | Path) -> FeedbackPairs:
    """The marks of the index at ``index_dir``, through the registered reader.

    Raises:
        ValueError: no reader registered, or the index holds no usable mark.
    """
    if _reader is None:
        raise ValueError("reading relevance feedback needs a reader: use `lookalike train --feedback INDEX`, or call "
                         "training.feedback.set_feedback_reader(index.feedback.read_feedback) first")
    return pairs_from_records(_reader(index_dir), source=str(index_dir))


def pairs_from_records(records: Sequence[Any], *, source: str) -> FeedbackPairs:
    """Marks (newest of each pair, as ``read_feedback`` returns them) -> pairs over unique image files.

    Marks whose image files are gone are skipped (logged).

    Raises:
        ValueError: when no usable mark remains.
    """
    where: dict[Path, int] = {}
    labels: dict[Path, str | None] = {}
    q, r, right = [], [], []
    missing = 0
    for rec in records:
        if not rec.query_image.is_file() or not rec.result_image.is_file():
            missing += 1
            continue
        for p, lab in ((rec.query_image, rec.query_label), (rec.result_image, rec.result_label)):
            where.setdefault(p, len(where))
            if labels.get(p) is None:
                labels[p] = lab
        q.append(where[rec.query_image])
        r.append(where[rec.result_image])
        right.append(rec.verdict == "right")
    if missing:
        log.warning("%s: %d feedback marks skipped (image files no longer exist)", source, missing)
    if not q:
        raise ValueError(f"{source}: no usable relevance feedback (mark results on the search page or with "
                         "POST /v1/feedback first)")
    pairs = FeedbackPairs(list(where), [labels[p] for p in where], np.asarray(q, np.int64), np.asarray(r, np.int64),
                          np.asarray(right, bool))
    log.info("feedback from %s: %d pairs (%d wrong, %d right) over %d images", source, len(pairs),
             int((~pairs.right).sum()), int(pairs.right.sum()), len(pairs.images))
    return pairs


class FeedbackLoss:
    """``extra_loss()`` for the training loop: the contrastive terms of a sample of marked pairs,
    half of them wrong marks (all of them when there are fewer) and half right ones.

    Args:
        pairs: the marks.
        embed: maps (n,) int64 image indices to (n, D) un-normalised embeddings, differentiable
            (the trainer passes the top of the network over cached trunk outputs, or the whole
            network over images).
        per_step: pairs sampled per step (all of them when fewer).
        weight, margin, pos_margin: as the batch's contrastive loss.
    """

    def __init__(self, pairs: FeedbackPairs, embed: Callable[[Tensor], Tensor], *, per_step: int = 16,
                 weight: float = 1.0, margin: float = 0.5, pos_margin: float = 0.0, seed: int = 0) -> None:
        self.pairs, self.embed = pairs, embed
        self.per_step, self.weight = per_step, weight
        self.margin, self.pos_margin = margin, pos_margin
        self.generator = torch.Generator().manual_seed(seed)
        self.q = torch.as_tensor(pairs.query)
        self.r = torch.as_tensor(pairs.result)
        self.right = torch.as_tensor(pairs.right)

    def _sample(self, pool: Tensor, n: int) -> Tensor:
        if len(pool) <= n:
            return pool
        return pool[torch.randperm(len(pool), generator=self.generator)[:n]]

    def __call__(self) -> Tensor:
        # wrong and right marks in balance: users mostly confirm good results, and the wrong marks
        # are the hard signal, so they must not be drowned by the right ones
        wrong_pool = torch.nonzero(~self.right).flatten()
        right_pool = torch.nonzero(self.right).flatten()
        n_wrong = min(len(wrong_pool), max(self.per_step // 2, self.per_step - len(right_pool)))
        pick = torch.cat([self._sample(wrong_pool, n_wrong), self._sample(right_pool, self.per_step - n_wrong)])
        q, r, right = self.q[pick], self.r[pick], self.right[pick].float()
        uniq, inv = torch.unique(torch.cat([q, r]), return_inverse=True)
        emb = F.normalize(self.embed(uniq).float(), dim=1)
        eq, er = emb[inv[: len(q)]], emb[inv[len(q):]]
        d = 1.0 - (eq * er).sum(1)
        terms = right * 0.5 * F.relu(d - self.pos_margin) ** 2 + (1 - right) * 0.5 * F.relu(self.margin - d) ** 2
        return self.weight * terms.mean()


def still_wrong(pairs: FeedbackPairs, emb: np.ndarray, *, gallery: np.ndarray | None = None,
                gallery_labels: np.ndarray | None = None) -> dict[str, float]:
    """How many wrong marks the embedding still gets wrong.

    Args:
        pairs: the marks; ``emb`` (len(pairs.images), D) unit embeddings of ``pairs.images``.
        gallery: optional (G, D) unit embeddings with ``gallery_labels`` ((G,) label strings),
            used with ``pairs.labels`` to find a labelled query's nearest right result when none
            was marked right for it (the query itself is skipped by excluding a gallery item
            with similarity >= 0.9999).

    Returns:
        ``wrong_pairs`` (scored), ``still_wrong``, ``share`` (still_wrong / wrong_pairs), ``unscored``
        (wrong marks with no right result to compare with).
    """
    sims = lambda a, b: float(emb[a] @ emb[b])  # noqa: E731
    rights: dict[int, list[int]] = {}
    for q, r, ok in zip(pairs.query, pairs.result, pairs.right):
        if ok:
            rights.setdefault(int(q), []).append(int(r))
    scored = wrong = unscored = 0
    for q, r, ok in zip(pairs.query, pairs.result, pairs.right):
        if ok:
            continue
        q, r = int(q), int(r)
        if rights.get(q):
            floor = min(sims(q, p) for p in rights[q])
        elif pairs.labels[q] is not None and gallery is not None and gallery_labels is not None:
            s = gallery @ emb[q]
            same = (np.asarray(gallery_labels) == pairs.labels[q]) & (s < 0.9999)
            if not same.any():
                unscored += 1
                continue
            floor = float(s[same].max())
        else:
            unscored += 1
            continue
        scored += 1
        wrong += sims(q, r) > floor
    return {"wrong_pairs": scored, "still_wrong": wrong, "share": wrong / scored if scored else float("nan"),
            "unscored": unscored}
