"""NIfTI format: reading 3D volumes, robust intensity normalisation, file-name rules.

Phantoms written as NIfTI files live in :mod:`meddiff.data.synthetic.mri`.

Everything here works on numpy arrays ``[X, Y, Z]`` (voxel axes in RAS order after ``canonical=True``).
Errors on bad input are :class:`meddiff.errors.DataError` naming the file and saying how to fix it.
"""

from __future__ import annotations

import gzip
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from meddiff.errors import ConfigError, DataError

__all__ = [
    "NIFTI_SUFFIXES",
    "ConstantVolumeWarning",
    "FrameWarning",
    "constant_reason",
    "foreground_percentiles",
    "is_nifti",
    "load_volume",
    "robust_normalise",
    "strip_nifti_suffix",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


class FrameWarning(UserWarning):
    """A 4D file was reduced to one 3D frame."""


class ConstantVolumeWarning(UserWarning):
    """Normalisation met a volume (or foreground) without intensity range; it became -1 everywhere."""


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged NIfTI raises, depending on where the short read happens: ``EOFError`` (truncated
    gzip stream), ``zlib.error`` / ``OSError`` (corrupt gzip, I/O; ``gzip.BadGzipFile`` is an ``OSError``),
    ``ValueError`` (a short uncompressed ``.nii``), ``struct.error`` and nibabel's header/file errors."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from nibabel.wrapstruct import WrapStructError

    return (EOFError, OSError, zlib.error, ValueError, struct.error, ImageFileError, HeaderDataError,
            WrapStructError)


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
    check_complete: bool = True,
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
        check_complete: first check that a single-file NIfTI holds all the voxel bytes its header promises
            (``.nii.gz``: the whole gzip stream is decompressed once more, which also checks its CRC; costs about
            one extra decompression), so a file truncated or corrupted anywhere, even after the frame used, is a
            :class:`DataError`.

    Returns:
        ``(volume, affine)``: ``volume`` float32 ``[X, Y, Z]`` in the file's (scaled) intensity units,
        ``affine`` float64 ``[4, 4]`` voxel→world matrix matching ``volume``'s axes.

    Raises:
        DataError: naming the file, for a missing, unreadable, truncated or corrupt file (any dimensionality),
            a 2D image, more than 4 dims, a frame out of range, NaN voxels.
    """
    import nibabel as nib

    path = Path(path)
    if nan_policy not in ("raise", "zero"):
        raise ConfigError(f"nan_policy={nan_policy!r} is not one of 'raise', 'zero'")
    if not path.is_file():
        raise DataError(f"NIfTI file {str(path)!r} does not exist; check the input path")
    try:
        img = nib.load(str(path))
    except _read_errors() as exc:
        raise DataError(
            f"cannot read NIfTI file {str(path)!r} ({type(exc).__name__}: {exc}); is it a valid .nii/.nii.gz? "
            "(a truncated or corrupt copy fails like this too)"
        ) from exc

    # shape checks on the header alone, before any voxel is read
    shape = tuple(int(s) for s in img.shape)
    n_singleton = 0
    while len(shape) > 3 and shape[-1] == 1:  # trailing singleton dims beyond the 3rd ([X,Y,Z,1], [X,Y,Z,1,1])
        shape = shape[:-1]
        n_singleton += 1
    if len(shape) > 4:
        raise DataError(f"{str(path)!r} has {len(shape)} dimensions (shape {shape}); expected a 3D volume")
    if len(shape) < 3 or sum(s > 1 for s in shape[:3]) < 3:
        raise DataError(
            f"{str(path)!r} is a 2D image (shape {shape}) but a 3D volume is expected; "
            "pass 3D NIfTI volumes (stack 2D slices into one volume first)"
        )
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

    # voxel reads (slicing a 4D proxy reads the frame); the completeness check first, so damage anywhere in the
    # file fails here (nibabel reads only the bytes it needs: a 4D file cut after frame 0 would load frame 0)
    try:
        if check_complete:
            _check_complete(path, img)
        for _ in range(n_singleton):
            img = img.slicer[(slice(None),) * (len(img.shape) - 1) + (0,)]
        if len(shape) == 4:
            img = img.slicer[:, :, :, frame % shape[3]]
        if canonical:
            img = nib.as_closest_canonical(img)
        vol = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except DataError:  # a ValueError too: already names the file
        raise
    except _read_errors() as exc:
        raise DataError(
            f"cannot read the voxel data of {str(path)!r} ({type(exc).__name__}: {exc}); the file is truncated "
            "or corrupt: copy it again or remove it"
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


def _check_complete(path: Path, img: object) -> None:
    """Raise :class:`DataError` if a single-file NIfTI (``.nii``/``.nii.gz``) is shorter than its header says.

    A ``.gz`` file is decompressed to its end (1 MiB at a time): a cut stream raises ``EOFError``, a damaged one
    ``BadGzipFile`` (CRC or length mismatch) or ``zlib.error``; the caller turns those into a ``DataError``.
    """
    import nibabel as nib

    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return  # NIfTI pairs and other formats: nibabel's own read errors are all we have
    hdr = img.header
    need = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape())) * hdr.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz"):
        have = 0
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                have += len(chunk)
    else:
        have = path.stat().st_size
    if have < need:
        raise DataError(
            f"NIfTI file {str(path)!r} is truncated: its header needs {need} bytes (shape "
            f"{tuple(int(s) for s in hdr.get_data_shape())}, {hdr.get_data_dtype()}), the file holds {have}; "
            "copy it again or remove it"
        )


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


def constant_reason(
    vol: np.ndarray,
    mask: np.ndarray | None = None,
    lower: float = 1.0,
    upper: float = 99.0,
) -> str | None:
    """Why :func:`robust_normalise` cannot scale ``vol`` (no intensity range), or None if it can.

    Same arguments as :func:`robust_normalise`. Reasons: a constant volume, an empty foreground, or a foreground
    whose ``lower`` and ``upper`` percentiles coincide (e.g. a binary mask).
    """
    vol = np.asarray(vol)
    if vol.size == 0:
        return "empty volume"
    lo, hi = float(vol.min()), float(vol.max())
    if not hi > lo:
        return f"constant volume (every voxel is {lo:g})"
    rng = foreground_percentiles(vol, mask, lower, upper)
    if rng is None:
        return "empty foreground (the mask selects no voxel)"
    if not rng[1] > rng[0]:
        return (
            f"no intensity range in the foreground: its {lower:g}th and {upper:g}th percentiles are both "
            f"{rng[0]:g} (values {lo:g}..{hi:g})"
        )
    return None


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
        A volume without intensity range there (constant volume, empty or one-valued foreground) maps to -1
        everywhere, with a :class:`ConstantVolumeWarning` (never a silent division by zero); callers that must
        not use such a volume check :func:`constant_reason` first.
    """
    vol = np.asarray(vol, dtype=np.float32)
    rng = foreground_percentiles(vol, mask, lower, upper)
    if rng is None or not rng[1] > rng[0]:
        warnings.warn(
            f"robust_normalise: {constant_reason(vol, mask, lower, upper)}; every voxel set to -1",
            ConstantVolumeWarning,
            stacklevel=2,
        )
        return np.full(vol.shape, -1.0, dtype=np.float32)
    lo, hi = rng
    out = (np.clip(vol.astype(np.float64), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    return np.clip(out, -1.0, 1.0).astype(np.float32)
