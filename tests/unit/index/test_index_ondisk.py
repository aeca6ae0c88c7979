"""An index that outgrows RAM: ``auto`` under a memory budget, and memory-mapped IVF lists."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index import IndexStore, ann
from index import generations as gens
from tests.unit.index.helpers import clustered, make_card, records, unit


def test_parse_bytes():
    assert ann.parse_bytes("8G") == 8 * 2**30
    assert ann.parse_bytes("512m") == 512 * 2**20
    assert ann.parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert ann.parse_bytes("1000") == 1000
    for bad in ("", "8X", "-1G", "0"):
        with pytest.raises(ValueError, match="memory size"):
            ann.parse_bytes(bad)


def test_auto_picks_the_longest_code_that_fits_the_budget():
    n, d = 10_000_000, 128
    assert ann.choose_factory("auto", n, d) == "IVF4096,Flat"  # no budget: as before
    assert ann.choose_factory("auto", n, d, max_ram=8 * 2**30) == "IVF4096,Flat"  # 5.2 GB fits
    assert ann.choose_factory("auto", n, d, max_ram=2 * 2**30) == "IVF4096,SQ8"  # 1.4 GB
    f = ann.choose_factory("auto", n, d, max_ram=2**30)
    assert f == "IVF4096,PQ64" and ann.index_bytes(f, n, d) <= 2**30
    f = ann.choose_factory("auto", n, d, max_ram=400 * 2**20)  # 40 bytes a vector with the ids
    assert f == "IVF4096,PQ32" and ann.index_bytes(f, n, d) <= 400 * 2**20
    assert ann.choose_factory("auto", n, d, max_ram=250 * 2**20) == "OPQ16,IVF4096,PQ16"  # 8 dimensions each
    with pytest.raises(ValueError, match="too small for 10000000 vectors of dimension 128"):
        ann.choose_factory("auto", n, d, max_ram=100 * 2**20)
    # a small collection stays exact unless even that does not fit
    assert ann.choose_factory("auto", 1000, d, max_ram=2**30) == "Flat"
    assert ann.choose_factory("auto", 100_000, 1280, max_ram=64 * 2**20) == "IVF256,PQ320"
    # the estimate is what FAISS really stores, within the bookkeeping
    index = ann.empty_index("IVF16,PQ8", 16)
    vecs = unit(np.random.default_rng(0), 5000, 16)
    index.train(vecs)
    index.add_with_ids(vecs, np.arange(5000))
    real = len(faiss.serialize_index(index))
    assert 0.9 * real <= ann.index_bytes("IVF16,PQ8", 5000, 16) <= 1.1 * real


def test_auto_under_a_budget_builds_ivf_pq_that_fits(tmp_path, rng):
    n, d = 6000, 16
    budget = 125_000  # exact: 528 kB, IVF-Flat: 436 kB, IVF-SQ8: 148 kB
    vecs = clustered(rng, n, d)
    with IndexStore.create(tmp_path / "ix", card=make_card(dim=d), images_root=None, max_ram=budget) as s:
        s.add(vecs, records(n))
        s.checkpoint()
        info = s.info()
    assert info["factory"] == "IVF64,PQ8"
    size = (gens.gen_path(tmp_path / "ix", info["generation"]) / gens.INDEX_FILE).stat().st_size
    assert size <= budget
    assert info["recall_at_10"] > 0.6 and info["search_params"]["nprobe"] < 64  # tuned, not exhaustive


def _ivf_store(tmp_path, rng, n=4000, d=16):
    vecs = clustered(rng, n, d)
    s = IndexStore.create(tmp_path / "ix", card=make_card(dim=d), images_root=None, factory="IVF32,Flat",
                          on_disk=True)
    s.add(vecs, records(n))
    s.checkpoint()
    return s, vecs


def _ids(store, q, k=10, **kw):
    return [[h.id for h in hits] for hits in store.search(q, k, **kw)]


def test_on_disk_replica_maps_lists_and_hot_swaps(tmp_path, rng):
    writer, vecs = _ivf_store(tmp_path, rng)
    reader = IndexStore.open(tmp_path / "ix")  # read-only: maps the lists of the generation
    try:
        inv = faiss.extract_index_ivf(reader._index).invlists
        assert isinstance(faiss.downcast_InvertedLists(inv), faiss.OnDiskInvertedLists)
        q = vecs[:50] + 0.01
        assert _ids(reader, q) == _ids(writer, q)
        assert _ids(reader, q, label="x") == _ids(writer, q, label="x")  # filtered IVF search on mapped lists
        writable = IndexStore.open(tmp_path / "ix", mmap=True, writable=False)
        assert writable._mmapped
        writable.close()

        # a new generation: the replica swaps to it and maps it too
        new = unit(rng, 100, 16)
        added = writer.add(new, records(100, start=10_000))
        writer.checkpoint()
        assert reader.refresh() == -1
        assert reader.generation == writer.generation and reader._mmapped
        assert [h[0] for h in _ids(reader, new[:20], k=1)] == added[:20]

        # changes past the generation: the replica copies the lists into RAM and applies them
        writer.remove(added[:5])
        assert reader.refresh() == 5
        assert not reader._mmapped
        assert not set(sum(_ids(reader, new[:5]), [])) & set(added[:5])
        assert _ids(reader, q) == _ids(writer, q)
        writer.checkpoint()
        assert reader.refresh() == -1 and reader._mmapped  # mapped again at the next generation
        assert _ids(reader, q) == _ids(writer, q)
    finally:
        reader.close()
        writer.close()


def test_writer_and_flat_indexes_do_not_map(tmp_path, rng):
    writer, _ = _ivf_store(tmp_path, rng)
    assert not writer._mmapped  # a writer changes its index: lists in RAM
    writer.close()
    with IndexStore.open(tmp_path / "ix", mmap=False) as r:
        assert not r._mmapped
    with IndexStore.create(tmp_path / "flat", card=make_card(), images_root=None, on_disk=True) as s:
        s.add(unit(rng, 10), records(10))
        s.checkpoint()
    with IndexStore.open(tmp_path / "flat") as r:
        assert not r._mmapped and len(r) == 10


@pytest.mark.slow
def test_auto_by_budget_on_200k_vectors_with_on_disk_lists(tmp_path, rng):
    n, d = 200_000, 128
    budget = 16 * 2**20  # IVF-Flat would take ~105 MB
    vecs = clustered(rng, n, d, clusters=2000)
    with IndexStore.create(tmp_path / "ix", card=make_card(dim=d), images_root=None, max_ram=budget,
                           on_disk=True) as s:
        for start in range(0, n, 20_000):
            s.add(vecs[start:start + 20_000], records(20_000, start=start))
        s.checkpoint()
        info = s.info()
        q = vecs[rng.choice(n, 200, replace=False)]
        ram_ids = _ids(s, q)
    assert info["factory"] == "IVF512,PQ64"
    assert (gens.gen_path(tmp_path / "ix", info["generation"]) / gens.INDEX_FILE).stat().st_size <= budget
    with IndexStore.open(tmp_path / "ix") as r:
        assert r._mmapped and _ids(r, q) == ram_ids
    # the recall it reports is the recall it gives (these queries are in the collection: +self)
    truth = ann.exact_topk(q, vecs, 10) + 1
    recall = ann.recall_at(np.array(ram_ids), truth)
    assert recall > 0.5 and abs(recall - info["recall_at_10"]) < 0.15, (recall, info["recall_at_10"])
