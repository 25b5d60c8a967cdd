"""Synthetic "splotch" anomalies for MNIST (seed 001, Loevlie, Liang & Brockett).

Definition (for a 28x28 image ``X`` in ``[0, 1]``):

* centre ``(c_x, c_y) ~ U{6, 22}^2`` and base radius ``r ~ U{2, 5}`` (integers, bounds inclusive);
* ``n ~ U{3, 7}`` blobs, each with offsets ``dx_i, dy_i ~ U{-floor(r/2), floor(r/2)}`` and radius
  ``r_i ~ U{floor(r/2), r}``;
* ``M(x, y) = 1[ union_i  sqrt((x - c_x - dx_i)^2 + (y - c_y - dy_i)^2) <= r_i ]``;
* corrupted image ``X~ = (1 - M) * X + M`` (the splotch is white, value 1).

``x`` is the column index and ``y`` the row index, so the mask is indexed ``mask[y, x]``.

For ``size != 28`` every length of the definition (centre range and radii) is scaled by ``size / 28`` and
rounded, so a splotch keeps its size relative to the image; at ``size == 28`` the numbers are exactly the
seed's. (The MNIST DataModule draws at 28 and resizes image and mask together instead, see
``meddiff.data.modules.mnist_splotch``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from meddiff.errors import ConfigError, DataError

__all__ = ["SplotchParams", "sample_splotch_params", "render_splotch_mask", "make_splotch_mask", "apply_splotch"]

#: Seed constants at the reference size 28.
REF_SIZE = 28
CENTRE_RANGE = (6, 22)
BASE_RADIUS_RANGE = (2, 5)
N_BLOBS_RANGE = (3, 7)

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class SplotchParams:
    """The random draws of one splotch (pixel units of the image it was drawn for).

    ``offsets`` is int64 ``[n, 2]`` holding ``(dx_i, dy_i)``; ``radii`` is int64 ``[n]``.
    """

    cx: int
    cy: int
    r: int
    offsets: np.ndarray
    radii: np.ndarray

    @property
    def n(self) -> int:
        """Number of blobs."""
        return int(self.radii.shape[0])


def _scaled(v: int, size: int) -> int:
    return int(round(v * size / REF_SIZE))


def sample_splotch_params(rng: np.random.Generator, size: int = REF_SIZE) -> SplotchParams:
    """Draw the parameters of one splotch for a ``size x size`` image (see module docstring).

    Draw order (fixed, so seeds reproduce): ``cx, cy, r, n, offsets [n, 2], radii [n]``.
    """
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ConfigError(f"splotch size={size!r} is invalid: pass an integer image side >= 8 (the seed uses 28).")
    size = int(size)
    c_lo, c_hi = _scaled(CENTRE_RANGE[0], size), _scaled(CENTRE_RANGE[1], size)
    r_lo, r_hi = max(1, _scaled(BASE_RADIUS_RANGE[0], size)), max(1, _scaled(BASE_RADIUS_RANGE[1], size))
    cx = int(rng.integers(c_lo, c_hi + 1))
    cy = int(rng.integers(c_lo, c_hi + 1))
    r = int(rng.integers(r_lo, r_hi + 1))
    n = int(rng.integers(N_BLOBS_RANGE[0], N_BLOBS_RANGE[1] + 1))
    h = r // 2
    offsets = rng.integers(-h, h + 1, size=(n, 2)).astype(np.int64)
    radii = rng.integers(h, r + 1, size=n).astype(np.int64)
    return SplotchParams(cx=cx, cy=cy, r=r, offsets=offsets, radii=radii)


def render_splotch_mask(params: SplotchParams, size: int = REF_SIZE) -> np.ndarray:
    """Rasterise eq. (1): bool ``[size, size]``, True where some blob covers the pixel (``mask[y, x]``)."""
    ys, xs = np.ogrid[:size, :size]
    mask = np.zeros((size, size), dtype=bool)
    for (dx, dy), ri in zip(params.offsets.tolist(), params.radii.tolist()):
        d2 = (xs - params.cx - dx) ** 2 + (ys - params.cy - dy) ** 2
        mask |= d2 <= ri * ri  # sqrt(d2) <= r_i on integers, without float rounding
    return mask


def make_splotch_mask(rng: np.random.Generator, size: int = REF_SIZE) -> np.ndarray:
    """Sample one splotch mask, bool ``[size, size]`` (never empty: every blob covers its own centre pixel)."""
    return render_splotch_mask(sample_splotch_params(rng, size), size)


def apply_splotch(x01: ArrayT, mask: np.ndarray | torch.Tensor) -> ArrayT:
    """Return ``(1 - M) * X + M``: the image with the mask's pixels set to white.

    ``x01``: float image(s) in ``[0, 1]``, numpy or torch, shape ``[..., H, W]`` (e.g. ``[H, W]``, ``[C, H, W]``).
    ``mask``: bool (or {0, 1}) ``[H, W]`` or broadcastable to ``x01`` (e.g. ``[1, H, W]``).
    The result has the type, dtype and shape of ``x01`` and stays in ``[0, 1]``.
    """
    if tuple(mask.shape[-2:]) != tuple(x01.shape[-2:]):
        raise DataError(
            f"apply_splotch: mask shape {tuple(mask.shape)} does not match image shape {tuple(x01.shape)} in the "
            "last two (H, W) dims; draw the mask with size equal to the image side."
        )
    if isinstance(x01, torch.Tensor):
        if not x01.is_floating_point():
            raise DataError(
                f"apply_splotch expects a float image in [0, 1], got dtype {x01.dtype}; divide uint8 by 255."
            )
        m = torch.as_tensor(mask, device=x01.device).to(x01.dtype)
        return (1 - m) * x01 + m
    x = np.asarray(x01)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"apply_splotch expects a float image in [0, 1], got dtype {x.dtype}; divide uint8 by 255.")
    m = np.asarray(mask).astype(x.dtype)
    return (1 - m) * x + m
