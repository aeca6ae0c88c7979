"""Decode + preprocess cost of the worst-case uploads against a normal photo, in the same run.

What the service runs per upload (:meth:`models.preprocess.Preprocess.load`, 112 px crop at
128 px resize, JPEG draft on) on:

* baseline: a normal 500x375 JPEG (random-texture photo stand-in, quality 90);
* the worst cases of issue 12: an 8192x1 PNG, a 16-bit grey 40 MP PNG, an RGBA 40 MP PNG and a
  GIF with 400,000 frames (built by ``tests/unit/models/decode_worst.py``).

Reported per case: median and p90 wall time over ``--repeat`` runs (in this process, after one
warm-up), the ratio to the baseline median, and the peak RSS growth of one decode measured in a
fresh interpreter (``VmHWM``). Prints a table, then one JSON line.

    python bench/bench_decode.py               # ~1 min on 2 cores
    python bench/bench_decode.py --repeat 5    # quicker
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from models.card import ModelCard  # noqa: E402
from models.decode import DecodeLimits  # noqa: E402
from models.preprocess import Preprocess  # noqa: E402
from tests.unit.models.decode_worst import WORST_CASES, write_case  # noqa: E402

_RSS = r"""
import io, json, sys
from pathlib import Path
from PIL import Image
from models.card import ModelCard
from models.decode import DecodeLimits
from models.preprocess import Preprocess
def hwm():  # peak RSS of this process image in bytes (VmHWM starts afresh at exec; ru_maxrss
    # would carry the parent's RSS at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
pre = Preprocess(ModelCard(backbone="resnet18", embedding_dim=32, image_size=112, resize_size=128))
warm = io.BytesIO(); Image.new("RGB", (64, 48), (9, 99, 199)).save(warm, "JPEG"); pre.load(warm.getvalue())
data = Path(sys.argv[1]).read_bytes()
before = hwm()
pre.load(data, limits=DecodeLimits(max_bytes=max(len(data) + 1, 10 * 2**20)))
print(json.dumps({"growth_mib": (hwm() - before) / 2**20}))
"""


def baseline_jpeg() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)  # smooth-ish texture, photo-like size
    img = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def time_case(pre: Preprocess, data: bytes, repeat: int) -> list[float]:
    limits = DecodeLimits(max_bytes=max(len(data) + 1, 10 * 2**20))
    pre.load(data, limits=limits)  # warm-up
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        pre.load(data, limits=limits)
        out.append(time.perf_counter() - t0)
    return out


def peak_growth_mib(path: Path) -> float:
    out = subprocess.run([sys.executable, "-c", _RSS, str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    pre = Preprocess(ModelCard(backbone="resnet18", embedding_dim=32, image_size=112, resize_size=128))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline_500x375.jpg"
        base.write_bytes(baseline_jpeg())
        cases = [("baseline 500x375 JPEG", base)] + [(WORST_CASES[n][0], write_case(n, Path(tmp))) for n in WORST_CASES]
        for name, path in cases:
            data = path.read_bytes()
            times = time_case(pre, data, args.repeat)
            rows.append({"case": name, "bytes": len(data), "median_ms": statistics.median(times) * 1000,
                         "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1000,
                         "peak_rss_growth_mib": peak_growth_mib(path)})
    base_ms = rows[0]["median_ms"]
    for r in rows:
        r["x_baseline"] = r["median_ms"] / base_ms
    print(f"{'case':<46} {'bytes':>10} {'median ms':>10} {'p90 ms':>8} {'x JPEG':>7} {'+RSS MiB':>9}")
    for r in rows:
        print(f"{r['case']:<46} {r['bytes']:>10} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
              f"{r['x_baseline']:>7.1f} {r['peak_rss_growth_mib']:>9.1f}")
    print(json.dumps({"bench": "decode", "repeat": args.repeat, "python": platform.python_version(),
                      "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
