"""NIfTI reading, robust intensity normalisation and synthetic brain-like phantoms.

Everything here works on numpy arrays ``[X, Y, Z]`` (voxel axes in RAS order after ``canonical=True``).
Errors on bad input are :class:`meddiff.errors.DataError` naming the file and saying how to fix it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from meddiff.errors import ConfigError, DataError

__all__ = [
    "NIFTI_SUFFIXES",
    "FrameWarning",
    "foreground_percentiles",
    "is_nifti",
    "load_volume",
    "robust_normalise",
    "write_synthetic_volumes",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


class FrameWarning(UserWarning):
    """A 4D file was reduced to one 3D frame."""


def is_nifti(path: str | Path) -> bool:
    """True if the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(
    path: str | Path,
    canonical: bool = True,
    frame: int = 0,
    nan_policy: Literal["raise", "zero"] = "raise",
) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume as float32.

    Args:
        path: ``.nii`` / ``.nii.gz`` file.
        canonical: reorient to the closest canonical (RAS+) orientation with ``nib.as_closest_canonical``
            so all volumes share one axis order and direction (axis 2 is then inferior→superior).
        frame: for 4D files (e.g. fMRI/EPI time series) the frame to keep; a :class:`FrameWarning` notes it.
            Trailing singleton dimensions (``[X, Y, Z, 1]``) are dropped silently.
        nan_policy: ``"raise"`` (default) raises :class:`DataError` on NaN/inf voxels;
            ``"zero"`` replaces them with 0.

    Returns:
        ``(volume, affine)``: ``volume`` float32 ``[X, Y, Z]`` in the file's (scaled) intensity units,
        ``affine`` float64 ``[4, 4]`` voxel→world matrix matching ``volume``'s axes.

    Raises:
        DataError: missing/unreadable file, a 2D image, more than 4 dims, frame out of range, NaN voxels.
    """
    import nibabel as nib

    path = Path(path)
    if nan_policy not in ("raise", "zero"):
        raise ConfigError(f"nan_policy={nan_policy!r} is not one of 'raise', 'zero'")
    if not path.is_file():
        raise DataError(f"NIfTI file {str(path)!r} does not exist; check the input path")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types (ImageFileError, EOFError, gzip errors)
        raise DataError(f"cannot read NIfTI file {str(path)!r}: {exc}; is it a valid .nii/.nii.gz?") from exc

    shape = tuple(int(s) for s in img.shape)
    # drop trailing singleton dims beyond the 3rd ([X,Y,Z,1] or [X,Y,Z,1,1])
    while len(shape) > 3 and shape[-1] == 1:
        img = img.slicer[(slice(None),) * (len(shape) - 1) + (0,)]
        shape = shape[:-1]
    if len(shape) == 4:
        n_frames = shape[3]
        if not -n_frames <= frame < n_frames:
            raise DataError(
                f"{str(path)!r} has {n_frames} frames (shape {shape}) but frame={frame} was requested; "
                f"choose 0..{n_frames - 1}"
            )
        warnings.warn(
            f"{path.name}: 4D file with {n_frames} frames (shape {shape}); using frame {frame % n_frames}",
            FrameWarning,
            stacklevel=2,
        )
        img = img.slicer[:, :, :, frame % n_frames]
        shape = shape[:3]
    if len(shape) > 4:
        raise DataError(f"{str(path)!r} has {len(shape)} dimensions (shape {shape}); expected a 3D volume")
    if len(shape) < 3 or sum(s > 1 for s in shape) < 3:
        raise DataError(
            f"{str(path)!r} is a 2D image (shape {shape}) but a 3D volume is expected; "
            "pass 3D NIfTI volumes (stack 2D slices into one volume first)"
        )

    if canonical:
        img = nib.as_closest_canonical(img)
    try:
        vol = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:  # truncated gzip stream, short data block
        raise DataError(
            f"cannot read the voxel data of {str(path)!r}: {exc}; the file may be truncated"
        ) from exc
    affine = np.asarray(img.affine, dtype=np.float64)

    bad = ~np.isfinite(vol)
    n_bad = int(bad.sum())
    if n_bad:
        if nan_policy == "raise":
            raise DataError(
                f"{str(path)!r} has {n_bad} NaN/inf voxels of {vol.size}; fix the file or pass nan_policy='zero' "
                "to replace them with 0"
            )
        vol = np.where(bad, np.float32(0.0), vol)
    return np.ascontiguousarray(vol), affine


def foreground_percentiles(
    vol: np.ndarray,
    mask: np.ndarray | None = None,
    lower: float = 1.0,
    upper: float = 99.0,
) -> tuple[float, float] | None:
    """The ``lower`` and ``upper`` percentiles of ``vol`` inside the foreground, or None if it is empty.

    The foreground is ``mask`` (bool, ``vol``'s shape) or, by default, the voxels above the volume's minimum.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ConfigError(f"percentiles lower={lower}, upper={upper} must satisfy 0 <= lower < upper <= 100")
    vol = np.asarray(vol)
    if mask is None:
        mask = vol > vol.min() if vol.size else np.zeros(vol.shape, bool)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != vol.shape:
            raise DataError(f"mask shape {mask.shape} does not match volume shape {vol.shape}")
    fg = vol[mask]
    if fg.size == 0:
        return None
    lo, hi = np.percentile(fg.astype(np.float64), [lower, upper])
    return float(lo), float(hi)


def robust_normalise(
    vol: np.ndarray,
    mask: np.ndarray | None = None,
    lower: float = 1.0,
    upper: float = 99.0,
) -> np.ndarray:
    """Clip to the ``[lower, upper]`` percentiles of the foreground and scale linearly to ``[-1, 1]``.

    Args:
        vol: float array of any shape (typically ``[X, Y, Z]``).
        mask: bool array of ``vol``'s shape marking the foreground (e.g. a brain mask). Default: voxels above
            the volume's minimum (background at the minimum, as in skull-stripped MR or air-padded CT).
        lower, upper: percentiles in ``[0, 100]``, ``lower < upper``.

    Returns:
        float32 array of ``vol``'s shape in ``[-1, 1]``: the ``lower`` percentile maps to -1, ``upper`` to +1.
        A constant volume (or empty foreground) maps to -1 everywhere.
    """
    vol = np.asarray(vol, dtype=np.float32)
    rng = foreground_percentiles(vol, mask, lower, upper)
    if rng is None or not rng[1] > rng[0]:
        return np.full(vol.shape, -1.0, dtype=np.float32)
    lo, hi = rng
    out = (np.clip(vol.astype(np.float64), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field ``shape`` smoothed with ``sigma`` voxels."""
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def write_synthetic_volumes(
    directory: str | Path,
    n: int = 4,
    shape: tuple[int, int, int] = (96, 96, 32),
    seed: int = 0,
    prefix: str = "phantom",
    voxel_size: float = 2.0,
) -> list[Path]:
    """Write ``n`` brain-like MR phantoms as ``<directory>/<prefix>_<i:03d>.nii.gz`` (for demos and tests).

    Each phantom is an ellipsoid head: a bright scalp/skull shell, CSF, grey matter cortex, white matter core,
    two ventricles, with a smooth multiplicative bias field and low-frequency tissue texture. Size, position
    and rotation vary per volume. Intensities are MR-like (background 0, white matter ≈ 700) stored as float32
    with a RAS affine of ``voxel_size`` mm.

    Args:
        directory: output folder (created).
        n: number of volumes (>= 1).
        shape: ``(X, Y, Z)`` voxels, each >= 4.
        seed: RNG seed; the same seed writes identical files.

    Returns:
        The written paths, sorted.
    """
    import nibabel as nib

    if n < 1:
        raise ConfigError(f"n={n} must be >= 1")
    if len(shape) != 3 or min(shape) < 4:
        raise ConfigError(f"shape={tuple(shape)} must be three sizes >= 4")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    X, Y, Z = (int(s) for s in shape)
    grid = np.stack(
        np.meshgrid(
            np.linspace(-1, 1, X, dtype=np.float64),
            np.linspace(-1, 1, Y, dtype=np.float64),
            np.linspace(-1, 1, Z, dtype=np.float64),
            indexing="ij",
        ),
        axis=-1,
    )  # [X, Y, Z, 3]
    paths: list[Path] = []
    for i in range(n):
        radii = np.array([0.78, 0.9, 1.1]) * rng.uniform(0.9, 1.05, size=3)
        centre = rng.uniform(-0.05, 0.05, size=3) * np.array([1, 1, 0.3])
        ang = rng.uniform(-0.2, 0.2)
        rot = np.array([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]])
        p = (grid - centre) @ rot.T
        r = np.sqrt(((p / radii) ** 2).sum(-1))  # 1 at the scalp surface
        # ventricles: two small ellipsoids left/right of the midline
        v_off = rng.uniform(0.1, 0.16)
        v_rad = np.array([0.08, 0.28, 0.25]) * rng.uniform(0.8, 1.3)
        vent = np.zeros(r.shape, dtype=bool)
        for side in (-1.0, 1.0):
            q = (p - np.array([side * v_off, 0.02, 0.0])) / v_rad
            vent |= (q**2).sum(-1) < 1.0
        tex = _smooth_noise(rng, shape, sigma=max(1.0, min(shape) / 24))
        wobble = 0.03 * _smooth_noise(rng, shape, sigma=max(2.0, min(shape) / 6))
        rr = r + wobble  # irregular cortex boundary
        vol = np.zeros(shape, dtype=np.float64)
        vol[rr < 1.0] = 900.0  # scalp / skull
        vol[rr < 0.92] = 60.0  # CSF / skull gap
        vol[rr < 0.88] = 450.0 + 25.0 * tex[rr < 0.88]  # grey matter
        vol[rr < 0.7] = 700.0 + 20.0 * tex[rr < 0.7]  # white matter
        vol[vent & (rr < 0.7)] = 80.0  # ventricles (CSF)
        bias = 1.0 + 0.08 * _smooth_noise(rng, shape, sigma=max(3.0, min(shape) / 3))
        vol = np.clip(vol * bias, 0.0, None).astype(np.float32)
        affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
        affine[:3, 3] = -np.array(shape) * voxel_size / 2
        out = directory / f"{prefix}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), str(out))
        paths.append(out)
    return sorted(paths)
