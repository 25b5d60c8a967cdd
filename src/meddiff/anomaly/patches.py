"""Patch grids for patched diffusion (pDDPM): where the noised patches sit on an image."""

from __future__ import annotations

import torch

from meddiff.errors import ConfigError


def grid_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last patch is aligned to the border so every pixel is covered."""
    if patch > size:
        raise ConfigError(
            f"patch size {patch} is larger than the image ({size} px); set patch_size <= {size} "
            "(or null for whole-image diffusion)."
        )
    if stride < 1:
        raise ConfigError(f"patch stride={stride} must be >= 1; use stride = patch_size for a tiling grid.")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def patch_masks(
    height: int, width: int, patch_size: int | None, stride: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean masks of all patches of the grid: ``[P, 1, H, W]``.

    ``patch_size=None`` means one "patch" covering the whole image (plain DDPM), so whole-image and patched
    diffusion share one code path.
    """
    if patch_size is None:
        return torch.ones(1, 1, height, width, dtype=torch.bool, device=device)
    stride = stride or patch_size
    ys = grid_starts(height, patch_size, stride)
    xs = grid_starts(width, patch_size, stride)
    masks = torch.zeros(len(ys) * len(xs), 1, height, width, dtype=torch.bool, device=device)
    for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
        masks[i, :, y : y + patch_size, x : x + patch_size] = True
    return masks
