"""Hand-built worst-case images for the decode-bound tests and ``bench/bench_decode.py``.

Written byte by byte (zlib streams row by row), so making a 40 MP PNG costs a few MiB of
memory, not the raster it describes.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, pattern: bytes | None = None) -> bytes:
    """A valid PNG whose every row is ``pattern`` repeated (default: a grey ramp), filter 0.

    ``color_type``: 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA; ``bit_depth`` 8 or 16.
    """
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row_bytes = width * channels * bit_depth // 8
    if pattern is None:
        pattern = bytes(range(7, 250, 3))
    row = b"\x00" + (pattern * (row_bytes // len(pattern) + 1))[:row_bytes]
    comp = zlib.compressobj(9)
    parts = []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def gif_frames(n_frames: int, width: int = 2, height: int = 2) -> bytes:
    """An animated GIF of ``n_frames`` tiny frames (about 20 bytes each)."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    netscape = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    # one frame: graphic control ext + image descriptor + LZW data (min code size 2, pixels 0)
    gce = b"\x21\xf9\x04\x00\x01\x00\x00\x00"
    desc = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    lzw = b"\x08\x06\x00\x01\x08\x04\x10\x10\x00"  # 2x2 pixels of index 0, as Pillow writes them
    frame = gce + desc + lzw
    return header + netscape + frame * n_frames + b"\x3b"


WORST_CASES = {
    # name: (description, builder)
    "8192x1_png": ("8192x1 PNG (extreme aspect ratio, 287 bytes)", lambda: png(8192, 1)),
    "16bit_40mp_png": ("16-bit grey 8000x5000 PNG", lambda: png(8000, 5000, bit_depth=16, color_type=0)),
    "rgba_40mp_png": ("RGBA 8000x5000 PNG", lambda: png(8000, 5000, color_type=6)),
    "gif_400k_frames": ("GIF with 400,000 frames", lambda: gif_frames(400_000)),
}


def write_case(name: str, directory: Path) -> Path:
    """Build worst case ``name`` into ``directory`` (once) and return its path."""
    path = directory / f"{name}.bin"
    if not path.exists():
        path.write_bytes(WORST_CASES[name][1]())
    return path
