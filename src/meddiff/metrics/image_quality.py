"""Image-quality metrics per image (denoising / reconstruction): PSNR, SSIM, MAE, VSI, MS-SSIM.

Images are ``[B, C, H, W]`` float; ``dynamic_range`` / ``data_range`` is their max - min (2.0 for the
``[-1, 1]`` batch contract) and is always passed explicitly to torchmetrics (its defaults are wrong for us).

Conventions (tested):
- PSNR of identical images is ``+inf`` (``10 log10(range^2 / 0)``), not a silent cap: an infinite value in a
  report flags a degenerate comparison. Pass ``max_psnr`` (e.g. 100.0) to clamp instead.
- With a ``mask``: MAE and PSNR use the mask pixels only; SSIM is the mean of the local SSIM map (computed on
  the whole image, so windows near the mask border see outside context) over the mask pixels. An image with
  an empty mask gets NaN for all three.
- VSI (``meddiff.metrics.vsi``, Zhang, Shen & Li 2014): ``image_scores`` scores every channel as a gray image
  (our channels are CT windows or MR, not colours) with the images taken to span ``[-dynamic_range / 2,
  dynamic_range / 2]`` (the ``[-1, 1]`` contract); with a mask its pooling runs over the mask pixels. 1 for
  identical images. For RGB images call ``meddiff.metrics.vsi.vsi`` directly.
- MS-SSIM: torchmetrics needs ``min(H, W) // (n - 1)**2 > kernel_size - 1`` for ``n`` scales, i.e. the
  default 5 scales need >= 176 px. ``ms_ssim`` uses the largest scale count that fits (``ms_ssim_scales``):
  5 at >= 176 px, 4 at 99..175 px (so 4 at 128 px), 3 at 44..98 px (3 at 96 and 64 px), and the first ``n``
  standard betas rescaled to the full betas' sum. Pass ``scales=`` to force a count (e.g. 3 to compare with
  work that used 3 at 128 px).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.vsi import vsi

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_images(gt: torch.Tensor, pred: torch.Tensor) -> None:
    if not isinstance(gt, torch.Tensor) or not isinstance(pred, torch.Tensor):
        raise DataError(
            f"gt and pred must be torch tensors, got {type(gt).__name__} and {type(pred).__name__}."
        )
    if gt.ndim != 4 or gt.shape != pred.shape:
        raise DataError(
            f"gt and pred must be [B, C, H, W] of the same shape; got gt {tuple(gt.shape)} and "
            f"pred {tuple(pred.shape)}."
        )


def _check_range(data_range: float) -> float:
    if not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ConfigError(f"dynamic_range/data_range={data_range!r} must be > 0 (2.0 for images in [-1, 1]).")
    return float(data_range)


def image_scores(
    gt: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor | None = None,
    dynamic_range: float = 2.0,
    max_psnr: float | None = None,
) -> dict[str, torch.Tensor]:
    """PSNR, SSIM, MAE and VSI of each image (the CDM4MI ``image_scores(gt, pred, mask, dynamic_range)`` API).

    Args:
        gt: reference images ``[B, C, H, W]`` (``H, W >= 6`` for the 11-px SSIM window).
        pred: estimates, same shape.
        mask: optional bool ``[B, 1, H, W]`` or ``[B, C, H, W]``: the pixels that count (see module docstring).
        dynamic_range: ``max - min`` of the images (2.0 for ``[-1, 1]``).
        max_psnr: optional cap in dB for PSNR (default: identical images give ``+inf``).

    Returns:
        ``{"psnr": [B] dB, "ssim": [B] in [-1, 1], "mae": [B] in [0, dynamic_range], "vsi": [B] in [0, 1]}``
        float tensors (VSI is NaN for an empty mask, like the others).
    """
    _check_images(gt, pred)
    dr = _check_range(dynamic_range)
    gt_f = gt.float() if not gt.is_floating_point() else gt
    pred_f = pred.to(gt_f.dtype)
    ssim_global, ssim_map = structural_similarity_index_measure(
        pred_f, gt_f, data_range=dr, reduction="none", return_full_image=True
    )
    if mask is None:
        psnr = peak_signal_noise_ratio(pred_f, gt_f, data_range=dr, reduction="none", dim=(1, 2, 3))
        mae = (pred_f - gt_f).abs().mean(dim=(1, 2, 3))
        ssim = ssim_global
    else:
        B = gt.shape[0]
        if (
            not isinstance(mask, torch.Tensor)
            or mask.ndim != 4
            or mask.shape[0] != B
            or mask.shape[2:] != gt.shape[2:]
            or mask.shape[1] not in (1, gt.shape[1])
        ):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise DataError(
                f"mask shape {shape} does not fit image shape {tuple(gt.shape)}; use [B, 1, H, W] or [B, C, H, W]."
            )
        m = (mask if mask.dtype == torch.bool else mask != 0).to(gt.device).expand_as(gt_f).to(gt_f.dtype)
        count = m.sum(dim=(1, 2, 3))
        diff = pred_f - gt_f
        nan = torch.full_like(count, float("nan"))
        safe = count.clamp_min(1)
        mse = (diff.pow(2) * m).sum(dim=(1, 2, 3)) / safe
        mae = torch.where(count > 0, (diff.abs() * m).sum(dim=(1, 2, 3)) / safe, nan)
        psnr = torch.where(count > 0, 10.0 * torch.log10(dr**2 / mse), nan)
        ssim = torch.where(count > 0, (ssim_map * m).sum(dim=(1, 2, 3)) / safe, nan)
    if max_psnr is not None:
        psnr = psnr.clamp(max=float(max_psnr))
    return {"psnr": psnr, "ssim": ssim, "mae": mae, "vsi": _vsi_gray(gt_f, pred_f, dr, mask)}


def _vsi_gray(gt: torch.Tensor, pred: torch.Tensor, dr: float, mask: torch.Tensor | None) -> torch.Tensor:
    """VSI per image, every channel as a gray image (NaN where ``mask`` is empty or images are under 3 px)."""
    if min(gt.shape[-2:]) < 3:
        return torch.full((gt.shape[0],), float("nan"), device=gt.device)
    m = None
    if mask is not None:
        m = (mask if mask.dtype == torch.bool else mask != 0).any(dim=1, keepdim=True)
    v = vsi(gt, pred, value_range=(-dr / 2.0, dr / 2.0), mask=m, rgb=False, backend="torch").to(gt.device)
    if m is not None:
        v = torch.where(m.flatten(1).any(dim=1), v, torch.full_like(v, float("nan")))
    return v


def ms_ssim_scales(height: int, width: int, kernel_size: int = 11, max_scales: int = 5) -> int:
    """Largest MS-SSIM scale count ``n <= max_scales`` that torchmetrics accepts for ``height x width``.

    Conditions: ``min(H, W) >= 2**n``, ``min(H, W) // max(1, n - 1)**2 > kernel_size - 1`` (torchmetrics'
    check) and ``min(H, W) // 2**(n - 1) >= kernel_size`` (a full window at the coarsest scale).
    Returns 0 when not even one scale fits.
    """
    side = min(int(height), int(width))
    for n in range(int(max_scales), 0, -1):
        if (
            side >= 2**n
            and side // max(1, n - 1) ** 2 > kernel_size - 1
            and side // 2 ** (n - 1) >= kernel_size
        ):
            return n
    return 0


def ms_ssim(
    gt: torch.Tensor,
    pred: torch.Tensor,
    data_range: float = 2.0,
    betas: tuple[float, ...] = MS_SSIM_BETAS,
    scales: int | None = None,
    kernel_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Multi-scale SSIM per image, with a scale count that fits the image size.

    Args:
        gt, pred: ``[B, C, H, W]``, same shape.
        data_range: ``max - min`` of the images (2.0 for ``[-1, 1]``).
        betas: per-scale exponents (finest first); the standard 5 by default.
        scales: number of scales to use (``<= len(betas)``); None = the largest that fits
            (``ms_ssim_scales``). When fewer than ``len(betas)`` the first ``scales`` betas are rescaled to sum
            to ``sum(betas)``.
        kernel_size, sigma: Gaussian window (11 and 1.5 are the standard).

    Returns:
        ``[B]`` MS-SSIM in ``[0, 1]`` (torchmetrics' ``normalize="relu"``); 1 for identical images.
    """
    _check_images(gt, pred)
    dr = _check_range(data_range)
    if len(betas) < 1 or any(b < 0 for b in betas):
        raise ConfigError(f"betas={betas!r} must be a non-empty sequence of non-negative exponents.")
    H, W = gt.shape[-2:]
    fit = ms_ssim_scales(H, W, kernel_size, len(betas))
    if scales is None:
        if fit == 0:
            raise DataError(
                f"{H}x{W} images are too small for MS-SSIM with kernel_size={kernel_size}; need >= {kernel_size} px."
            )
        scales = fit
    elif not isinstance(scales, int) or not 1 <= scales <= len(betas) or scales > fit:
        raise ConfigError(
            f"scales={scales!r} does not fit: {H}x{W} images with kernel_size={kernel_size} allow at most {fit} "
            f"scales (and betas has {len(betas)}); use scales=None to pick automatically."
        )
    used = tuple(float(b) for b in betas[:scales])
    if scales < len(betas):
        total = sum(used)
        used = tuple(b * sum(betas) / total for b in used) if total > 0 else used
    gt_f = gt.float() if not gt.is_floating_point() else gt
    return multiscale_structural_similarity_index_measure(
        pred.to(gt_f.dtype),
        gt_f,
        data_range=dr,
        betas=used,
        kernel_size=kernel_size,
        sigma=sigma,
        reduction="none",
    )
