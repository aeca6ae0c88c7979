"""Confusable-class batches, mined with lookalike's own retrieval index.

Random P×K batches rarely put two look-alike classes side by side, so most negatives in a
batch are easy. Once per epoch the trainer embeds the training images (cheap on cached
trunk features), finds each class's nearest other classes with FAISS over the class
centroids, and :class:`ConfusablePKSampler` builds batches in which classes come in groups
with their most confusable neighbours. A share of each batch stays random, so every class
keeps being sampled.

:func:`confused_pairs` counts which class pairs retrieval confuses (a query whose nearest
neighbour is of another class votes for that pair); the trainer logs them and
``lookalike eval`` puts them in the report.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from training.data import PKSampler


def class_neighbours(emb: np.ndarray, labels: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class's ``k`` nearest other classes by cosine between class centroids.

    Args:
        emb: (N, D) float32 unit embeddings.
        labels: (N,) int class ids in ``0..C-1`` (every class present).
        k: neighbours per class (clipped to C - 1).

    Returns:
        (ids (C, k) int64, cosines (C, k) float32), nearest first.
    """
    import faiss

    labels = np.asarray(labels, dtype=np.int64)
    c = int(labels.max()) + 1
    cent = np.zeros((c, emb.shape[1]), np.float32)
    np.add.at(cent, labels, emb.astype(np.float32))
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    k = max(0, min(k, c - 1))
    index = faiss.IndexFlatIP(cent.shape[1])
    index.add(cent)
    sims, ids = index.search(cent, k + 1)
    out_i = np.zeros((c, k), np.int64)
    out_s = np.zeros((c, k), np.float32)
    for row in range(c):
        keep = [j for j in range(k + 1) if ids[row, j] != row][:k]
        out_i[row], out_s[row] = ids[row, keep], sims[row, keep]
    return out_i, out_s


def confused_pairs(emb: np.ndarray, labels: np.ndarray, *, top: int = 10) -> list[tuple[int, int, int]]:
    """Class pairs that retrieval confuses most: ``(class_a, class_b, votes)``, most votes first.

    A query of class ``a`` whose nearest other image is of class ``b != a`` is one vote for the
    unordered pair ``{a, b}`` (reported with ``a < b``). (N, D) unit embeddings, (N,) labels.
    """
    from training.report import nearest_neighbours

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < 2:
        return []
    _, ids = nearest_neighbours(emb, 1)
    nb = labels[ids[:, 0]]
    wrong = nb != labels
    votes: dict[tuple[int, int], int] = {}
    for a, b in zip(labels[wrong].tolist(), nb[wrong].tolist()):
        key = (min(a, b), max(a, b))
        votes[key] = votes.get(key, 0) + 1
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [(a, b, v) for (a, b), v in ranked]


class ConfusablePKSampler(PKSampler):
    """P×K batches where classes come in groups of ``group`` look-alikes.

    Until :meth:`set_neighbours` is called it samples like :class:`PKSampler`. After it, each
    batch takes ``round(P * (1 - random_share))`` classes as groups: a random seed class and
    its nearest not-yet-chosen neighbours (up to ``group`` classes per group); the rest of
    the P classes are drawn at random. Images are drawn K per class exactly as in PKSampler.
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, *, batches_per_epoch: int | None = None,
                 seed: int = 0, group: int = 4, random_share: float = 0.5) -> None:
        super().__init__(labels, p, k, batches_per_epoch=batches_per_epoch, seed=seed)
        if group < 2:
            raise ValueError(f"group must be >= 2, got {group}")
        if not 0 <= random_share <= 1:
            raise ValueError(f"random_share must be in [0, 1], got {random_share}")
        self.group, self.random_share = group, random_share
        self.neighbours: dict[int, list[int]] | None = None

    def set_neighbours(self, neighbours: dict[int, list[int]]) -> None:
        """Class id -> its confusable classes, nearest first (from :func:`class_neighbours`)."""
        self.neighbours = {c: [n for n in ns if n in self.by_class and n != c] for c, ns in neighbours.items()}

    def choose_classes(self, rng: random.Random, classes: list[int]) -> list[int]:
        if not self.neighbours:
            return super().choose_classes(rng, classes)
        n_conf = round(self.p * (1 - self.random_share))
        chosen: list[int] = []
        taken: set[int] = set()
        order = classes[:]
        rng.shuffle(order)
        for seed_class in order:
            if len(chosen) >= n_conf:
                break
            if seed_class in taken:
                continue
            grp = [seed_class] + [n for n in self.neighbours.get(seed_class, []) if n not in taken]
            grp = grp[: min(self.group, n_conf - len(chosen))]
            chosen += grp
            taken.update(grp)
        rest = [c for c in classes if c not in taken]
        chosen += rng.sample(rest, self.p - len(chosen))
        return chosen
