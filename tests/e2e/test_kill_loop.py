"""Bounded SIGKILL loop (issue 12, the CI version of ``bench/bench_kill_loop.py``'s 100 cycles): a
real server is killed with adds and deletes in flight, five times. After every restart each
acknowledged add is there with its bytes, each acknowledged delete is gone, and the start-up
sweep has left no ``.tmp`` file, unfinished generation or orphan upload behind
(:mod:`tests.e2e.killloop`)."""

from __future__ import annotations

import pytest

from tests.e2e.killloop import run_kill_loop

CYCLES = 5


@pytest.mark.slow
def test_sigkill_loop_loses_nothing_and_leaves_no_debris(e2e_model, e2e_index, tmp_path):
    result = run_kill_loop(e2e_model, e2e_index, tmp_path, CYCLES)
    assert result["problems"] == [], result["problems"]
    assert result["final_sigterm_status"] == 0
    assert result["acknowledged_adds"] >= CYCLES, result  # the loop did write under the kills
