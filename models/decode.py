"""Safe image decoding shared by every path (training, indexing, serving).

Every image that enters lookalike goes through :func:`open_image` (directly, through
:func:`decode_image`, or through :meth:`models.preprocess.Preprocess.load`). It enforces a
format allowlist decided by the file's content (not its name; SVG, TIFF, BMP, ... are refused),
byte / pixel / side limits, treats Pillow's decompression-bomb warning as an error, decodes the
first frame only and applies the EXIF orientation in place. :func:`to_rgb` converts every mode
(palette, alpha, CMYK, 16-bit, grey) to 8-bit RGB strip by strip, with no full-size float copy.

Errors are :class:`ImageDecodeError` with a machine-readable ``code`` and a message
naming the source and the reason; no other exception type escapes.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
    ``max_side``: the longer side; ``min_side``: the shorter side; ``max_full_pixels``:
    width*height of a PNG, WebP or GIF, formats with no reduced-scale decoding (a JPEG can be
    decoded at 1/2..1/8 scale, see ``draft_size``), so their decode cost is linear in their
    pixels (about 5 ns each for a PNG here); None = ``max_pixels``.
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 8192
    min_side: int = 1
    max_full_pixels: int | None = None


DEFAULT_LIMITS = DecodeLimits()


class ImageDecodeError(ValueError):
    """An image was refused. ``code`` is one of: ``too_large``, ``unsupported_format``,
    ``undecodable``, ``truncated``, ``too_many_pixels``, ``too_small``, ``empty``, ``unreadable``."""

    def __init__(self, code: str, message: str, source: str = "<upload>") -> None:
        self.code = code
        self.source = source
        self.reason = message
        super().__init__(f"{source}: {message}")


#: File name endings of the formats decoded (a folder walk lists these; content still decides).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif"})

#: File extension and media type of each sniffed format (the one table for the whole project).
FORMAT_EXT: dict[str, str] = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
FORMAT_MEDIA_TYPE: dict[str, str] = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                                     "GIF": "image/gif"}


def sniff_format(head: bytes) -> str | None:
    """The format named by the magic bytes in ``head`` (its first 12 bytes are enough):
    ``"JPEG"``, ``"PNG"``, ``"WEBP"``, ``"GIF"``, or None for anything else."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def image_ext(data: bytes) -> str:
    """File extension (``jpg``, ``png``, ``webp``, ``gif``) for image bytes, by content.

    Raises:
        ValueError: the bytes are not a JPEG, PNG, WebP or GIF image.
    """
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ValueError("not a JPEG, PNG, WebP or GIF image")
    return FORMAT_EXT[fmt]


def image_media_type(head: bytes) -> str | None:
    """Media type (``image/jpeg``, ...) for the first bytes of an image file, or None if the
    content is not one of the accepted formats."""
    fmt = sniff_format(head[:16])
    return None if fmt is None else FORMAT_MEDIA_TYPE[fmt]


def _is_svg(head: bytes) -> bool:
    """SVG (XML text): ``<svg``, or an XML declaration / doctype followed by an ``<svg`` element."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!doctype", b"<!--")) and b"<svg" in text)


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
    if _is_svg(head):
        return "SVG"
    return "unknown"


#: Largest strip (in decoded pixels) converted at once by :func:`to_rgb`; bounds the extra
#: memory of a mode conversion to a few MiB whatever the image size.
STRIP_PIXELS = 1 << 18

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def pixel_range(img: Image.Image) -> tuple[float, float] | None:
    """``(min, max)`` over the whole image for the modes whose conversion depends on it (``I``,
    ``F``), else None. Computed by Pillow without any copy of the raster."""
    if img.mode in ("I", "F"):
        lo, hi = img.getextrema()
        return float(lo), float(hi)
    return None


def _strip_to_rgb(img: Image.Image, value_range: tuple[float, float] | None) -> Image.Image:
    """Pointwise conversion of one (small) image to 8-bit RGB; see :func:`to_rgb`."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in _SIXTEEN_BIT:
        # floor(v / 65535 * 255 + 0.5) in exact integer arithmetic, in place (no float64 copy)
        v = np.asarray(img).astype(np.uint32)
        v *= 510
        v += 65535
        v //= 131070
        return Image.fromarray(v.astype(np.uint8), mode="L").convert("RGB")
    if mode == "I":
        v = np.asarray(img).astype(np.int64)
        if value_range is None or value_range[1] > 255:
            v *= 510
            v += 65535
            v //= 131070
        np.clip(v, 0, 255, out=v)
        return Image.fromarray(v.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = value_range if value_range is not None else (float(arr.min()), float(arr.max()))
        arr = np.zeros_like(arr) if hi <= lo else np.clip((arr - lo) / (hi - lo) * 255.0, 0, 255)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (Pillow handles Adobe inverted CMYK JPEGs on load), YCbCr, L, 1, LAB, HSV
    return img.convert("RGB")


def to_rgb(img: Image.Image, *, value_range: tuple[float, float] | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white.

    16-bit grey maps ``v -> round(v / 65535 * 255)``; 32-bit ``I`` the same unless its maximum
    is <= 255 (then it is clipped as is); ``F`` is stretched from its min..max. Every conversion
    is pointwise (``value_range`` carries the whole image's min/max for ``I``/``F``, see
    :func:`pixel_range`), so a crop converts exactly like the same region of the whole image.

    Memory: the RGB result plus one strip of at most :data:`STRIP_PIXELS` pixels at a time (no
    full-size float64 or RGBA copies).
    """
    if img.mode == "RGB":
        return img
    if value_range is None:
        value_range = pixel_range(img)
    w, h = img.size
    if w * h <= STRIP_PIXELS:
        return _strip_to_rgb(img, value_range)
    out = Image.new("RGB", (w, h))
    rows = max(1, STRIP_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        y1 = min(h, y + rows)
        out.paste(_strip_to_rgb(img.crop((0, y, w, y1)), value_range), (0, y))
    return out


def _read_bytes(data: bytes | BinaryIO | str | os.PathLike[str], limits: DecodeLimits,
                source: str | None) -> tuple[bytes, str]:
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
    return raw, source or "<upload>"


@contextmanager
def decode_errors(source: str, fmt: str = "image") -> Iterator[None]:
    """Map whatever Pillow (or a conversion) raises inside the block to :class:`ImageDecodeError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
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


def open_image(
    data: bytes | BinaryIO | str | os.PathLike[str],
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    source: str | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Validate and decode the first frame of an image, in the mode the file holds.

    The checks and errors are those of :func:`decode_image`; the result is *not* converted to
    RGB (use :func:`to_rgb`, or :meth:`models.preprocess.Preprocess.from_image`, which converts
    only the region the model sees).

    Cost: one decoded raster of the first frame (``w*h`` times Pillow's bytes per pixel: 4 for
    RGB/RGBA/CMYK/P-with-alpha after conversion, 2 for 16-bit grey, 1 for L/P), bounded by
    ``limits.max_pixels``; JPEGs with ``draft_size`` decode at a reduced DCT scale instead.
    Other frames of an animation are never read (not even counted), so a GIF with 400k frames
    costs what its first frame costs. An EXIF orientation other than 1 adds one copy of the raster.
    """
    raw, source = _read_bytes(data, limits, source)
    if len(raw) == 0:
        raise ImageDecodeError("empty", "file is empty", source)
    if len(raw) > limits.max_bytes:
        raise ImageDecodeError("too_large", f"over the limit of {limits.max_bytes} bytes", source)

    fmt = sniff_format(raw[:16])
    if fmt is None:
        other = _describe_other(raw[:1024])
        if other == "unknown":
            raise ImageDecodeError("undecodable", "not a recognised image (unknown content)", source)
        raise ImageDecodeError(
            "unsupported_format",
            f"format {other} is not allowed (allowed: JPEG, PNG, WebP, GIF)",
            source,
        )

    with decode_errors(source, fmt):
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
        jpeg = img.format in ("JPEG", "MPO")
        if not jpeg and limits.max_full_pixels is not None and w * h > limits.max_full_pixels:
            raise ImageDecodeError(
                "too_many_pixels", f"{w}x{h} = {w * h} pixels: a {img.format} is decoded at full size, and the "
                f"limit for that is {limits.max_full_pixels} pixels (send a JPEG or a smaller image)", source
            )
        if draft_size is not None and jpeg:
            # DCT-domain downscale: never below the requested size, so quality is kept.
            img.draft("RGB", draft_size)
        # An opened animation (GIF, WebP, MPO) is positioned on its first frame. Asking for
        # ``n_frames`` would walk every frame of a GIF, so it is never asked.
        img.load()
        # In place: without an orientation tag Pillow would otherwise return a full copy.
        ImageOps.exif_transpose(img, in_place=True)
        return img
    raise AssertionError("unreachable")  # pragma: no cover - decode_errors re-raises


def decode_image(
    data: bytes | BinaryIO | str | os.PathLike[str],
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    source: str | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode an image safely into an 8-bit RGB :class:`PIL.Image.Image` (the whole image).

    Args:
        data: encoded bytes, a binary file object, or a path.
        limits: byte, pixel and side limits.
        source: name used in error messages (defaults to the path or ``<upload>``).
        draft_size: if given, JPEGs may be decoded at a reduced scale (DCT scaling) no
            smaller than this ``(w, h)``; used where the exact full size is not needed.

    Returns:
        An RGB image with EXIF orientation applied.

    Cost: :func:`open_image`'s raster plus the full-size RGB result (4 bytes per pixel); use
    :meth:`models.preprocess.Preprocess.load` where only the model input is needed.

    Raises:
        ImageDecodeError: with ``code`` and a message naming ``source`` and the reason.
    """
    img = open_image(data, limits=limits, source=source, draft_size=draft_size)
    with decode_errors(source or "<upload>"):
        return to_rgb(img)
    raise AssertionError("unreachable")  # pragma: no cover
