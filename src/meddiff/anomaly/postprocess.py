"""Post-processing of anomaly maps: median filtering, brain-mask erosion, masking, small-component removal.

Shapes: maps are ``[B, C, H, W]`` float (``C`` is 1 for anomaly maps); masks are bool ``[B, 1, H, W]`` (or
``[B, C, H, W]``). Every 2D operation works on each ``(image, channel)`` plane on its own. With
``volume=True`` the batch is read as one volume of consecutive slices ``[D, 1, H, W]`` and the operation is 3D
(pDDPM filters and labels whole volumes).

Borders: the median filter mirrors the image at its border (``reflect``, i.e. scipy's ``mode="mirror"``);
erosion treats pixels outside the image as background (scipy's default ``border_value=0``), so a mask that
touches the border is eroded from there too.

Typical pDDPM settings (see FIELD-NOTES): ``PostProcess(median_size=5, erode_iterations=round(W / 25),
min_component_size=8, volume=True)`` (components of <= 7 voxels removed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from meddiff.errors import ConfigError, DataError

_MAX_UNFOLD_ELEMENTS = 1 << 24  # transient memory bound of the 2D median filter (elements per chunk)


def check_4d(t: torch.Tensor, name: str) -> None:
    """``DataError`` unless ``t`` is a 4D tensor ``[B, C, H, W]``."""
    if not isinstance(t, torch.Tensor):
        raise DataError(
            f"{name} must be a torch tensor, got {type(t).__name__}; convert with torch.as_tensor."
        )
    if t.ndim != 4:
        raise DataError(f"{name} must be [B, C, H, W]; got shape {tuple(t.shape)}.")


def check_mask_for(maps: torch.Tensor, mask: torch.Tensor, mask_name: str = "mask") -> None:
    """``DataError`` unless ``mask`` is ``[B, 1, H, W]`` or ``[B, C, H, W]`` with the B, H, W of ``maps``."""
    check_4d(mask, mask_name)
    ok = (
        mask.shape[0] == maps.shape[0]
        and mask.shape[2:] == maps.shape[2:]
        and mask.shape[1] in (1, maps.shape[1])
    )
    if not ok:
        raise DataError(
            f"{mask_name} shape {tuple(mask.shape)} does not fit maps shape {tuple(maps.shape)}; "
            "it must be [B, 1, H, W] or [B, C, H, W] with the maps' B, H, W."
        )


def as_bool(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor (non-bool is read as ``!= 0``)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _is_count(value: object) -> bool:
    """An integer >= 0 (``True``/``False`` are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in (1, 2):
        raise ConfigError(
            f"connectivity={connectivity!r} must be 1 (edge neighbours, 4-/6-connected) or 2 (also diagonals)."
        )


def _check_odd_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size % 2 == 0:
        raise ConfigError(
            f"median filter size={size!r} must be an odd integer >= 1 (1 = no filtering, e.g. 5)."
        )


def median_filter(maps: torch.Tensor, size: int = 5, volume: bool = False) -> torch.Tensor:
    """Median filter of each map over a ``size x size`` window (``size x size x size`` with ``volume=True``).

    Args:
        maps: ``[B, C, H, W]`` float maps (any value range).
        size: odd window side; ``1`` returns an unchanged copy.
        volume: treat the batch as one volume ``[D, C, H, W]`` and filter in 3D (scipy, on CPU).

    Returns:
        Filtered maps, same shape, dtype and device. Memory: the 2D path works in chunks of at most
        ``2**24`` unfolded elements.
    """
    check_4d(maps, "maps")
    _check_odd_size(size)
    if size == 1:
        return maps.clone()
    B, C, H, W = maps.shape
    pad = size // 2
    if volume:
        arr = maps.detach().cpu().numpy()
        out = ndimage.median_filter(arr, size=(size, 1, size, size), mode="mirror")
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=maps.device, dtype=maps.dtype)
    if pad >= min(H, W):
        raise ConfigError(
            f"median filter size={size} is too large for {H}x{W} maps; use size <= {2 * min(H, W) - 1}."
        )
    work = maps if maps.is_floating_point() else maps.float()
    planes = F.pad(work.reshape(B * C, 1, H, W), (pad, pad, pad, pad), mode="reflect")
    chunk = max(1, _MAX_UNFOLD_ELEMENTS // (size * size * H * W))
    out = torch.empty(B * C, 1, H, W, dtype=work.dtype, device=maps.device)
    for i in range(0, B * C, chunk):
        cols = F.unfold(planes[i : i + chunk], kernel_size=size)  # [n, size*size, H*W]
        out[i : i + chunk] = cols.median(dim=1).values.view(-1, 1, H, W)
    return out.reshape(B, C, H, W).to(maps.dtype)


def erode_mask(
    mask: torch.Tensor, iterations: int = 1, connectivity: int = 1, volume: bool = False
) -> torch.Tensor:
    """Binary erosion, ``iterations`` times, with a 3x3 cross (``connectivity=1``) or square (``2``).

    Each iteration removes one pixel from every edge of a region (a ``s x s`` square becomes
    ``(s - 2k) x (s - 2k)`` after ``k`` iterations, with either connectivity). Pixels outside the image count
    as background.

    Args:
        mask: bool ``[B, C, H, W]`` (non-bool is read as ``!= 0``).
        iterations: ``>= 0``; 0 returns a copy.
        volume: erode the batch as one volume ``[D, C, H, W]`` in 3D (scipy, on CPU).

    Returns:
        bool tensor, same shape and device.
    """
    check_4d(mask, "mask")
    _check_connectivity(connectivity)
    if not _is_count(iterations):
        raise ConfigError(
            f"erosion iterations={iterations!r} must be an integer >= 0 (pDDPM uses about W/25)."
        )
    m = as_bool(mask)
    if iterations == 0:
        return m.clone()
    if volume:
        out = np.empty(m.shape, dtype=bool)
        struct = ndimage.generate_binary_structure(3, connectivity)
        arr = m.detach().cpu().numpy()
        for c in range(arr.shape[1]):
            out[:, c] = ndimage.binary_erosion(
                arr[:, c], structure=struct, iterations=iterations, border_value=0
            )
        return torch.from_numpy(out).to(mask.device)
    B, C, H, W = m.shape
    kernel = torch.ones(3, 3, device=m.device)
    if connectivity == 1:
        kernel[0, 0] = kernel[0, 2] = kernel[2, 0] = kernel[2, 2] = 0
    full = kernel.sum()
    kernel = kernel.view(1, 1, 3, 3)
    x = m.reshape(B * C, 1, H, W).float()
    for _ in range(iterations):
        x = (F.conv2d(x, kernel, padding=1) >= full - 0.5).float()
        if not x.any():
            break
    return x.bool().reshape(B, C, H, W)


def apply_mask(maps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Set maps to 0 outside ``mask``.

    Args:
        maps: ``[B, C, H, W]`` float.
        mask: bool ``[B, 1, H, W]`` or ``[B, C, H, W]``, or None (returns ``maps`` unchanged).

    Returns:
        ``[B, C, H, W]``: ``maps`` where ``mask``, else exactly 0 (also where ``maps`` is NaN).
    """
    check_4d(maps, "maps")
    if mask is None:
        return maps
    check_mask_for(maps, mask)
    m = as_bool(mask)
    return torch.where(m.to(maps.device), maps, torch.zeros((), dtype=maps.dtype, device=maps.device))


def remove_small_components(
    binary: torch.Tensor, min_size: int, connectivity: int = 1, volume: bool = False
) -> torch.Tensor:
    """Remove connected components with fewer than ``min_size`` pixels (``scipy.ndimage.label`` per image).

    ``min_size=8`` removes components of <= 7 pixels (pDDPM's rule). ``min_size <= 1`` keeps everything.

    Args:
        binary: bool ``[B, C, H, W]`` segmentation (non-bool is read as ``!= 0``).
        min_size: smallest component size kept, in pixels (voxels with ``volume=True``).
        connectivity: 1 (4-connected in 2D, 6 in 3D) or 2 (8-connected in 2D, 18 in 3D).
        volume: label the batch as one volume ``[D, C, H, W]`` in 3D.

    Returns:
        bool tensor, same shape and device.
    """
    check_4d(binary, "binary")
    _check_connectivity(connectivity)
    if not _is_count(min_size):
        raise ConfigError(
            f"min_size={min_size!r} must be an integer >= 0 (components smaller than it are removed)."
        )
    b = as_bool(binary)
    if min_size <= 1:
        return b.clone()
    arr = b.detach().cpu().numpy()
    out = np.zeros_like(arr)
    if volume:
        struct = ndimage.generate_binary_structure(3, connectivity)
        planes = [(slice(None), c) for c in range(arr.shape[1])]
    else:
        struct = ndimage.generate_binary_structure(2, connectivity)
        planes = [(i, c) for i in range(arr.shape[0]) for c in range(arr.shape[1])]
    for idx in planes:
        labels, n = ndimage.label(arr[idx], structure=struct)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_size
        keep[0] = False
        out[idx] = keep[labels]
    return torch.from_numpy(out).to(binary.device)


@dataclass
class PostProcess:
    """Composable post-processing of anomaly maps.

    ``pp(maps, brain_mask)`` erodes ``brain_mask`` (``erode_iterations``), zeroes the maps outside it, median
    filters them (``median_size``) and zeroes outside again (so filtering cannot leak signal out of the
    region). ``pp.region(brain_mask)`` is the eroded region to score inside; ``pp.binarize(maps, threshold)``
    thresholds (``>= threshold``) and drops components smaller than ``min_component_size``.

    Attributes:
        median_size: odd median window (1 = off).
        erode_iterations: brain-mask erosion iterations (0 = off); pDDPM uses about ``W / 25``.
        min_component_size: smallest component kept by ``binarize`` (0 or 1 = off; 8 = pDDPM's "<= 7 removed").
        connectivity: 1 or 2, for erosion and components.
        volume: treat each call's batch as one volume of consecutive slices (3D operations).
    """

    median_size: int = 1
    erode_iterations: int = 0
    min_component_size: int = 0
    connectivity: int = 1
    volume: bool = False

    def __post_init__(self) -> None:
        _check_odd_size(self.median_size)
        _check_connectivity(self.connectivity)
        for name in ("erode_iterations", "min_component_size"):
            v = getattr(self, name)
            if not _is_count(v):
                raise ConfigError(f"PostProcess.{name}={v!r} must be an integer >= 0.")

    def region(self, brain_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Eroded brain mask (bool ``[B, 1, H, W]``) or None when no mask is given."""
        if brain_mask is None:
            return None
        return erode_mask(brain_mask, self.erode_iterations, self.connectivity, volume=self.volume)

    def __call__(self, maps: torch.Tensor, brain_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Post-process ``maps [B, C, H, W]`` (optionally inside ``brain_mask``); returns the same shape."""
        check_4d(maps, "maps")
        if brain_mask is not None:
            check_mask_for(maps, brain_mask, "brain_mask")
        region = self.region(brain_mask)
        out = apply_mask(maps, region)
        out = median_filter(out, self.median_size, volume=self.volume)
        return apply_mask(out, region)

    def binarize(self, maps: torch.Tensor, threshold: float) -> torch.Tensor:
        """Segmentation ``maps >= threshold`` with small components removed; bool, same shape."""
        check_4d(maps, "maps")
        return remove_small_components(
            maps >= threshold, self.min_component_size, self.connectivity, volume=self.volume
        )
