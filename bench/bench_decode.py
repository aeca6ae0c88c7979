"""Decode + preprocess cost of the worst-case uploads against a normal photo, in the same run.

What the service runs per upload (:meth:`models.preprocess.Preprocess.load` with the service's
default limits, JPEG draft on; by default the default recipe's 224 px crop at 256 px resize,
``--image-size 112`` for the test models) on:

* baseline: a normal 500x375 JPEG (random-texture photo stand-in, quality 90);
* the worst cases of issue 12: an 8192x1 PNG, a 16-bit grey 40 MP PNG, an RGBA 40 MP PNG and a
  GIF with 400,000 frames (built by ``tests/unit/models/decode_worst.py``); the 40 MP PNGs are
  over ``LOOKALIKE_MAX_FULL_DECODE_PIXELS`` and refused before decoding (that refusal is their cost);
* the costliest PNGs still accepted: RGB, RGBA and 16-bit grey at that pixel limit (2000 x 2000).

Reported per case: median and p90 wall time over ``--repeat`` runs (in this process, after one
warm-up), the ratio to the baseline median, and the peak RSS growth of one decode measured in a
fresh interpreter (``VmHWM``). Prints a table, then one JSON line.

    nice -n 19 python bench/bench_decode.py               # ~1 min on 2 cores
    nice -n 19 python bench/bench_decode.py --repeat 5    # quicker
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
from models.backends import cpu_summary  # noqa: E402
from models.decode import ImageDecodeError  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.unit.models.decode_worst import WORST_CASES, png, write_case  # noqa: E402

#: The service's default LOOKALIKE_MAX_FULL_DECODE_PIXELS.
MAX_FULL = Settings.model_fields["max_full_decode_pixels"].default

_RSS = r"""
import io, json, sys
from pathlib import Path
from PIL import Image
from models.card import ModelCard
from models.decode import DecodeLimits, ImageDecodeError
from models.preprocess import Preprocess
def hwm():  # peak RSS of this process image in bytes (VmHWM starts afresh at exec; ru_maxrss
    # would carry the parent's RSS at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
size, full = int(sys.argv[2]), int(sys.argv[3])
pre = Preprocess(ModelCard(backbone="resnet18", embedding_dim=32, image_size=size, resize_size=size * 8 // 7))
warm = io.BytesIO(); Image.new("RGB", (64, 48), (9, 99, 199)).save(warm, "JPEG"); pre.load(warm.getvalue())
data = Path(sys.argv[1]).read_bytes()
before = hwm()
try:
    pre.load(data, limits=DecodeLimits(max_bytes=max(len(data) + 1, 10 * 2**20), max_full_pixels=full))
except ImageDecodeError:
    pass
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


def service_limits(data: bytes) -> DecodeLimits:
    """The service's default decode limits (room for ``data``'s size)."""
    return DecodeLimits(max_bytes=max(len(data) + 1, 10 * 2**20), max_full_pixels=MAX_FULL)


def time_case(pre: Preprocess, data: bytes, repeat: int) -> tuple[list[float], str]:
    """Wall times of ``repeat`` loads after a warm-up, and the outcome (decoded or refused: code)."""
    limits = service_limits(data)

    def once() -> str:
        try:
            pre.load(data, limits=limits)
            return "decoded"
        except ImageDecodeError as exc:
            return f"refused ({exc.code})"

    outcome = once()  # warm-up
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        once()
        out.append(time.perf_counter() - t0)
    return out, outcome


def peak_growth_mib(path: Path, image_size: int) -> float:
    out = subprocess.run([sys.executable, "-c", _RSS, str(path), str(image_size), str(MAX_FULL)], cwd=REPO,
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


AT_LIMIT = {
    "rgb_at_limit_png": ("RGB PNG at the full-decode limit", lambda s: png(s, s, color_type=2)),
    "rgba_at_limit_png": ("RGBA PNG at the full-decode limit", lambda s: png(s, s, color_type=6)),
    "16bit_at_limit_png": ("16-bit grey PNG at the full-decode limit", lambda s: png(s, s, bit_depth=16, color_type=0)),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--image-size", type=int, default=224, help="model crop (resize = size x 8/7)")
    args = ap.parse_args(argv)
    pre = Preprocess(ModelCard(backbone="resnet18", embedding_dim=32, image_size=args.image_size,
                               resize_size=args.image_size * 8 // 7))
    side = int(MAX_FULL ** 0.5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline_500x375.jpg"
        base.write_bytes(baseline_jpeg())
        cases = [("baseline 500x375 JPEG", base)] + [(WORST_CASES[n][0], write_case(n, Path(tmp))) for n in WORST_CASES]
        for key, (name, make) in AT_LIMIT.items():
            path = Path(tmp) / f"{key}.png"
            path.write_bytes(make(side))
            cases.append((f"{name} ({side}x{side})", path))
        for name, path in cases:
            data = path.read_bytes()
            times, outcome = time_case(pre, data, args.repeat)
            rows.append({"case": name, "bytes": len(data), "outcome": outcome,
                         "median_ms": statistics.median(times) * 1000,
                         "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1000,
                         "peak_rss_growth_mib": peak_growth_mib(path, args.image_size)})
    base_ms = rows[0]["median_ms"]
    for r in rows:
        r["x_baseline"] = r["median_ms"] / base_ms
    print(f"{'case':<52} {'bytes':>9} {'outcome':<26} {'median ms':>9} {'p90 ms':>8} {'x JPEG':>7} {'+RSS MiB':>9}")
    for r in rows:
        print(f"{r['case']:<52} {r['bytes']:>9} {r['outcome']:<26} {r['median_ms']:>9.2f} {r['p90_ms']:>8.2f} "
              f"{r['x_baseline']:>7.1f} {r['peak_rss_growth_mib']:>9.1f}")
    print(json.dumps({"bench": "decode", "repeat": args.repeat, "image_size": args.image_size,
                      "max_full_decode_pixels": MAX_FULL, "python": platform.python_version(), "cpu": cpu_summary(),
                      "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
