"""SIGKILL cycles against a real server with adds and deletes in flight (issue 12's 100-cycle target),
the long version of ``tests/e2e/test_kill_loop.py``.

Each cycle starts ``python -m lookalike serve`` (checkpoint every 3 writes) over one index of 48
generated images, lets two clients add and delete for 0.8-2 s, and SIGKILLs it. After every
restart: each acknowledged add is served with its exact bytes (else "lost"), each acknowledged
delete is 404 (else "resurrected"), and the index directory holds no ``.tmp`` file, unfinished
generation or orphan upload ("debris"). A final SIGTERM must exit 0. Prints one line per 10
cycles, then one JSON line.

    nice -n 19 python bench/bench_kill_loop.py                # 100 cycles, 15 min at load 4 (50+ at load 15)
    nice -n 19 python bench/bench_kill_loop.py --cycles 20
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.backends import cpu_summary  # noqa: E402
from bench.bench_reliability import build_fixture  # noqa: E402
from tests.e2e.killloop import run_kill_loop  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, index = build_fixture(tmp)
        result = run_kill_loop(model, index, tmp, args.cycles, seed=args.seed, log_every=10)
    kinds = collections.Counter(kind for _, kind, _ in result["problems"])
    summary = {"cycles": args.cycles, "acknowledged_adds": result["acknowledged_adds"],
               "acknowledged_deletes": result["acknowledged_deletes"], "lost": kinds["lost"],
               "resurrected": kinds["resurrected"], "debris_files": kinds["debris"], "orphans": kinds["orphans"],
               "final_sigterm_status": result["final_sigterm_status"],
               "restart_s_median": round(statistics.median(result["restart_s"]), 2),
               "restart_s_max": round(max(result["restart_s"]), 2), "minutes": round((time.monotonic() - t0) / 60, 1)}
    print(f"{args.cycles} SIGKILL cycles: {summary['acknowledged_adds']} adds and {summary['acknowledged_deletes']} "
          f"deletes acknowledged; lost {summary['lost']}, resurrected {summary['resurrected']}, debris files "
          f"{summary['debris_files']}, orphans {summary['orphans']}; final SIGTERM exit {summary['final_sigterm_status']}; "
          f"restart median {summary['restart_s_median']} s")
    print(json.dumps({"bench": "kill_loop", **summary, "problems": [list(map(str, p)) for p in result["problems"][:20]],
                      "python": platform.python_version(), "cpu": cpu_summary(), "cpus": os.cpu_count(),
                      "loadavg": os.getloadavg()}))
    return 0 if not result["problems"] and result["final_sigterm_status"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
