"""The micro-batching pipeline on the real torch backend and a real index."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import MicroBatcher, NotRunning, Overloaded
from tests.unit.service import imagegen


class Recording:
    """Wraps a backend; records the thread of each call, batch sizes and torch's thread count."""

    name = "recording"

    def __init__(self, inner, gate: threading.Event | None = None, fail_on: int | None = None) -> None:
        self.inner, self.gate, self.fail_on = inner, gate, fail_on
        self.card, self.preprocess = inner.card, inner.preprocess
        self.threads: list[str] = []
        self.sizes: list[int] = []
        self.torch_threads: list[int] = []

    def embed_array(self, batch):
        import torch

        self.threads.append(threading.current_thread().name)
        self.sizes.append(len(batch))
        self.torch_threads.append(torch.get_num_threads())
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail_on is not None and len(self.sizes) == self.fail_on:
            raise RuntimeError("boom")
        return self.inner.embed_array(batch)


class RecordingStore:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.threads: list[str] = []

    def search(self, queries, k, **kw):
        self.threads.append(threading.current_thread().name)
        self.sizes = getattr(self, "sizes", []) + [len(queries)]
        return self.inner.search(queries, k, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def store(template_index, model_dir):
    from index import IndexStore
    from models import load_card

    s = IndexStore.open(template_index, card=load_card(model_dir))
    yield s
    s.close()


@pytest.fixture(scope="module")
def inputs(model_dir):
    from models import decode_image
    from models.backends import TorchBackend

    backend = TorchBackend(model_dir, bf16=False)
    arrays = [backend.preprocess(decode_image(imagegen.jpeg(500 + i))) for i in range(8)]
    singles = np.concatenate([backend.embed_array(a[None]) for a in arrays])
    return arrays, singles


def start(model_dir, store, *, gate=None, fail_on=None, **kw):
    from models.backends import TorchBackend

    holder = {}

    def factory():
        import torch

        torch.set_num_threads(1)
        holder["built_in"] = threading.current_thread().name
        holder["b"] = Recording(TorchBackend(model_dir, bf16=False), gate, fail_on)
        return holder["b"]

    rstore = RecordingStore(store)
    mb = MicroBatcher(factory, **kw)
    mb.start().result(60)
    mb.attach_index(rstore)
    return mb, holder, rstore


async def _search_all(mb, arrays, ks):
    tickets = [mb.admit() for _ in arrays]
    try:
        return await asyncio.gather(*(mb.search(t, a, k) for t, a, k in zip(tickets, arrays, ks)))
    finally:
        for t in tickets:
            t.release()


def test_threads_are_dedicated(model_dir, store, inputs):
    arrays, _ = inputs
    mb, holder, rstore = start(model_dir, store)
    try:
        asyncio.run(_search_all(mb, arrays[:2], [3, 3]))
    finally:
        mb.stop()
    b = holder["b"]
    assert holder["built_in"] == "lookalike-infer"
    assert set(b.threads) == {"lookalike-infer"}
    # idle: the inference thread searches itself (no hand-off); never the caller's thread
    assert set(rstore.threads) == {"lookalike-infer"}
    assert set(b.torch_threads) == {1}
    assert threading.current_thread().name not in b.threads


def test_concurrent_queries_share_one_forward_pass_and_keep_their_results(model_dir, store, inputs):
    arrays, singles = inputs
    mb, holder, rstore = start(model_dir, store, max_batch=16, wait_ms=500)
    try:
        ks = [1, 2, 3, 4, 5, 6, 7, 8]
        out = asyncio.run(_search_all(mb, arrays, ks))
    finally:
        mb.stop()
    assert holder["b"].sizes[1:] == [8]  # after the warm-up call: one batch of all eight
    assert len(rstore.threads) == 1  # ... and one batched search
    for (vec, hits), single, k in zip(out, singles, ks):
        np.testing.assert_allclose(vec, single, atol=2e-5)
        expected = store.search(single[None], k)[0]
        assert [h.id for h in hits] == [h.id for h in expected] and len(hits) == k


def test_max_batch_one_disables_batching(model_dir, store, inputs):
    arrays, singles = inputs
    mb, holder, rstore = start(model_dir, store, max_batch=1, wait_ms=500)
    try:
        out = asyncio.run(_search_all(mb, arrays, [2] * 8))
    finally:
        mb.stop()
    assert holder["b"].sizes[1:] == [1] * 8
    # while queries wait for the model, searches go to the search thread (overlapping forwards)
    assert "lookalike-search" in rstore.threads
    for (vec, _), single in zip(out, singles):
        np.testing.assert_allclose(vec, single, atol=2e-5)


def test_batches_capped_at_max_batch(model_dir, store, inputs):
    arrays, _ = inputs
    mb, holder, _ = start(model_dir, store, max_batch=3, wait_ms=500)
    try:
        asyncio.run(_search_all(mb, arrays, [1] * 8))
    finally:
        mb.stop()
    assert max(holder["b"].sizes[1:]) <= 3 and sum(holder["b"].sizes[1:]) == 8


def test_a_lone_query_does_not_wait_for_a_batch(model_dir, store, inputs):
    """With a batch wait of ten minutes, a lone query still answers (within a 60 s guard that
    only a query waiting for the batch to fill could exceed)."""
    arrays, _ = inputs
    mb, _, _ = start(model_dir, store, wait_ms=600_000)
    try:
        out = asyncio.run(asyncio.wait_for(_search_all(mb, arrays[:1], [3]), timeout=60))
        assert len(out) == 1
    finally:
        mb.stop()


def test_admission_is_bounded(model_dir, store):
    mb, _, _ = start(model_dir, store, max_pending=2)
    try:
        a, b = mb.admit(), mb.admit()
        assert mb.pending == 2
        with pytest.raises(Overloaded):
            mb.admit()
        a.release()
        a.release()  # idempotent
        c = mb.admit()
        assert mb.pending == 2
        b.release()
        c.release()
        assert mb.pending == 0
    finally:
        mb.stop()
    with pytest.raises(NotRunning):
        mb.admit()


def test_embed_only_jobs_skip_the_search(model_dir, store, inputs):
    arrays, singles = inputs

    async def go(mb):
        with mb.admit() as t:
            return await mb.embed(t, arrays[0])

    mb, _, rstore = start(model_dir, store)
    try:
        vec = asyncio.run(go(mb))
    finally:
        mb.stop()
    np.testing.assert_allclose(vec, singles[0], atol=2e-5)
    assert rstore.threads == []


def test_a_failing_batch_fails_its_queries_only(model_dir, store, inputs):
    arrays, _ = inputs
    mb, holder, _ = start(model_dir, store, fail_on=2)  # warm-up is call 1
    try:
        with pytest.raises(RuntimeError, match="inference failed"):
            asyncio.run(_search_all(mb, arrays[:1], [1]))
        (vec, hits), = asyncio.run(_search_all(mb, arrays[:1], [1]))
        assert len(hits) == 1
    finally:
        mb.stop()


def test_backend_error_is_reported_by_start(store):
    def factory():
        raise FileNotFoundError("no such model")

    mb = MicroBatcher(factory)
    with pytest.raises(FileNotFoundError, match="no such model"):
        mb.start().result(10)
    mb.stop()


def test_stop_finishes_queued_queries_instead_of_dropping_them(model_dir, store, inputs):
    arrays, _ = inputs
    gate = threading.Event()
    gate.set()
    mb, holder, _ = start(model_dir, store, gate=gate, max_batch=1)

    async def go():
        gate.clear()
        tickets = [mb.admit() for _ in range(3)]
        tasks = [asyncio.create_task(mb.search(t, arrays[0], 1)) for t in tickets]
        while len(holder["b"].sizes) < 2:
            await asyncio.sleep(0.01)
        stopper = asyncio.get_running_loop().run_in_executor(None, mb.stop, 0.5)
        await asyncio.sleep(0.2)
        gate.set()
        await stopper
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(go(), 30))
    assert all(isinstance(r, tuple) for r in results), results  # in flight and queued all answered
    with pytest.raises(NotRunning):
        mb.admit()


def test_bad_parameters():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda: None, max_batch=0)


def test_prepare_runs_in_the_idle_inference_thread_else_in_the_executor(model_dir, store, inputs):
    from concurrent.futures import ThreadPoolExecutor

    arrays, singles = inputs
    seen = []
    gate = threading.Event()
    gate.set()

    def prepare():
        seen.append(threading.current_thread().name)
        return arrays[0]

    def bad():
        raise ValueError("cannot decode")

    async def go(mb, pool, holder):
        with mb.admit() as t:  # idle: prepared by the inference thread itself
            vec, hits = await mb.search(t, prepare, 2, executor=pool)
        with mb.admit() as t:
            with pytest.raises(ValueError, match="cannot decode"):
                await mb.search(t, bad, 2, executor=pool)
        # busy: a query holds the model, the next one is prepared in the executor
        gate.clear()
        calls = len(holder["b"].sizes)
        t1 = mb.admit()
        first = asyncio.create_task(mb.search(t1, arrays[1], 1))
        while len(holder["b"].sizes) == calls:
            await asyncio.sleep(0.005)
        with mb.admit() as t2:
            second = asyncio.create_task(mb.search(t2, prepare, 1, executor=pool))
            await asyncio.sleep(0.2)
            gate.set()
            await asyncio.gather(first, second)
        t1.release()
        with mb.admit() as t:
            with pytest.raises(ValueError, match="cannot decode"):
                await mb.search(t, bad, 2, executor=pool)
        assert mb.pending == 0
        return vec, hits

    mb, holder, _ = start(model_dir, store, gate=gate)
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        try:
            vec, hits = asyncio.run(asyncio.wait_for(go(mb, pool, holder), 60))
        finally:
            mb.stop()
    assert seen == ["lookalike-infer", "decode_0"], seen
    assert len(hits) == 2
    np.testing.assert_allclose(vec, singles[0], atol=2e-5)


def test_inline_false_always_prepares_in_the_executor(model_dir, store, inputs):
    from concurrent.futures import ThreadPoolExecutor

    arrays, _ = inputs
    seen = []

    def prepare():
        seen.append(threading.current_thread().name)
        return arrays[0]

    async def go(mb, pool):
        with mb.admit() as t:
            await mb.search(t, prepare, 1, executor=pool, inline=False)

    mb, _, _ = start(model_dir, store)
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        try:
            asyncio.run(go(mb, pool))
        finally:
            mb.stop()
    assert seen == ["decode_0"]


# ---- thread policy: every core for a lone query, one under load, and back to one when the cores
# ---- are taken (two threads then collapse: OpenMP workers wait for a descheduled peer)
def test_thread_policy_lone_query_uses_idle_threads_and_load_uses_one():
    from service.batching import ThreadPolicy

    p = ThreadPolicy(idle=2, machine_busy=lambda: False)
    assert p.choose(1, others_waiting=False) == (2, True)
    assert p.choose(4, others_waiting=False) == (1, False)   # a batch: the other core decodes and searches
    assert p.choose(1, others_waiting=True) == (1, False)    # someone waits behind it


def test_thread_policy_falls_back_to_one_thread_when_two_are_slower_and_probes_again():
    from service.batching import ThreadPolicy

    p = ThreadPolicy(idle=2, probe_every=4, machine_busy=lambda: False)
    seen = []
    for _ in range(12):
        n, lone = p.choose(1, others_waiting=False)
        assert lone
        seen.append(n)
        p.observe(n, 0.050 if n == 2 else 0.010)  # two threads collapsed (another process holds a core)
    assert seen[:4] == [2, 2, 1, 1]               # each warmed up, then measured once
    assert seen[2:].count(1) > seen[2:].count(2)  # then mostly one thread ...
    assert 2 in seen[2:]                          # ... while still probing two
    for _ in range(40):                           # the cores free up: two threads win again
        n, _ = p.choose(1, others_waiting=False)
        p.observe(n, 0.005 if n == 2 else 0.010)
    assert p.choose(1, others_waiting=False)[0] == 2 or p.ema[2] < p.ema[1]


def test_thread_policy_uses_one_thread_while_other_work_holds_the_cores():
    from service.batching import ThreadPolicy

    taken = [True]
    p = ThreadPolicy(idle=2, machine_busy=lambda: taken[0])
    assert p.choose(1, others_waiting=False) == (1, False)  # not even probed: 2 threads would collapse
    taken[0] = False
    assert p.choose(1, others_waiting=False) == (2, True)


def test_thread_policy_refuses_bad_values():
    from service.batching import ThreadPolicy

    with pytest.raises(ValueError):
        ThreadPolicy(idle=0)


class Threaded(Recording):
    """A Recording backend with ``set_threads``; records the count used by each call."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.counts: list[int] = []
        self.current = 1

    def set_threads(self, n: int) -> None:
        self.current = n
        self.inner.set_threads(n)

    def embed_array(self, batch):
        self.counts.append(self.current)
        return super().embed_array(batch)


def test_batcher_runs_a_lone_query_on_idle_threads_and_a_batch_on_one(model_dir, store, inputs, monkeypatch):
    import service.batching as sb
    from models.backends import TorchBackend

    arrays, singles = inputs
    faiss_calls: list[tuple[str, int]] = []
    real = sb.set_search_threads
    monkeypatch.setattr(sb, "set_search_threads",
                        lambda n: (faiss_calls.append((threading.current_thread().name, n)), real(n)))
    monkeypatch.setattr(sb.OtherCpu, "busy", lambda self: False)  # this test's machine may be busy
    holder = {}

    def factory():
        import torch

        torch.set_num_threads(1)
        holder["b"] = Threaded(TorchBackend(model_dir, bf16=False))
        return holder["b"]

    mb = MicroBatcher(factory, idle_threads=2, max_batch=8, wait_ms=50)
    mb.start().result(60)
    mb.attach_index(store)
    try:
        b = holder["b"]
        start_calls = len(b.counts)
        vec, hits = asyncio.run(_search_all(mb, arrays[:1], [3]))[0]
        assert b.counts[start_calls] == 2 and hits
        np.testing.assert_allclose(vec, singles[0], atol=1e-4)  # same vector with two threads
        assert all(n == 1 for _, n in faiss_calls)  # searches stay on 1 FAISS thread (the OpenMP trap)
        n = len(b.counts)
        results = asyncio.run(_search_all(mb, arrays, [3] * len(arrays)))
        assert [b.sizes[i] for i in range(n, len(b.sizes))] != [1] * (len(b.sizes) - n)  # batched
        assert all(c == 1 for c, s in zip(b.counts[n:], b.sizes[n:]) if s > 1)            # batches: one thread
        for (v, _), ref in zip(results, singles):
            np.testing.assert_allclose(v, ref, atol=1e-4)
    finally:
        mb.stop()


def test_other_cpu_counts_only_other_processes_work():
    """Busy means other processes used the cores; this process's own threads do not count."""
    from service.batching import OtherCpu

    clock, machine, own = [0.0], [100.0], [5.0]
    oc = OtherCpu(cores=2, machine_busy_s=lambda: machine[0], own_s=lambda: own[0], clock=lambda: clock[0])
    assert oc.busy() is False  # first reading: nothing to compare with yet
    clock[0], machine[0], own[0] = 1.0, 101.75, 6.625  # 1.75 cores busy, 1.625 of them ours
    assert oc.busy() is False and oc.others == pytest.approx(0.125)
    clock[0], machine[0], own[0] = 1.5, 103.0, 6.75  # within the period: the last answer, no new reading
    assert oc.busy() is False
    clock[0], machine[0], own[0] = 2.0, 103.0, 6.875  # 1.25 cores in the last second, 0.25 ours: 1.0 others
    assert oc.busy() is True and oc.others == pytest.approx(1.0)
    clock[0], machine[0], own[0] = 3.0, 103.75, 7.125  # others 0.5 core: exactly the threshold of 2 - 1.5
    assert oc.busy() is True
    clock[0], machine[0], own[0] = 4.0, 104.125, 7.125  # others 0.375 core: a core is free
    assert oc.busy() is False
    clock[0], machine[0], own[0] = 5.0, 105.5, 7.125  # others 1.375 cores: busy again
    assert oc.busy() is True
    clock[0], machine[0], own[0] = 60.0, 160.0, 7.125  # idle a minute while others worked: stale
    assert oc.busy() is False
    clock[0], machine[0], own[0] = 61.0, 160.25, 7.125  # a fresh window: 0.25 core
    assert oc.busy() is False and oc.others == pytest.approx(0.25)


def test_other_cpu_falls_back_to_the_load_average_without_proc_stat(monkeypatch):
    import os

    from service.batching import OtherCpu

    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert OtherCpu(cores=2, machine_busy_s=lambda: None).busy() is True
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert OtherCpu(cores=2, machine_busy_s=lambda: None).busy() is False


def test_machine_busy_seconds_reads_proc_stat():
    from service.batching import _machine_busy_seconds

    a = _machine_busy_seconds()
    if a is None:
        pytest.skip("no /proc/stat on this platform")
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:  # burn 0.2 s of CPU
        pass
    b = _machine_busy_seconds()
    assert b - a >= 0.15  # the machine's busy time includes this process's own work


class Forkable(Recording):
    """A Recording backend whose ``fork`` gives twins sharing one log, each call waiting at a
    barrier of ``meet`` calls (so a test can prove two forward passes run at the same time)."""

    def __init__(self, inner, log: list | None = None, barrier: threading.Barrier | None = None,
                 forks_left: int = 8, fork_error: Exception | None = None,
                 hold: threading.Event | None = None) -> None:
        super().__init__(inner)
        self.log = log if log is not None else []
        self.barrier, self.forks_left, self.fork_error, self.hold = barrier, forks_left, fork_error, hold

    def embed_array(self, batch):
        self.log.append((threading.current_thread().name, len(batch)))
        if len(batch) and batch[0].mean() != 0.0:  # not the warm-up zeros
            if self.barrier is not None:
                self.barrier.wait(30)
            if self.hold is not None:
                self.hold.wait(30)
        return super().embed_array(batch)

    def fork(self):
        if self.fork_error is not None:
            raise self.fork_error
        if self.forks_left <= 0:
            return None
        self.forks_left -= 1
        return Forkable(self.inner, self.log, self.barrier, 0, hold=self.hold)


def _start_forkable(model_dir, store, **kw):
    from models.backends import TorchBackend

    backend_kw = {k: kw.pop(k) for k in ("barrier", "forks_left", "fork_error", "hold") if k in kw}
    holder = {}

    def factory():
        import torch

        torch.set_num_threads(1)
        holder["b"] = Forkable(TorchBackend(model_dir, bf16=False), **backend_kw)
        return holder["b"]

    mb = MicroBatcher(factory, **kw)
    mb.start().result(60)
    mb.attach_index(store)
    return mb, holder


def test_two_inference_workers_run_two_forward_passes_at_once(model_dir, store, inputs):
    """With workers=2 a second thread takes batches from the same queue: two queries meet at a
    barrier inside their forward passes, which one thread alone could never pass."""
    arrays, _ = inputs
    mb, holder = _start_forkable(model_dir, store, workers=2, max_batch=1, barrier=threading.Barrier(2))
    try:
        assert mb.running_workers == 2
        results = asyncio.run(_search_all(mb, arrays[:2], [5, 5]))
        for (vector, hits), a in zip(results, arrays[:2]):
            expected = holder["b"].inner.embed_array(a[None])[0]
            np.testing.assert_allclose(vector, expected, atol=1e-5)
            assert hits and hits == store.search(expected[None], 5)[0]
        threads = {name for name, size in holder["b"].log if size == 1}
        assert threads >= {"lookalike-infer", "lookalike-infer-2"}
    finally:
        mb.stop()
    assert not any(t.is_alive() for t in [mb._infer_thread, *mb._more_infer_threads])


@pytest.fixture
def batching_kept(monkeypatch):
    """Batching stays on whatever the start-up timing says (the tests below are about the queue)."""
    monkeypatch.setattr(MicroBatcher, "BATCH_GAIN_MIN", 1e9)


def test_queries_arriving_together_are_split_between_free_inference_threads(model_dir, store, inputs,
                                                                            batching_kept):
    """Two queries at once with both threads free: each thread runs one (they meet at a barrier
    inside their forward passes), rather than one thread batching both while the other idles,
    although batches of 4 are allowed."""
    arrays, _ = inputs
    mb, holder = _start_forkable(model_dir, store, workers=2, max_batch=4, barrier=threading.Barrier(2))
    try:
        assert mb.batch_cap == 4
        for _ in range(3):
            holder["b"].log.clear()
            results = asyncio.run(_search_all(mb, arrays[:2], [5, 5]))
            assert all(hits for _, hits in results)
            assert sorted(holder["b"].log) == [("lookalike-infer", 1), ("lookalike-infer-2", 1)]
    finally:
        mb.stop()


def test_a_queue_behind_busy_inference_threads_is_still_batched(model_dir, store, inputs, batching_kept):
    """Only free threads get a share: with both threads held in a forward pass, the queries
    queued meanwhile are batched (up to max_batch) once a thread comes free."""
    arrays, _ = inputs
    hold = threading.Event()
    mb, holder = _start_forkable(model_dir, store, workers=2, max_batch=4, hold=hold)
    holder["b"].log.clear()  # the warm-up passes
    try:
        async def scenario():
            tasks = [asyncio.ensure_future(_search_all(mb, arrays[i:i + 1], [3])) for i in range(2)]
            deadline = time.monotonic() + 10
            while mb._busy < 2 and time.monotonic() < deadline:  # both threads inside a forward pass
                await asyncio.sleep(0.002)
            tasks += [asyncio.ensure_future(_search_all(mb, arrays[i:i + 1], [3])) for i in range(2, 8)]
            while mb._queue.qsize() < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            hold.set()
            return await asyncio.gather(*tasks)

        results = asyncio.run(scenario())
        assert len(results) == 8 and all(r[0][1] for r in results)
        sizes = [size for _, size in holder["b"].log]
        assert sizes[:2] == [1, 1] and sum(sizes) == 8 and max(sizes) >= 3, holder["b"].log
    finally:
        hold.set()
        mb.stop()


class Paced(Forkable):
    """A forkable backend whose forward pass sleeps ``fixed + per_image x images`` seconds. The
    start-up passes (all-zero inputs) cost only that: they return one fixed unit vector each."""

    def __init__(self, inner, fixed: float, per_image: float, **kw) -> None:
        super().__init__(inner, **kw)
        self.fixed, self.per_image = fixed, per_image

    def embed_array(self, batch):
        time.sleep(self.fixed + self.per_image * len(batch))
        if len(batch) and not batch.any():
            v = np.zeros((len(batch), self.card.embedding_dim), dtype=np.float32)
            v[:, 0] = 1.0
            return v
        return super().embed_array(batch)

    def fork(self):
        return Paced(self.inner, self.fixed, self.per_image, log=self.log, forks_left=0)


@pytest.mark.parametrize("fixed, per_image, workers, cap", [
    (0.0, 0.012, 2, 1),     # a batch costs as much per image as one query: one query per thread
    (0.024, 0.002, 2, 8),   # a batch of 4 costs 0.36x per image: batching stays
    (0.0, 0.012, 1, 8),     # one inference thread: nothing to spread over, not measured
])
def test_batching_follows_what_a_batch_costs_per_image_with_several_threads(model_dir, store, inputs,
                                                                           fixed, per_image, workers, cap):
    from models.backends import TorchBackend

    arrays, _ = inputs
    mb = MicroBatcher(lambda: Paced(TorchBackend(model_dir, bf16=False), fixed, per_image), max_batch=8,
                      workers=workers)
    mb.start().result(60)
    mb.attach_index(store)
    try:
        assert mb.batch_cap == cap
        assert (mb.batching_measured is None) == (workers == 1)
        if mb.batching_measured:
            assert mb.batching_measured["batch_cap"] == cap and mb.batching_measured["batch"] == 4
        results = asyncio.run(_search_all(mb, arrays[:6], [3] * 6))
        assert all(len(hits) == 3 for _, hits in results)
    finally:
        mb.stop()


class Staggered(Forkable):
    """Forkable whose twin (the second inference thread) takes ``delay`` s more per real pass."""

    def __init__(self, inner, delay: float = 0.0, **kw) -> None:
        super().__init__(inner, **kw)
        self.delay = delay

    def embed_array(self, batch):
        if self.delay and len(batch) and batch.any():
            time.sleep(self.delay)
        return super().embed_array(batch)

    def fork(self):
        return Staggered(self.inner, 0.08, log=self.log, forks_left=0)


@pytest.mark.parametrize("window, searches", [(0.5, [2]), (0.0, [1, 1])])
def test_the_search_thread_waits_for_a_query_still_in_a_forward_pass(model_dir, store, inputs, monkeypatch,
                                                                     window, searches):
    """Two queries split between the threads; the second thread's pass takes 80 ms longer. With
    a gathering window (a recent search's duration, here set to 0.5 s) both are searched in one
    call (one scan of the index); with none, each alone."""
    from models.backends import TorchBackend

    arrays, _ = inputs
    monkeypatch.setattr(MicroBatcher, "SEARCH_GATHER_MAX_S", 0.5)
    monkeypatch.setattr(MicroBatcher, "BATCH_GAIN_MIN", 0.0)  # one query per forward pass
    mb = MicroBatcher(lambda: Staggered(TorchBackend(model_dir, bf16=False)), max_batch=4, workers=2)
    mb.start().result(60)
    rstore = RecordingStore(store)
    mb.attach_index(rstore)
    try:
        assert mb.batch_cap == 1
        mb._search_s = window
        results = asyncio.run(_search_all(mb, arrays[:2], [4, 4]))
        assert all(len(hits) == 4 for _, hits in results)
        assert rstore.sizes == searches, (rstore.threads, mb.backend.log)
        if window:
            assert rstore.threads == ["lookalike-search"]
    finally:
        mb.stop()


def test_lone_queries_run_on_the_first_inference_thread(model_dir, store, inputs):
    """The helper thread takes work only while the first is busy, so one query at a time always
    meets the first thread's warm model (and its lone-query threads)."""
    arrays, _ = inputs
    mb, holder = _start_forkable(model_dir, store, workers=2, max_batch=4)
    try:
        assert mb.running_workers == 2
        holder["b"].log.clear()
        for a in arrays[:6]:
            deadline = time.monotonic() + 10
            while mb._busy and time.monotonic() < deadline:  # one at a time: each to an idle service
                time.sleep(0.001)
            asyncio.run(_search_all(mb, [a], [3]))
        assert [name for name, _ in holder["b"].log] == ["lookalike-infer"] * 6
    finally:
        mb.stop()


def test_a_backend_that_cannot_fork_runs_one_worker(model_dir, store, inputs, caplog):
    arrays, _ = inputs
    for kw, why in (({"forks_left": 0}, "runs in one inference thread"),
                    ({"fork_error": RuntimeError("no more memory")}, "could not be started")):
        with caplog.at_level("INFO", logger="service.batching"):
            mb, holder = _start_forkable(model_dir, store, workers=2, **kw)
        try:
            assert mb.running_workers == 1
            assert why in caplog.text
            (vector, hits), = asyncio.run(_search_all(mb, arrays[:1], [3]))
            assert len(hits) == 3
        finally:
            mb.stop()
        caplog.clear()
