"""Deterministic test images and the catalogue of awkward uploads (bytes, made on the fly)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def pattern(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A smooth random RGB image (low-res noise upscaled), distinct per seed."""
    rng = np.random.default_rng(seed)
    small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        kw.setdefault("quality", 95)
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    return encode(pattern(seed, size), "JPEG")


def png_bomb(width: int = 7000, height: int = 7000) -> bytes:
    """A real, valid 1-bit PNG of width*height pixels that compresses to a few KB."""
    raw_row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(raw_row) for _ in range(height)) + comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png16(seed: int = 3) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((40, 50)) * 65535).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16"), img.mode
    return encode(img, "PNG")


def cmyk_jpeg(seed: int = 4) -> bytes:
    return encode(pattern(seed).convert("CMYK"), "JPEG")


def palette_transparent_png(seed: int = 5) -> bytes:
    img = pattern(seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def animated_gif(seed: int = 6) -> bytes:
    frames = [pattern(seed + i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def exif_rotated_pair(seed: int = 7) -> tuple[bytes, bytes, bytes]:
    """(upright JPEG, same picture stored rotated with EXIF orientation 6, rotated without EXIF).

    Orientation 6 means "rotate 90° clockwise to display"; the stored pixels are the upright
    picture turned 90° counter-clockwise. 4:4:4, quality 100 so both encode the same pixels.
    """
    upright = pattern(seed, (96, 64))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    up = encode(upright, "JPEG", quality=100, subsampling=0)
    rot = encode(stored, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    rot_plain = encode(stored, "JPEG", quality=100, subsampling=0)
    return up, rot, rot_plain


def tiff(seed: int = 8) -> bytes:
    return encode(pattern(seed), "TIFF")


def eps(seed: int = 9) -> bytes:
    return encode(pattern(seed), "EPS")


def psd() -> bytes:
    """A minimal Photoshop header (8BPS, version 1, 3 channels, 8x8, 8-bit RGB) and empty sections."""
    header = b"8BPS" + struct.pack(">H6sHIIHH", 1, b"\x00" * 6, 3, 8, 8, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + b"\x00" * (8 * 8 * 3)


def bmp(seed: int = 10) -> bytes:
    return encode(pattern(seed), "BMP")


def random_bytes(n: int = 4096, seed: int = 11) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return b"\x00\x01" + data[2:]  # never an image magic by chance


def truncated_jpeg(seed: int = 12) -> bytes:
    data = jpeg(seed, (160, 120))
    return data[: len(data) // 2]
