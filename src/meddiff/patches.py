"""The one patch grid and the one stitcher.

Grid: patches of side ``size`` every ``stride`` pixels along an axis, the last one aligned to the border so every
pixel is covered (:func:`patch_starts`; 2D corners :func:`patch_grid`; boolean masks :func:`patch_masks`). Used by
the HDF5 patch writer (data), patched diffusion (pDDPM training and reconstruction) and the denoise protocol.

Stitcher: :class:`OverlapAverage` puts patches back on a canvas ``[N, C, H, W]``, averaging where patches overlap
(sum / count, pixels no patch covers = ``fill``). Patches come either as crops placed at a corner
(:meth:`OverlapAverage.add_patch`, file patches) or as full-size images with a patch mask
(:meth:`OverlapAverage.add_masked`, pDDPM reconstruction, batched on any device). :func:`stitch` /
:func:`stitch_volumes` stitch the patches of an HDF5 patch file by their ``(volume, slice, y, x)`` coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from meddiff.errors import ConfigError, DataError

__all__ = [
    "OverlapAverage",
    "grid_starts",
    "patch_grid",
    "patch_masks",
    "patch_starts",
    "stitch",
    "stitch_canvases",
    "stitch_volumes",
]


# ----------------------------------------------------------------------------------------------------------
# grid
# ----------------------------------------------------------------------------------------------------------
def patch_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Start offsets of patches of ``size`` every ``stride`` along ``length``, the last aligned to the edge.

    Returns int64 ``[K]``; patches ``[s, s + size)`` cover ``[0, length)`` completely. Empty if ``length < size``.

    Raises:
        ConfigError: ``stride < 1``.
    """
    if stride < 1:
        raise ConfigError(f"patch stride={stride} must be >= 1; use stride = patch_size for a tiling grid.")
    if length < size:
        return np.zeros(0, dtype=np.int64)
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return np.asarray(starts, dtype=np.int64)


def grid_starts(size: int, patch: int, stride: int) -> list[int]:
    """:func:`patch_starts` for an image that must hold at least one patch (ConfigError otherwise), as a list."""
    if patch > size:
        raise ConfigError(
            f"patch size {patch} is larger than the image ({size} px); set patch_size <= {size} "
            "(or null for whole-image diffusion)."
        )
    return [int(s) for s in patch_starts(size, patch, stride)]


def patch_grid(slice_shape: Sequence[int], size: int, stride: int) -> np.ndarray:
    """Top-left corners ``(y, x)`` int64 ``[K, 2]`` of the grid covering an image of ``slice_shape`` ``(H, W)``.

    Row-major: all ``x`` of the first ``y``, then the next ``y``. Empty if the image is smaller than a patch.
    """
    ys = patch_starts(int(slice_shape[0]), size, stride)
    xs = patch_starts(int(slice_shape[1]), size, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def patch_masks(
    height: int, width: int, patch_size: int | None, stride: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean masks of all patches of the grid, in :func:`patch_grid` order: ``[P, 1, H, W]``.

    ``patch_size=None`` means one "patch" covering the whole image (plain DDPM), so whole-image and patched
    diffusion share one code path. ``stride`` defaults to ``patch_size`` (a tiling).

    Raises:
        ConfigError: the patch is larger than the image, or ``stride < 1``.
    """
    if patch_size is None:
        return torch.ones(1, 1, height, width, dtype=torch.bool, device=device)
    stride = stride or patch_size
    grid_starts(height, patch_size, stride)  # the clear errors
    grid_starts(width, patch_size, stride)
    corners = patch_grid((height, width), patch_size, stride)
    masks = torch.zeros(len(corners), 1, height, width, dtype=torch.bool, device=device)
    for i, (y, x) in enumerate(corners.tolist()):
        masks[i, :, y : y + patch_size, x : x + patch_size] = True
    return masks


# ----------------------------------------------------------------------------------------------------------
# stitcher
# ----------------------------------------------------------------------------------------------------------
class OverlapAverage:
    """Accumulates patches on a canvas ``[N, C, H, W]`` and averages them where they overlap.

    ``sums [N, C, H, W]`` and ``counts [N, 1, H, W]`` (how many patches cover each pixel) are kept in ``dtype``
    on ``device``; :meth:`mean` is ``sums / counts`` where covered, ``fill`` elsewhere. Float64 sums make patches
    holding identical values in their overlaps reproduce the original image bit-exactly.
    """

    def __init__(self, n: int, channels: int, height: int, width: int, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> None:
        self.sums = torch.zeros(n, channels, height, width, dtype=dtype, device=device)
        self.counts = torch.zeros(n, 1, height, width, dtype=dtype, device=device)

    def add_masked(self, index: torch.Tensor, values: torch.Tensor, masks: torch.Tensor) -> None:
        """Add full-size patch estimates: ``values [n, C, H, W]`` counted where ``masks [n, 1, H, W]`` (bool) is
        true, onto canvas images ``index [n]`` (repeats allowed; batched with ``index_add_``)."""
        m = masks.to(self.sums.dtype)
        self.sums.index_add_(0, index, values * m)
        self.counts.index_add_(0, index, m)

    def add_patch(self, i: int, patch: torch.Tensor, y: int, x: int) -> None:
        """Add one crop ``patch [C, h, w]`` with its top-left corner at ``(y, x)`` of canvas image ``i``.

        Raises:
            DataError: the patch lies (partly) outside the canvas.
        """
        h, w = patch.shape[-2:]
        H, W = self.sums.shape[-2:]
        if y < 0 or x < 0 or y + h > H or x + w > W:
            raise DataError(f"patch at (y={y}, x={x}) of size {h}x{w} lies outside slice shape {(H, W)}")
        self.sums[i, :, y : y + h, x : x + w] += patch
        self.counts[i, :, y : y + h, x : x + w] += 1

    def covered(self) -> torch.Tensor:
        """Bool ``[N, 1, H, W]``: pixels at least one patch covers."""
        return self.counts > 0

    def mean(self, fill: float | None = None) -> torch.Tensor:
        """``[N, C, H, W]`` in ``dtype``: the average of the patches at each pixel; uncovered pixels are ``fill``
        (``None``: ``sums / max(counts, 1)``, i.e. 0 where nothing was added)."""
        avg = self.sums / self.counts.clamp_min(1)
        if fill is None:
            return avg
        return torch.where(self.counts > 0, avg, torch.full_like(avg, float(fill)))


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(x))


def stitch_canvases(
    patches: np.ndarray | torch.Tensor, coords: np.ndarray | torch.Tensor, slice_shape: Sequence[int] | np.ndarray
) -> dict[tuple[int, int], OverlapAverage]:
    """One float64 :class:`OverlapAverage` ``[1, C, H, W]`` per ``(volume, slice)`` holding its patches.

    ``patches`` ``[N, C, P, P]`` or ``[N, P, P]`` (numpy or torch; e.g. several images of each patch stacked on
    ``C``), ``coords`` ``[N, 4]`` rows ``(volume, slice, y, x)``, ``slice_shape`` ``(H, W)`` or ``[V, 2]`` per
    volume. Patches are added in input order.
    """
    p = _as_tensor(patches)
    c = _as_tensor(coords).to(torch.int64).numpy()
    if p.ndim == 3:
        p = p[:, None]
    if p.ndim != 4 or c.ndim != 2 or c.shape[1] != 4 or len(c) != len(p):
        raise DataError(f"patches {tuple(p.shape)} and coords {c.shape} must be [N, C, P, P] or [N, P, P] and [N, 4]")
    shapes = np.asarray(slice_shape, dtype=np.int64)
    out: dict[tuple[int, int], OverlapAverage] = {}
    for patch, (v, s, y, x) in zip(p, c.tolist()):
        key = (int(v), int(s))
        if key not in out:
            hw = shapes if shapes.ndim == 1 else shapes[v]
            out[key] = OverlapAverage(1, p.shape[1], int(hw[0]), int(hw[1]))
        out[key].add_patch(0, patch, y, x)
    return out


def stitch(
    patches: np.ndarray | torch.Tensor,
    coords: np.ndarray | torch.Tensor,
    slice_shape: Sequence[int] | np.ndarray,
    fill: float = -1.0,
) -> dict[tuple[int, int], np.ndarray]:
    """Put patches back into their slices, averaging where patches overlap.

    Args:
        patches: ``[N, 1, P, P]`` or ``[N, P, P]`` (numpy or torch).
        coords: ``[N, 4]`` rows ``(volume, slice, y, x)`` as in an HDF5 patch file.
        slice_shape: ``(H, W)`` shared by all slices, or ``[V, 2]`` per volume (indexed by ``coords[:, 0]``),
            e.g. the file's ``slice_shape`` dataset.
        fill: value of pixels no patch covers (e.g. after the background filter).

    Returns:
        ``{(volume, slice): float32 [H, W]}`` sorted by key. Sums are accumulated in float64 (one
        :class:`OverlapAverage` per slice), so patches holding identical values in their overlaps reproduce the
        original slice bit-exactly.
    """
    p = _as_tensor(patches)
    if p.ndim == 4 and p.shape[1] != 1:
        raise DataError(f"patches must be [N, 1, P, P] or [N, P, P], got {tuple(p.shape)}")
    canvases = stitch_canvases(p, coords, slice_shape)
    return {key: canvases[key].mean(fill)[0, 0].to(torch.float32).numpy() for key in sorted(canvases)}


def stitch_volumes(
    patches: np.ndarray | torch.Tensor,
    coords: np.ndarray | torch.Tensor,
    volume_shapes: Sequence[Sequence[int]] | np.ndarray,
    axis: int = 2,
    fill: float = -1.0,
) -> dict[int, np.ndarray]:
    """Stitch patches into whole volumes: ``{volume: float32 [X, Y, Z]}`` (slices without patches = ``fill``).

    ``volume_shapes`` is ``[V, 3]`` (the ``shape`` column of the file's ``volumes`` table); ``axis`` the
    slicing axis the file was written with (its ``settings['axis']``).
    """
    vshapes = np.asarray(volume_shapes, dtype=np.int64)
    if vshapes.ndim != 2 or vshapes.shape[1] != 3:
        raise DataError(f"volume_shapes must be [V, 3], got {vshapes.shape}")
    slice_shapes = np.delete(vshapes, axis, axis=1)
    slices = stitch(patches, coords, slice_shapes, fill=fill)
    vols: dict[int, np.ndarray] = {}
    for (v, s), sl in slices.items():
        if v not in vols:
            vols[v] = np.full(tuple(vshapes[v]), fill, dtype=np.float32)
        idx: list[Any] = [slice(None)] * 3
        idx[axis] = s
        vols[v][tuple(idx)] = sl
    return vols
