"""Classical denoisers the denoise protocol reports beside the diffusion model: BM3D, and a noise-level estimate.

BM3D (Dabov et al. 2007; the ``bm3d`` package of Mäkinen, Azzari & Foi) is an OPTIONAL extra: its licence allows
non-commercial use only, so meddiff does not depend on it. Install it with ``pip install meddiff[denoise]`` (or
``pip install bm3d``); ``available()`` says whether it imports, and ``bm3d_denoise`` raises a ``ConfigError`` naming
the extra when it does not. Protocols report BM3D as absent rather than fail.

Units: images in ``[-1, 1]`` and ``sigma`` as a standard deviation in the same units (the ``noise_std`` of the
denoising data). BM3D runs on ``(x + 1) / 2`` with ``sigma / 2`` (the same image in ``[0, 1]``) and the result is
mapped back and clipped to ``[-1, 1]``. Measured cost: 1.4-2 s per 64 x 64 slice on one core of a busy 2-core
machine, ~90x non-local means (``bench/bench_bm3d.py``).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np

from meddiff.errors import ConfigError, DataError

EXTRA = "denoise"
_MISSING = (
    "BM3D needs the optional extra `bm3d`, which is not installed: `pip install meddiff[denoise]` (or "
    "`pip install bm3d`; its licence allows non-commercial use only)."
)


def available() -> bool:
    """True when the optional ``bm3d`` package is installed."""
    return importlib.util.find_spec("bm3d") is not None


def _check_image(noisy: np.ndarray, name: str = "noisy") -> np.ndarray:
    arr = np.asarray(noisy)
    if arr.ndim != 2:
        raise DataError(f"{name} must be one 2D slice [H, W] in [-1, 1]; got shape {arr.shape}.")
    if min(arr.shape) < 8:
        raise DataError(f"{name} of shape {arr.shape} is too small for BM3D (blocks of 8 px); use >= 8 x 8.")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DataError(f"{name} contains NaN/inf values.")
    return arr


# Daubechies-2 (4-tap) high-pass decomposition filter: smoother than Haar, so less image texture leaks into the
# finest detail band (the same wavelet skimage's estimator uses).
_S3 = 3.0**0.5
_DB2_LOW = np.array([1 + _S3, 3 + _S3, 3 - _S3, 1 - _S3]) / (4 * 2.0**0.5)
_DB2_HIGH = np.array([(-1) ** k * _DB2_LOW[3 - k] for k in range(4)])


def estimate_sigma(noisy: np.ndarray) -> float:
    """Noise standard deviation of a slice ``[H, W]`` (same units), when the level is unknown.

    Donoho's estimator: sigma = median(|HH|) / 0.6745, with ``HH`` the finest diagonal db2 wavelet coefficients
    (the orthonormal high-pass filter along rows and columns, every second sample), where white noise of std sigma
    keeps std sigma. Pure numpy/scipy on purpose: skimage's version needs PyWavelets, which a clean install does not
    have. Robust to edges; biased upward on strongly textured images.
    """
    from scipy.ndimage import correlate1d

    arr = _check_image(noisy)
    hh = correlate1d(correlate1d(arr, _DB2_HIGH, axis=0, mode="reflect"), _DB2_HIGH, axis=1, mode="reflect")
    return float(np.median(np.abs(hh[1::2, 1::2])) / 0.6745)


def bm3d_denoise(noisy: np.ndarray, sigma: float | None = None, profile: str = "np") -> np.ndarray:
    """BM3D estimate of one noisy slice.

    Args:
        noisy: ``[H, W]`` float in ``[-1, 1]`` (``H, W >= 8``).
        sigma: noise standard deviation in the same units (e.g. the data's ``noise_std``); None = ``estimate_sigma``.
        profile: the ``bm3d`` profile (``"np"`` normal, ``"refilter"``, ``"vn"`` very noisy, ``"high"``).

    Returns:
        ``[H, W]`` float32 in ``[-1, 1]``.
    """
    arr = _check_image(noisy)
    s = estimate_sigma(arr) if sigma is None else float(sigma)
    if not math.isfinite(s) or s < 0:
        raise ConfigError(f"sigma={sigma!r} must be a finite noise std >= 0 in [-1, 1] units (e.g. 0.1).")
    if not available():
        raise ConfigError(_MISSING)
    if s == 0:
        return np.clip(arr, -1.0, 1.0).astype(np.float32)
    import bm3d

    out = bm3d.bm3d((arr + 1.0) / 2.0, sigma_psd=s / 2.0, profile=profile)
    return np.clip(np.asarray(out) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def bm3d_denoise_batch(noisy: np.ndarray, sigma: float | None = None, profile: str = "np") -> np.ndarray:
    """``bm3d_denoise`` of each slice of ``noisy [N, C, H, W]`` (as ``nlm_denoise`` of the denoise protocol).

    ``sigma`` None estimates each slice's level separately. Returns ``[N, C, H, W]`` float32 in ``[-1, 1]``.
    """
    arr = np.asarray(noisy)
    if arr.ndim != 4:
        raise DataError(f"noisy must be [N, C, H, W] in [-1, 1]; got shape {arr.shape}.")
    if not available():
        raise ConfigError(_MISSING)
    out = np.empty(arr.shape, dtype=np.float32)
    for i in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            out[i, c] = bm3d_denoise(arr[i, c], sigma, profile)
    return out
