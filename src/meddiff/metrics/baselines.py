"""Trivial baselines reported beside every model (DESIGN: "a trivial baseline is always reported").

- Image level: the mean intensity of the image (inside the brain mask if given). Bright lesions (e.g. acute
  hemorrhage in a brain window, FLAIR hyperintensities) raise it, so a model that does not beat it has learnt
  nothing beyond brightness.
- Pixel level: the intensity itself as the anomaly map, rescaled from ``[-1, 1]`` to ``[0, 1]``; thresholding
  it is the literature's "intensity thresholding" baseline for hyperintense lesions.
"""

from __future__ import annotations

import torch

from meddiff.errors import DataError


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"images must be a [B, C, H, W] tensor in [-1, 1]; got {shape}.")


def mean_intensity_score(
    images: torch.Tensor, mask: torch.Tensor | None = None, empty_value: float = -1.0
) -> torch.Tensor:
    """Mean intensity per image over channels and the pixels inside ``mask``.

    Args:
        images: ``[B, C, H, W]`` in ``[-1, 1]``.
        mask: optional bool ``[B, 1, H, W]`` or ``[B, C, H, W]`` region (e.g. the brain mask).
        empty_value: score of an image whose mask is empty; -1.0 (black, the least anomalous score, as
            ``meddiff.anomaly.image_scores`` gives such images its lowest score 0) so metrics stay defined;
            pass ``float("nan")`` to spot and drop them instead.

    Returns:
        ``[B]`` float scores in ``[-1, 1]``.
    """
    _check_images(images)
    x = images.float() if not images.is_floating_point() else images
    if mask is None:
        return x.mean(dim=(1, 2, 3))
    if (
        not isinstance(mask, torch.Tensor)
        or mask.ndim != 4
        or mask.shape[0] != x.shape[0]
        or mask.shape[2:] != x.shape[2:]
        or mask.shape[1] not in (1, x.shape[1])
    ):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DataError(f"mask shape {shape} does not fit images shape {tuple(x.shape)}; use [B, 1, H, W].")
    m = (mask if mask.dtype == torch.bool else mask != 0).to(x.device).expand_as(x).to(x.dtype)
    count = m.sum(dim=(1, 2, 3))
    mean = (x * m).sum(dim=(1, 2, 3)) / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, float(empty_value)))


def intensity_map(images: torch.Tensor) -> torch.Tensor:
    """Pixel baseline map: channel-mean intensity mapped from ``[-1, 1]`` to ``[0, 1]`` (clamped).

    Args:
        images: ``[B, C, H, W]`` in ``[-1, 1]``.

    Returns:
        ``[B, 1, H, W]`` float in ``[0, 1]`` (brighter = more anomalous).
    """
    _check_images(images)
    x = images.float() if not images.is_floating_point() else images
    return ((x.mean(dim=1, keepdim=True) + 1.0) * 0.5).clamp(0.0, 1.0)
