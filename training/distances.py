"""Distances between embeddings, shared by the miners and the losses.

Two metrics, both "smaller is closer":

- ``"cosine"``: ``1 - <x̂, ŷ>`` on L2-normalised inputs, in ``[0, 2]``;
- ``"euclidean"``: ``||x - y||_2`` on the raw inputs (the model's outputs are already unit norm,
  so on them ``euclidean = sqrt(2 * cosine)`` and both rank neighbours identically).

The euclidean distance is made safe for autograd: ``d/ds sqrt(s)`` is infinite at ``s = 0``, so a
zero distance gets a zero gradient instead of ``inf * 0 = NaN``. Coincident embeddings (the
diagonal, duplicate images, a collapsed network) therefore never poison a training step.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from training.registry import DISTANCES as METRICS

Metric = Literal[METRICS]  # type: ignore[valid-type]

# In the backward of the square root d(sqrt(s))/ds = d / (2 d^2 + eps): exactly 0 at d = 0 and
# 1 / (2 d) to float precision for every d above ~1e-9.
_SQRT_GRAD_EPS = 1e-20


def check_metric(metric: str) -> Metric:
    """Return ``metric`` if it is a known distance, else raise ValueError naming the allowed set."""
    if metric not in METRICS:
        raise ValueError(f"unknown distance {metric!r}; allowed: {', '.join(METRICS)}")
    return metric  # type: ignore[return-value]


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(max(s, 0))`` whose gradient is 0 (not inf) where the result is 0.

    One custom op instead of clamp + sqrt + compare + where: on CPU ``torch.where`` over an
    (N, N) matrix costs ~10x an arithmetic op, and this runs every training step.
    """

    @staticmethod
    def forward(ctx, sq: Tensor) -> Tensor:  # type: ignore[override]
        out = sq.clamp_min(0.0).sqrt_()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        # grad * out / (2 out^2 + eps) in three passes (a plain expression takes ~4x longer on CPU).
        denom = torch.addcmul(torch.full((), _SQRT_GRAD_EPS, dtype=out.dtype, device=out.device), out, out, value=2.0)
        return torch.div(out, denom, out=denom).mul_(grad)


class _StraightThroughClamp(torch.autograd.Function):
    """``clamp(x, lo, hi)`` with an identity gradient: removes float rounding outside the range
    (e.g. ``1 - cos`` = -1e-7) without the cost or the dead gradient of a masked backward."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:  # type: ignore[override]
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad, None, None


def safe_sqrt(sq: Tensor) -> Tensor:
    """``sqrt(max(sq, 0))``, any shape; gradient exactly 0 where the result is 0, finite elsewhere."""
    return _SafeSqrt.apply(sq)


def pairwise_distances(x: Tensor, y: Tensor | None = None, *, metric: Metric = "euclidean") -> Tensor:
    """All distances between the rows of ``x`` and the rows of ``y``.

    Args:
        x: (N, D) float tensor.
        y: (M, D) float tensor, or None for ``y = x`` (then the diagonal is exactly 0).
        metric: ``"cosine"`` (``1 - cos``, inputs normalised inside, clamped to [0, 2] with a
            pass-through gradient) or ``"euclidean"`` (``||x - y||_2`` of the raw inputs, via one
            matmul ``|x|^2 + |y|^2 - 2 x.y``, clamped at 0 before the square root).

    Returns:
        (N, M) tensor of x's dtype, differentiable, with finite gradients everywhere (0 at zero
        euclidean distance).
    """
    check_metric(metric)
    if x.ndim != 2 or (y is not None and (y.ndim != 2 or y.shape[1] != x.shape[1])):
        raise ValueError(
            f"pairwise_distances expects x (N, D) and y (M, D); got {tuple(x.shape)} and "
            f"{None if y is None else tuple(y.shape)}"
        )
    same = y is None
    if metric == "cosine":
        xn = F.normalize(x, dim=1)
        yn = xn if same else F.normalize(y, dim=1)
        dist = _StraightThroughClamp.apply(1.0 - xn @ yn.T, 0.0, 2.0)
        if same:
            dist.diagonal().zero_()
        return dist
    y_ = x if same else y
    x_sq = (x * x).sum(dim=1)
    y_sq = x_sq if same else (y_ * y_).sum(dim=1)
    sq = torch.addmm(x_sq[:, None] + y_sq[None, :], x, y_.T, beta=1.0, alpha=-2.0)
    if same:
        sq.diagonal().zero_()
    return safe_sqrt(sq)


def gather_pairs(mat: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """``mat[i, j]`` for (T,) int64 index tensors -> (T,), differentiable.

    One flat ``index_select``: its backward is an ``index_add``, about 3x faster on CPU than the
    ``index_put`` behind advanced indexing for T ~ 1e6 (batch-all / semi-hard triplet counts).
    """
    return mat.reshape(-1).index_select(0, i * mat.shape[1] + j)


def paired_distances(x: Tensor, y: Tensor, *, metric: Metric = "euclidean") -> Tensor:
    """Row-wise distances ``d(x[i], y[i])``.

    Exact (no expanded form), used by the losses when only a few pairs are needed.

    Args:
        x, y: (T, D) float tensors. For ``"cosine"`` they must already be L2-normalised rows.
        metric: as in :func:`pairwise_distances`.

    Returns:
        (T,) tensor, differentiable, finite gradient at zero distance.
    """
    if metric == "cosine":
        return _StraightThroughClamp.apply(1.0 - (x * y).sum(dim=1), 0.0, 2.0)
    diff = x - y
    return safe_sqrt((diff * diff).sum(dim=1))
