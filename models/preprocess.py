"""The one eval preprocessing definition, built from a :class:`~models.card.ModelCard`.

Needs only PIL and numpy (no torch), so a serving install with ONNX Runtime alone uses the
exact same code as training-time evaluation and indexing.

Steps: resize the shorter side to ``card.resize_size`` (bilinear, antialiased), centre-crop
``card.image_size``, scale to [0, 1], normalise by mean/std, HWC -> CHW float32.

The resize and the crop are computed crop-first: only the source region under the centre crop is
resampled (Pillow's ``resize(box=...)``, the same filter taps as resizing the whole image), so an
8192x1 image costs a 112x112 resample, not a 1,048,576x128 one. Images in other modes than RGB are
resampled strip by strip over that region only (:meth:`Preprocess.from_image`): grey, 16-bit and
float in their own mode and converted to RGB on the output, alpha premultiplied and composited on
white on the output, other modes (palette, CMYK, ...) converted to RGB strip by strip first.

Decode bound per image (:meth:`Preprocess.load`, what the service runs per upload): the decoded
first-frame raster (at most ``max_pixels`` x 4 bytes for 8-bit colour, x 2 for 16-bit grey; JPEG
drafts decode at a reduced scale; the service caps PNG, WebP and GIF, which cannot, at
``max_full_pixels``, 4 MP by default: 16 MiB), plus strips of at most :data:`REGION_STRIP_PIXELS`
source pixels (a few MiB), plus the (S, S) output. Time is linear in the first frame's pixels
(inflate + one resample pass over the crop region) and independent of the aspect ratio and of
the number of animation frames.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image

from models.card import ModelCard
from models.decode import DEFAULT_LIMITS, DecodeLimits, decode_errors, open_image, pixel_range, to_rgb

#: Source pixels converted to RGB at once by the crop-first path (one strip at a time).
REGION_STRIP_PIXELS = 1 << 18

#: RGB images whose resized size is at most this many times ``resize_size``² are resized whole
#: then cropped (bit-exact with torchvision's eval transform); larger ones are resampled crop-first.
CROP_FIRST_FACTOR = 4

#: Pillow's bilinear filter support (in output pixels, scaled by the downscale factor).
_BILINEAR_SUPPORT = 1.0


#: Modes resampled as they are and converted to RGB after, on the (small) output: a pointwise
#: conversion after a linear resample differs from before it by rounding only (<= 1 level), and
#: it runs on c x c pixels instead of the whole source region (16-bit and float: 3-5x faster).
_RESAMPLE_NATIVE = frozenset({"L", "F", "I;16", "I;16B", "I;16L", "I;16N"})
#: Alpha modes are resampled premultiplied (Pillow's ``RGBa``/``La``), then composited on white on
#: the output: white + (colour - white) * alpha = premultiplied colour + 255 - alpha, linear in
#: the premultiplied values, so it commutes with the resample up to rounding.
_PREMULTIPLIED = {"RGBA": "RGBa", "LA": "La"}


def _resample_strip(strip: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float],
                    value_range: tuple[float, float] | None) -> Image.Image:
    """Bilinear resample of ``box`` of ``strip`` (any mode) to ``size``, as 8-bit RGB."""
    mode = strip.mode
    if mode in _RESAMPLE_NATIVE:
        small = strip.resize(size, Image.Resampling.BILINEAR, reducing_gap=None, box=box)
        return to_rgb(small, value_range=value_range)
    if mode in _PREMULTIPLIED:
        small = strip.convert(_PREMULTIPLIED[mode]).resize(size, Image.Resampling.BILINEAR, reducing_gap=None,
                                                           box=box)
        arr = np.asarray(small, dtype=np.int16)
        rgb = arr[..., :-1] + (255 - arr[..., -1:])
        if rgb.shape[-1] == 1:
            rgb = np.repeat(rgb, 3, axis=-1)
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    return to_rgb(strip, value_range=value_range).resize(size, Image.Resampling.BILINEAR, reducing_gap=None, box=box)


class Preprocess:
    """Callable eval transform: RGB PIL image -> (3, S, S) float32 array."""

    def __init__(self, card: ModelCard) -> None:
        self.resize_size = card.resize_size
        self.image_size = card.image_size
        self._mean = np.asarray(card.mean, dtype=np.float32).reshape(3, 1, 1)
        self._inv_std = (1.0 / np.asarray(card.std, dtype=np.float32)).reshape(3, 1, 1)

    def draft_size(self) -> tuple[int, int]:
        """Smallest decode size that keeps this transform exact enough (for JPEG draft)."""
        return (self.resize_size, self.resize_size)

    def resize(self, img: Image.Image) -> Image.Image:
        """Resize the shorter side to ``resize_size`` (bilinear, antialiased); RGB in, RGB out."""
        w, h = img.size
        s = self.resize_size
        if w <= h:
            nw, nh = s, max(s, round(h * s / w))
        else:
            nw, nh = max(s, round(w * s / h)), s
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
        return img

    def center_crop(self, img: Image.Image) -> Image.Image:
        """Centre-crop ``image_size`` x ``image_size`` from an image at least that large."""
        nw, nh = img.size
        c = self.image_size
        left = int(round((nw - c) / 2.0))
        top = int(round((nh - c) / 2.0))
        return img.crop((left, top, left + c, top + c))

    def geometry(self, w: int, h: int) -> tuple[int, int, int, int]:
        """``(nw, nh, left, top)``: the size :meth:`resize` gives a ``w`` x ``h`` image and the
        top-left corner of :meth:`center_crop` in it."""
        s = self.resize_size
        if w <= h:
            nw, nh = s, max(s, round(h * s / w))
        else:
            nw, nh = max(s, round(w * s / h)), s
        c = self.image_size
        return nw, nh, int(round((nw - c) / 2.0)), int(round((nh - c) / 2.0))

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """:meth:`resize` then :meth:`center_crop`, computed crop-first; any mode in, RGB out.

        RGB images whose resized size is at most :data:`CROP_FIRST_FACTOR` x ``resize_size``² (every
        aspect ratio up to 4:1) are resized whole then cropped, bit-exact with the old transform.
        Other images are resampled crop-first: equal to ``center_crop(resize(to_rgb(img)))`` within
        1/255 (the filter taps and weights are the same, but Pillow may run the two separable
        passes in the other order for the smaller output, which rounds its 8-bit intermediate
        differently). Either way the cost is bounded by the crop, not by the resized size.
        """
        w, h = img.size
        nw, nh, left, top = self.geometry(w, h)
        c = self.image_size
        if img.mode == "RGB" and nw * nh <= CROP_FIRST_FACTOR * self.resize_size ** 2:
            return self.center_crop(self.resize(img))
        if (nw, nh) == (w, h):  # nothing to resample: a plain crop
            region = img.crop((left, top, left + c, top + c))
            return region if region.mode == "RGB" else to_rgb(region, value_range=pixel_range(img))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
        if img.mode == "RGB":
            return img.resize((c, c), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
        return self._resize_crop_converting(img, box, sx, sy, pixel_range(img))

    def _resize_crop_converting(self, img: Image.Image, box: tuple[float, float, float, float],
                                sx: float, sy: float, value_range: tuple[float, float] | None) -> Image.Image:
        """Resample ``box`` of a non-RGB image to (c, c) RGB, converting only the source rows and
        columns the bilinear taps touch, one strip of output rows at a time."""
        w, h = img.size
        c = self.image_size
        # The taps of output pixel i span centre +- support (+0.5 for Pillow's rounding); one more
        # pixel of margin keeps every tap inside the converted region, so the weights are the same
        # as resampling the whole image.
        mx = _BILINEAR_SUPPORT * max(sx, 1.0) + 2.0
        my = _BILINEAR_SUPPORT * max(sy, 1.0) + 2.0
        x0 = max(0, int(math.floor(box[0] - mx)))
        x1 = min(w, int(math.ceil(box[2] + mx)))
        region_w = x1 - x0
        src_rows = max(1, REGION_STRIP_PIXELS // max(region_w, 1))
        out_rows = max(1, int((src_rows - 2 * my) / max(sy, 1e-9)))
        out = Image.new("RGB", (c, c))
        for j0 in range(0, c, out_rows):
            j1 = min(c, j0 + out_rows)
            by0 = box[1] + j0 * sy
            by1 = box[1] + j1 * sy
            y0 = max(0, int(math.floor(by0 - my)))
            y1 = min(h, int(math.ceil(by1 + my)))
            part = _resample_strip(img.crop((x0, y0, x1, y1)), (c, j1 - j0),
                                   (box[0] - x0, by0 - y0, box[2] - x0, by1 - y0), value_range)
            out.paste(part, (0, j0))
        return out

    def from_image(self, img: Image.Image) -> np.ndarray:
        """A decoded image in any Pillow mode (from :func:`models.decode.open_image`) ->
        (3, S, S) float32 normalised array; only the cropped region is converted and resampled."""
        return self.to_array(self.resize_crop(img))

    def load(self, data: bytes | BinaryIO | str | os.PathLike[str], *, limits: DecodeLimits = DEFAULT_LIMITS,
             source: str | None = None, jpeg_draft: bool = True) -> np.ndarray:
        """Encoded image -> (3, S, S) float32 model input, with the decode bound of this module.

        Raises:
            models.ImageDecodeError: refused or undecodable (the checks of :func:`models.decode_image`).
        """
        img = open_image(data, limits=limits, source=source,
                         draft_size=self.draft_size() if jpeg_draft else None)
        with decode_errors(source or "<upload>"):
            return self.from_image(img)
        raise AssertionError("unreachable")  # pragma: no cover

    def to_array(self, img: Image.Image) -> np.ndarray:
        """Normalise an ``image_size``-square RGB image -> (3, S, S) float32."""
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * (1.0 / 255.0)
        return ((arr - self._mean) * self._inv_std).astype(np.float32, copy=False)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> (3, S, S) float32 normalised array."""
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image (use models.decode_image), got mode {img.mode}")
        return self.to_array(self.resize_crop(img))

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """List of RGB images -> (N, 3, S, S) float32."""
        if not images:
            return np.zeros((0, 3, self.image_size, self.image_size), dtype=np.float32)
        return np.stack([self(im) for im in images])
