"""The one eval preprocessing definition, built from a :class:`~models.card.ModelCard`.

Needs only PIL and numpy (no torch), so a serving install with ONNX Runtime alone uses the
exact same code as training-time evaluation and indexing.

Steps: resize the shorter side to ``card.resize_size`` (bilinear, antialiased), centre-crop
``card.image_size``, scale to [0, 1], normalise by mean/std, HWC -> CHW float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from models.card import ModelCard


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

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """:meth:`resize` then :meth:`center_crop`."""
        return self.center_crop(self.resize(img))

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
