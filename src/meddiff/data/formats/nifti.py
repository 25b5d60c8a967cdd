"""NIfTI format: reading 3D volumes, robust intensity normalisation, file-name rules.

Phantoms written as NIfTI files live in :mod:`meddiff.data.synthetic.mri`.

Everything here works on numpy arrays ``[X, Y, Z]`` (voxel axes in RAS order after ``canonical=True``).
Errors on bad input are :class:`meddiff.errors.DataError` naming the file and saying how to fix it.
"""

from __future__ import annotations

import re
import warnings
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
    "strip_nifti_suffix",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


class FrameWarning(UserWarning):
    """A 4D file was reduced to one 3D frame."""


def is_nifti(path: str | Path) -> bool:
    """True if the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``name`` without a trailing ``.nii`` / ``.nii.gz`` (case-insensitive), e.g. ``cn/cn0.nii.gz`` -> ``cn/cn0``."""
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


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
