"""Random fields and poses shared by the MRI phantom writers (:mod:`.mri`, :mod:`.mr_heads`); numpy/scipy only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["smooth_noise", "yaw_matrix"]


def smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], sigma: float, mode: str = "reflect"
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field of ``shape`` smoothed with ``sigma`` voxels (float64).

    ``mode`` is the boundary rule of ``scipy.ndimage.gaussian_filter`` (``"reflect"`` for the ADNI phantoms,
    ``"wrap"`` for the generic heads; each writer keeps its own so its files stay identical for a seed).
    """
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(tuple(int(s) for s in shape)), sigma=sigma, mode=mode)
    return (f - f.mean()) / (f.std() + 1e-12)


def yaw_matrix(angle: float) -> np.ndarray:
    """``[3, 3]`` rotation by ``angle`` radians about the z (inferior-superior) axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
