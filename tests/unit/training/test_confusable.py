"""Confusable-class mining: class neighbours and confused pairs against numpy brute force, and
the sampler's batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.confusable import ConfusablePKSampler, class_neighbours, confused_pairs
from training.data import PKSampler


def _data(seed=0, c=7, per=5, d=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    labels = np.repeat(np.arange(c), per)
    emb = centres[labels] + 0.8 * rng.normal(size=(len(labels), d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels


def test_class_neighbours_match_brute_force():
    emb, labels = _data()
    ids, sims = class_neighbours(emb, labels, k=3)
    cent = np.stack([emb[labels == c].mean(0) for c in range(7)])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    cos = cent @ cent.T
    np.fill_diagonal(cos, -np.inf)
    want = np.argsort(-cos, axis=1)[:, :3]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(sims, np.take_along_axis(cos, want, 1), rtol=1e-5)
    assert class_neighbours(emb, labels, k=50)[0].shape == (7, 6)  # clipped to C - 1


def test_confused_pairs_match_brute_force():
    emb, labels = _data(seed=3)
    got = confused_pairs(emb, labels, top=100)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    nb = labels[sim.argmax(1)]
    want = Counter((min(a, b), max(a, b)) for a, b in zip(labels, nb) if a != b)
    assert {(a, b): v for a, b, v in got} == dict(want)
    assert [v for _, _, v in got] == sorted([v for _, _, v in got], reverse=True)
    assert len(confused_pairs(emb, labels, top=2)) == min(2, len(want))


def test_without_neighbours_it_is_the_pk_sampler():
    labels = np.repeat(np.arange(12), 6).tolist()
    a = list(ConfusablePKSampler(labels, 6, 3, batches_per_epoch=5, seed=1))
    b = list(PKSampler(labels, 6, 3, batches_per_epoch=5, seed=1))
    assert a == b


def test_batches_hold_confusable_groups_and_stay_valid():
    labels = np.repeat(np.arange(16), 6)
    # four cliques of mutually confusable classes: {0..3}, {4..7}, ...
    neigh = {c: [n for n in range(4 * (c // 4), 4 * (c // 4) + 4) if n != c] for c in range(16)}
    s = ConfusablePKSampler(labels.tolist(), 8, 3, batches_per_epoch=40, seed=0, group=4, random_share=0.5)
    s.set_neighbours(neigh)
    seen = Counter()
    for batch in s:
        classes = labels[batch]
        counts = Counter(classes.tolist())
        assert len(counts) == 8 and set(counts.values()) == {3}  # P distinct classes, K each
        cliques = Counter(c // 4 for c in counts)
        assert max(cliques.values()) == 4  # at least one whole group of look-alikes
        seen.update(counts)
    assert set(seen) == set(range(16))  # random share keeps every class sampled


def test_bad_arguments():
    with pytest.raises(ValueError, match="group"):
        ConfusablePKSampler([0, 0, 1, 1], 2, 2, group=1)
    with pytest.raises(ValueError, match="random_share"):
        ConfusablePKSampler([0, 0, 1, 1], 2, 2, random_share=1.5)
