"""Safe image decoding shared by every path (training, indexing, serving).

Every image that enters lookalike goes through :func:`decode_image`. It enforces a
format allowlist decided by the file's content (not its name), byte / pixel / side
limits, treats Pillow's decompression-bomb warning as an error, applies the EXIF
orientation and converts every mode (palette, alpha, CMYK, 16-bit, grey) to 8-bit RGB.

Errors are :class:`ImageDecodeError` with a machine-readable ``code`` and a message
naming the source and the reason; no other exception type escapes.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

#: Formats accepted, as reported by Pillow after sniffing the content.
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "MPO"})

# Never accept truncated files silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False



@dataclass(frozen=True)
class DecodeLimits:
    """Limits applied before and while decoding.

    ``max_bytes``: size of the encoded input; ``max_pixels``: width*height;
    ``max_side``: the longer side; ``min_side``: the shorter side.
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 8192
    min_side: int = 1


DEFAULT_LIMITS = DecodeLimits()


class ImageDecodeError(ValueError):
    """An image was refused. ``code`` is one of: ``too_large``, ``unsupported_format``,
    ``undecodable``, ``truncated``, ``too_many_pixels``, ``too_small``, ``empty``, ``unreadable``."""

    def __init__(self, code: str, message: str, source: str = "<upload>") -> None:
        self.code = code
        self.source = source
        self.reason = message
        super().__init__(f"{source}: {message}")


def _sniff_format(head: bytes) -> str | None:
    """Return the Pillow format name for the magic bytes in ``head``, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _describe_other(head: bytes) -> str:
    known = {
        b"%!PS": "PostScript/EPS",
        b"\xc5\xd0\xd3\xc6": "EPS",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"8BPS": "PSD",
        b"BM": "BMP",
        b"%PDF": "PDF",
        b"\x00\x00\x01\x00": "ICO",
    }
    for magic, name in known.items():
        if head.startswith(magic):
            return name
    if head[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1"):
        return "HEIF/AVIF"
    return "unknown"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (Pillow handles Adobe inverted CMYK JPEGs on load), YCbCr, L, 1, LAB, HSV
    return img.convert("RGB")


def decode_image(
    data: bytes | BinaryIO | str | os.PathLike[str],
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    source: str | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode an image safely into an 8-bit RGB :class:`PIL.Image.Image`.

    Args:
        data: encoded bytes, a binary file object, or a path.
        limits: byte, pixel and side limits.
        source: name used in error messages (defaults to the path or ``<upload>``).
        draft_size: if given, JPEGs may be decoded at a reduced scale (DCT scaling) no
            smaller than this ``(w, h)``; used where the exact full size is not needed.

    Returns:
        An RGB image with EXIF orientation applied.

    Raises:
        ImageDecodeError: with ``code`` and a message naming ``source`` and the reason.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        source = source or str(path)
        try:
            size = path.stat().st_size
            if size > limits.max_bytes:
                raise ImageDecodeError(
                    "too_large", f"file is {size} bytes, over the limit of {limits.max_bytes}", source
                )
            raw = path.read_bytes()
        except OSError as exc:
            raise ImageDecodeError("unreadable", f"cannot read file ({exc.strerror or exc})", source) from None
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        raw = data.read(limits.max_bytes + 1)
    source = source or "<upload>"
    if len(raw) == 0:
        raise ImageDecodeError("empty", "file is empty", source)
    if len(raw) > limits.max_bytes:
        raise ImageDecodeError("too_large", f"over the limit of {limits.max_bytes} bytes", source)

    fmt = _sniff_format(raw[:16])
    if fmt is None:
        other = _describe_other(raw[:16])
        if other == "unknown":
            raise ImageDecodeError("undecodable", "not a recognised image (unknown content)", source)
        raise ImageDecodeError(
            "unsupported_format",
            f"format {other} is not allowed (allowed: JPEG, PNG, WebP, GIF)",
            source,
        )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # MPO (multi-picture JPEG from cameras) has no opener of its own: the JPEG factory returns it.
            img = Image.open(io.BytesIO(raw), formats=[fmt])
            if img.format not in ALLOWED_FORMATS:
                raise ImageDecodeError("unsupported_format", f"format {img.format} is not allowed", source)
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageDecodeError(
                    "too_many_pixels", f"{w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}", source
                )
            if max(w, h) > limits.max_side:
                raise ImageDecodeError(
                    "too_many_pixels", f"{w}x{h}: a side is over the limit of {limits.max_side} px", source
                )
            if min(w, h) < limits.min_side:
                raise ImageDecodeError("too_small", f"{w}x{h} is under {limits.min_side} px per side", source)
            if draft_size is not None and img.format in ("JPEG", "MPO"):
                # DCT-domain downscale: never below the requested size, so quality is kept.
                img.draft("RGB", draft_size)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF / MPO: first frame
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", f"decompression bomb refused ({exc})", source) from None
    except Image.DecompressionBombWarning as exc:
        raise ImageDecodeError("too_many_pixels", f"decompression bomb refused ({exc})", source) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("undecodable", f"content is not a decodable {fmt}", source) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "broken data stream" in msg.lower() or isinstance(exc, EOFError):
            raise ImageDecodeError("truncated", f"{fmt} data is truncated", source) from None
        raise ImageDecodeError("undecodable", f"cannot decode {fmt} ({msg[:120]})", source) from None
    except (MemoryError, Exception) as exc:  # noqa: BLE001 - a decoder bug must not crash a job
        log.warning("unexpected decoder failure on %s: %r", source, exc)
        raise ImageDecodeError("undecodable", f"cannot decode {fmt} ({type(exc).__name__})", source) from None
