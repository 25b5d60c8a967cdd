"""Pixel-wise anomaly maps: how far a healthy reconstruction is from its input.

Inputs are images ``[B, C, H, W]`` in ``[-1, 1]`` (the batch contract). Every map is ``[B, 1, H, W]`` float,
averaged over channels, larger = more anomalous:

- ``"l1"``:   ``|x - recon|``,        values in ``[0, 2]``;
- ``"l2"``:   ``(x - recon) ** 2``,   values in ``[0, 4]``;
- ``"ssim"``: ``1 - SSIM_local(x, recon)`` computed with ``data_range = 2``, values in ``[0, 2]`` (local SSIM
  lies in ``[-1, 1]``; identical images give 0).

The local SSIM uses the population statistics of Wang et al. (2004), ``K1 = 0.01``, ``K2 = 0.03``, a
normalised window (Gaussian, sigma 1.5 by default, or uniform) and reflect padding so the map has the input's
size. With the defaults (``ssim_window=11``, Gaussian, sigma 1.5) the map is the same as torchmetrics'
``structural_similarity_index_measure(..., return_full_image=True)``; tests check this.

Sign (``sign=``): ``"abs"`` keeps both directions (the maps above); ``"positive"`` keeps only pixels where the
input is brighter than its reconstruction (``x - recon > 0``: hyperintense lesions, the l1 map becomes
``clip(x - recon, 0)``), ``"negative"`` only darker ones (hypointense lesions). Which sign fits a task is a
post-processing choice made on validation like the median size (``eval.sign``); the value ranges stay the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meddiff.errors import ConfigError, DataError

MAP_KINDS = ("l1", "l2", "ssim")
MAP_SIGNS = ("abs", "positive", "negative")
SSIM_KERNELS = ("gaussian", "uniform")


def _check_pair(x: torch.Tensor, recon: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(recon, torch.Tensor):
        raise DataError(
            f"anomaly_map needs torch tensors, got {type(x).__name__} and {type(recon).__name__}; "
            "convert with torch.as_tensor."
        )
    if x.ndim != 4:
        raise DataError(f"images must be [B, C, H, W]; got x with shape {tuple(x.shape)}.")
    if x.shape != recon.shape:
        raise DataError(
            f"x and recon must have the same shape; got x {tuple(x.shape)} and recon {tuple(recon.shape)}."
        )


def _window_1d(
    size: int, kernel: str, sigma: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Normalised 1D window of odd ``size`` (Gaussian with ``sigma`` or uniform)."""
    if kernel == "uniform":
        w = torch.ones(size, dtype=dtype, device=device)
    else:
        r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
        w = torch.exp(-0.5 * (r / sigma) ** 2)
    return w / w.sum()


def local_ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 2.0,
    window: int = 11,
    kernel: str = "gaussian",
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-pixel SSIM of two image batches.

    Args:
        a, b: ``[B, C, H, W]`` float tensors of the same shape (any value range; say it in ``data_range``).
        data_range: max - min of the images (2 for ``[-1, 1]``).
        window: odd window side in pixels (``3 <= window``, and ``window // 2 < min(H, W)``).
        kernel: ``"gaussian"`` (with ``sigma``) or ``"uniform"``.

    Returns:
        ``[B, C, H, W]`` local SSIM in ``[-1, 1]`` (1 where ``a == b``).
    """
    _check_pair(a, b)
    if kernel not in SSIM_KERNELS:
        raise ConfigError(f"unknown SSIM kernel {kernel!r}; choose one of {list(SSIM_KERNELS)}.")
    if not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ConfigError(f"SSIM window={window!r} must be an odd integer >= 3 (e.g. 7 or 11).")
    if data_range <= 0:
        raise ConfigError(f"data_range={data_range} must be > 0 (2.0 for images in [-1, 1]).")
    pad = window // 2
    H, W = a.shape[-2:]
    if pad >= min(H, W):
        raise ConfigError(
            f"SSIM window={window} is too large for {H}x{W} images; use a window <= {2 * min(H, W) - 1}."
        )
    B, C = a.shape[:2]
    dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    a = a.to(dtype)
    b = b.to(dtype)
    w1 = _window_1d(window, kernel, sigma, dtype, a.device)
    # One depthwise convolution over the five statistics of every channel (the 2D window is the outer
    # product of the 1D one; on CPU a depthwise 2D kernel is faster than two 1-channel separable passes).
    groups = 5 * C
    win2d = torch.outer(w1, w1).expand(groups, 1, window, window).contiguous()
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=1)  # [B, 5C, H, W]
    stack = F.pad(stack, (pad, pad, pad, pad), mode="reflect")
    stats = F.conv2d(stack, win2d, groups=groups).reshape(B, 5, C, H, W)
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.unbind(1)

    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = (e_aa - mu_aa).clamp_min(0.0)
    var_b = (e_bb - mu_bb).clamp_min(0.0)
    cov = e_ab - mu_ab
    return ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))


def anomaly_map(
    x: torch.Tensor,
    recon: torch.Tensor,
    kind: str = "l1",
    ssim_window: int = 11,
    ssim_kernel: str = "gaussian",
    ssim_sigma: float = 1.5,
    sign: str = "abs",
) -> torch.Tensor:
    """Anomaly map of inputs against their healthy reconstructions.

    Args:
        x: input images ``[B, C, H, W]`` in ``[-1, 1]``.
        recon: healthy reconstructions, same shape and range.
        kind: ``"l1"`` | ``"l2"`` | ``"ssim"`` (see the module docstring for each one's value range).
        ssim_window, ssim_kernel, ssim_sigma: local window for ``kind="ssim"`` (ignored otherwise).
        sign: ``"abs"`` | ``"positive"`` (only where ``x > recon``) | ``"negative"`` (only where ``x < recon``).

    Returns:
        ``[B, 1, H, W]`` float map (channel mean), non-negative, larger = more anomalous.

    Raises:
        ConfigError: unknown ``kind`` or ``sign``, or a bad SSIM window.
        DataError: ``x`` and ``recon`` differ in shape or are not 4D.
    """
    if kind not in MAP_KINDS:
        raise ConfigError(f"unknown anomaly map kind {kind!r}; choose one of {list(MAP_KINDS)}.")
    if sign not in MAP_SIGNS:
        raise ConfigError(f"unknown anomaly map sign {sign!r}; choose one of {list(MAP_SIGNS)} (eval.sign).")
    _check_pair(x, recon)
    if kind == "l1":
        m = (x - recon).abs()
    elif kind == "l2":
        m = (x - recon).pow(2)
    else:
        m = 1.0 - local_ssim(
            x, recon, data_range=2.0, window=ssim_window, kernel=ssim_kernel, sigma=ssim_sigma
        )
    if sign != "abs":  # keep one direction of the residual (per channel, before the channel mean)
        diff = x - recon
        m = m * (diff > 0 if sign == "positive" else diff < 0)
    return m.mean(dim=1, keepdim=True)
