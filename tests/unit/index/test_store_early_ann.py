"""``auto`` below the exact bound: an IVF index replaces Flat only where it measures as good as
exact (recall@10 >= 0.99 on held-out queries) while probing at most 1/4 of its lists."""

from __future__ import annotations

import numpy as np
import pytest

from index import IndexStore, ann
from tests.unit.index.helpers import DIM, clustered, records, unit

N = 3000  # nlist_for(3000) = 64: at most 16 lists may be probed


@pytest.fixture(autouse=True)
def band(monkeypatch):
    """The early-ANN band starts at 1000 vectors of DIM here (2**23 floats in the product)."""
    monkeypatch.setattr(ann, "EARLY_ANN_MIN_ELEMENTS", 1000 * DIM)


@pytest.fixture
def ivf_builds(monkeypatch):
    """Factories of every IVF index the store builds (each is a k-means training)."""
    built: list[str] = []
    real = ann.build

    def counting(factory, *a, **kw):
        if factory != "Flat":
            built.append(factory)
        return real(factory, *a, **kw)

    monkeypatch.setattr(ann, "build", counting)
    return built


def brute_force(base: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """1-based ids (the store numbers from 1) of the exact top-k."""
    return np.argsort(-(q @ base.T), axis=1, kind="stable")[:, :k] + 1


def test_clustered_vectors_get_an_ivf_index_that_finds_what_exact_search_finds(tmp_path, card):
    v = clustered(np.random.default_rng(0), N + 100, DIM, clusters=64, spread=0.35)
    base, queries = v[:N], v[N:]
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path) as s:
        s.add(base, records(N))
        s.checkpoint()
        info = s.info()
        assert info["factory"] == "IVF64,Flat"
        early = info["early_ann"]
        assert early["kept"] is True and early["n"] == N and early["nlist"] == 64
        assert early["recall_at_10"] >= ann.EARLY_ANN_RECALL + ann.TUNING_MARGIN
        assert 1 <= early["nprobe"] <= 16 and info["search_params"] == {"nprobe": early["nprobe"]}
        found = np.array([[h.id for h in row] for row in s.search(queries, 10)])
    truth = brute_force(base, queries, 10)
    assert ann.recall_at(found, truth) >= 0.98


def test_uniform_vectors_stay_exact_and_the_trial_is_recorded(tmp_path, card, ivf_builds):
    """Uniformly random directions: IVF would need most lists for the target, so Flat stays."""
    rng = np.random.default_rng(1)
    base, queries = unit(rng, N), unit(rng, 20)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path) as s:
        s.add(base, records(N))
        s.checkpoint()
        info = s.info()
        assert info["factory"] == "Flat" and info["recall_at_10"] == 1.0
        assert info["early_ann"]["kept"] is False and info["early_ann"]["factory"] == "IVF64,Flat"
        assert ivf_builds == ["IVF64,Flat"]
        assert not (info["early_ann"]["recall_at_10"] >= 0.995 and info["early_ann"]["nprobe"] <= 16)
        found = np.array([[h.id for h in row] for row in s.search(queries, 10)])
    np.testing.assert_array_equal(found, brute_force(base, queries, 10))


def test_a_failed_trial_waits_until_the_collection_doubles_even_across_reopens(tmp_path, card, ivf_builds):
    rng = np.random.default_rng(2)
    v = unit(rng, 2 * N)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path) as s:
        s.add(v[:N], records(N))
        s.checkpoint()
        s.add(v[N:N + 500], records(500, N))
        s.checkpoint()
    assert ivf_builds == ["IVF64,Flat"]
    with IndexStore.open(tmp_path / "ix", card=card, writable=True) as s:
        assert s.info()["early_ann"]["n"] == N  # read back from the manifest
        s.add(v[N + 500:2 * N - 1], records(N - 501, N + 500))
        s.checkpoint()
        assert ivf_builds == ["IVF64,Flat"]  # 2n - 1 vectors: not yet
        s.add(v[2 * N - 1:], records(1, 2 * N - 1))
        s.checkpoint()
        assert len(ivf_builds) == 2 and s.info()["early_ann"]["n"] == 2 * N
        assert s.info()["factory"] == "Flat"


def test_outside_the_band_auto_does_not_try(tmp_path, card, ivf_builds):
    v = clustered(np.random.default_rng(3), 999, DIM, clusters=64)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path) as s:
        s.add(v, records(999))
        s.checkpoint()
        assert s.info()["factory"] == "Flat" and s.info()["early_ann"] is None
    with IndexStore.create(tmp_path / "flat", card=card, images_root=tmp_path, factory="Flat") as s:
        s.add(clustered(np.random.default_rng(3), N, DIM, clusters=64), records(N))
        s.checkpoint()
        assert s.info()["factory"] == "Flat"  # asked for exact: never replaced
    assert ivf_builds == []


def test_an_early_ivf_goes_back_to_exact_when_a_retune_misses_the_gate(tmp_path, card):
    """Kept on clustered vectors; after uniform ones arrive (past the re-tune drift) the
    cheap probes no longer find the exact neighbours, so the store rebuilds Flat."""
    rng = np.random.default_rng(4)
    with IndexStore.create(tmp_path / "ix", card=card, images_root=tmp_path) as s:
        s.add(clustered(rng, N, DIM, clusters=64, spread=0.35), records(N))
        s.checkpoint()
        assert s.info()["factory"] == "IVF64,Flat"
        s.add(unit(rng, N), records(N, N))
        s.checkpoint()
        info = s.info()
        assert info["factory"] == "Flat" and info["recall_at_10"] == 1.0
        assert info["early_ann"]["kept"] is False and info["early_ann"]["n"] == 2 * N


def test_the_gate_needs_both_recall_and_a_small_share_of_the_lists(rng):
    v = clustered(rng, N, DIM, clusters=64, spread=0.35)
    ids = np.arange(1, N + 1, dtype=np.int64)
    index, tuning = ann.build("IVF64,Flat", v, ids, recall_target=0.99, max_nprobe=16)
    assert ann.passes_early_gate(index, tuning, 0.95)
    assert not ann.passes_early_gate(index, ann.Tuning(params={"nprobe": 17}, recall_at_10=1.0, n_queries=300), 0.95)
    assert ann.passes_early_gate(index, ann.Tuning(params={"nprobe": 16}, recall_at_10=0.995, n_queries=300), 0.95)
    assert not ann.passes_early_gate(index, ann.Tuning(params={"nprobe": 1}, recall_at_10=0.9949, n_queries=300),
                                     0.95)
    # a store asking more than 0.99 is held to its own target
    assert not ann.passes_early_gate(index, ann.Tuning(params={"nprobe": 1}, recall_at_10=0.997, n_queries=300),
                                     0.999)
    flat, flat_tuning = ann.build("Flat", v, ids)
    assert not ann.passes_early_gate(flat, flat_tuning, 0.95)


def test_tuning_stops_at_max_nprobe_below_the_target(rng):
    v = unit(rng, N)
    index, tuning = ann.build("IVF64,Flat", v, np.arange(N, dtype=np.int64), recall_target=0.99, max_nprobe=4)
    assert tuning.params == {"nprobe": 4}
    assert max(p for p, _ in tuning.curve) == 4 and tuning.recall_at_10 < 0.99


def test_the_band_and_the_budget(monkeypatch):
    monkeypatch.setattr(ann, "EARLY_ANN_MIN_ELEMENTS", 2**23)
    assert ann.early_ann_candidate(6553, 1280) is None
    assert ann.early_ann_candidate(6554, 1280) == "IVF64,Flat"
    assert ann.early_ann_candidate(ann.FLAT_MAX_ELEMENTS // 1280, 1280) == "IVF128,Flat"
    assert ann.early_ann_candidate(ann.FLAT_MAX_ELEMENTS // 1280 + 1, 1280) is None  # IVF anyway
    assert ann.early_ann_candidate(20000, 1280, max_ram=20000 * 1280 * 4) is None  # IVF,Flat needs a bit more
    assert ann.early_ann_max_nprobe(64) == 16 and ann.early_ann_max_nprobe(2) == 1
    assert ann.early_ann_target(0.95) == 0.99 and ann.early_ann_target(0.999) == 0.999
