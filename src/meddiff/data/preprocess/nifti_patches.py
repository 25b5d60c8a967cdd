"""The NIfTI -> HDF5 patch pipeline: NIfTI volumes (a file, a folder or a list) normalised, sliced along one axis
and cut into 2D patches on :func:`meddiff.patches.patch_grid`, written into one file of the format
:mod:`meddiff.data.formats.patch_hdf5` (which also reads and inspects it).

Volumes that fail (unreadable, constant, no patch with enough foreground) are skipped, logged and recorded in the
file's ``skipped`` attribute; the file is written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from meddiff.data.formats.nifti import foreground_percentiles, is_nifti, load_volume, robust_normalise
from meddiff.data.formats.patch_hdf5 import FORMAT, FORMAT_VERSION
from meddiff.errors import ConfigError, DataError
from meddiff.patches import patch_grid
from meddiff.utils.io import atomic_write, remove_stale_tmp

__all__ = ["SkippedVolumeWarning", "collect_inputs", "save_as_hdf5"]

log = logging.getLogger(__name__)

_SLICE_BLOCK = 16  # slices extracted and written at once (bounds memory for big volumes)

IntensitySpec = str | tuple[float, float] | Sequence[float]


class SkippedVolumeWarning(UserWarning):
    """Some volumes of a batch conversion were skipped (the warning lists file and reason)."""


def collect_inputs(inputpath: str | Path | Iterable[str | Path]) -> list[tuple[Path, str]]:
    """Expand a file, a folder (searched recursively for ``.nii``/``.nii.gz``) or a list of them.

    Returns ``[(path, name)]`` in a stable order; ``name`` is the file name, or the path relative to the input
    folder (or to the common parent when names would clash) so that names are unique.

    Raises:
        DataError: a path does not exist, or no NIfTI file was found.
    """
    items = [inputpath] if isinstance(inputpath, (str, Path)) else list(inputpath)
    if not items:
        raise DataError("no input given; pass a NIfTI file, a folder of them or a list")
    found: list[tuple[Path, Path]] = []  # (file, base folder for naming)
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and is_nifti(f))
            if not files:
                raise DataError(f"folder {str(p)!r} contains no .nii/.nii.gz files")
            found.extend((f, p) for f in files)
        elif p.is_file():
            found.append((p, p.parent))
        else:
            raise DataError(f"input {str(p)!r} does not exist; pass a NIfTI file, a folder of them or a list")
    names = [f.relative_to(base).as_posix() for f, base in found]
    if len(set(names)) != len(names):
        common = Path(os.path.commonpath([str(f.resolve().parent) for f, _ in found]))
        names = [f.resolve().relative_to(common).as_posix() for f, _ in found]
    seen: set[str] = set()
    out: list[tuple[Path, str]] = []
    for (f, _), n in zip(found, names):
        if n in seen:  # the very same file listed twice
            continue
        seen.add(n)
        out.append((f, n))
    return out


def _sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse_intensity(intensity: IntensitySpec) -> str | tuple[float, float]:
    if isinstance(intensity, str):
        key = intensity.strip().lower()
        if key in ("robust", "minmax", "none"):
            return key
        raise ConfigError(
            f"intensity={intensity!r} is not one of 'robust', 'minmax', 'none' or a (low, high) window"
        )
    try:
        lo, hi = (float(v) for v in intensity)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"intensity={intensity!r} must be 'robust', 'minmax', 'none' or (low, high)"
        ) from exc
    if not hi > lo:
        raise ConfigError(f"intensity window {intensity!r} needs low < high")
    return (lo, hi)


def _normalise(
    vol: np.ndarray, intensity: str | tuple[float, float], percentiles: tuple[float, float]
) -> tuple[np.ndarray, tuple[float, float]]:
    """Map a volume to ``[-1, 1]``; returns (float32 volume, (source value at -1, source value at +1))."""
    if intensity == "robust":
        rng = foreground_percentiles(vol, None, *percentiles)
        return robust_normalise(vol, None, *percentiles), (rng if rng is not None else (0.0, 0.0))
    if intensity == "none":
        return np.clip(vol, -1.0, 1.0).astype(np.float32), (-1.0, 1.0)
    if intensity == "minmax":
        lo, hi = float(vol.min()), float(vol.max())
    else:
        lo, hi = intensity  # type: ignore[misc]
    if not hi > lo:
        return np.full(vol.shape, -1.0, dtype=np.float32), (lo, hi)
    out = (np.clip(vol.astype(np.float64), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    return np.clip(out, -1.0, 1.0).astype(np.float32), (lo, hi)


def _extract(
    vol_s: np.ndarray, grid: np.ndarray, size: int, min_foreground: float, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Patches of a block of slices ``[S, H, W]`` -> (``[n, P, P]``, ``[n, 3]`` (slice, y, x) within the block)."""
    win = np.lib.stride_tricks.sliding_window_view(
        vol_s, (size, size), axis=(1, 2)
    )  # [S, H-P+1, W-P+1, P, P]
    p = win[:, grid[:, 0], grid[:, 1]]  # [S, K, P, P] (copy)
    S, K = p.shape[:2]
    p = p.reshape(S * K, size, size)
    sl = np.repeat(np.arange(S), K)
    yx = np.tile(grid, (S, 1))
    if min_foreground > 0:
        keep = (p > threshold).mean(axis=(1, 2)) >= min_foreground
        p, sl, yx = p[keep], sl[keep], yx[keep]
    return p, np.concatenate([sl[:, None], yx], axis=1)


# what nibabel raises on a truncated or corrupt file, depending on where the short read happens: EOFError
# (truncated gzip stream), zlib.error / OSError (corrupt gzip, I/O), ValueError ("not enough data in file" of a short
# uncompressed .nii; DataError is a ValueError too)
_READ_ERRORS: tuple[type[BaseException], ...] = (ValueError, EOFError, OSError, zlib.error)


def _read_volume(
    path: Path, canonical: bool, frame: int, nan_policy: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_volume`, with every read failure (any dimensionality) a :class:`DataError` naming the file."""
    try:
        return load_volume(path, canonical=canonical, frame=frame, nan_policy=nan_policy)  # type: ignore[arg-type]
    except ConfigError:
        raise
    except DataError as exc:
        if str(path) in str(exc) or path.name in str(exc):
            raise
        raise DataError(f"{str(path)!r}: {exc}") from exc
    except _READ_ERRORS as exc:
        raise DataError(
            f"cannot read NIfTI file {str(path)!r} ({type(exc).__name__}: {exc}); the file is truncated or "
            "corrupt; copy it again or remove it"
        ) from exc


def _constant_reason(vol: np.ndarray, norm: np.ndarray, intensity: str | tuple[float, float],
                     rng: tuple[float, float]) -> str | None:
    """Why a volume carries no image (every voxel equal before or after normalisation), or None if it does."""
    lo, hi = float(vol.min()), float(vol.max())
    if lo == hi:
        return f"constant volume (every voxel is {lo:g}); it would become patches of one value; check the file"
    if float(norm.min()) == float(norm.max()):
        return (
            f"intensity={intensity!r} maps every voxel to {float(norm.min()):+g} (volume values {lo:g}..{hi:g}, "
            f"window {rng[0]:g}..{rng[1]:g}); choose another intensity setting or check the file"
        )
    return None


def save_as_hdf5(
    inputpath: str | Path | Sequence[str | Path],
    datasetname: str,
    targetdir: str | Path,
    image_size: int = 64,
    stride: int = 32,
    axis: int = 2,
    min_foreground: float = 0.0,
    intensity: IntensitySpec = "robust",
    *,
    percentiles: tuple[float, float] = (1.0, 99.0),
    foreground_threshold: float = -0.95,
    dtype: Literal["float32", "float16"] = "float32",
    canonical: bool = True,
    frame: int = 0,
    nan_policy: Literal["raise", "zero"] = "raise",
    compression: str | None = None,
    filename: str | None = None,
    progress: bool = True,
    skip_bad: bool = True,
) -> Path:
    """Cut NIfTI volumes into 2D patches and write them to one HDF5 file (the seed's API, extended).

    Each volume is loaded (canonical RAS orientation, 4D -> ``frame``), normalised to ``[-1, 1]`` and sliced
    along ``axis``; every slice is covered by a ``image_size``-px patch grid with step ``stride`` whose last
    patch is aligned to the border (:func:`meddiff.patches.patch_grid`). The file is written atomically
    (:func:`meddiff.utils.io.atomic_write`: a temporary name, renamed at the end); temporary files that killed
    conversions left in ``targetdir`` are removed first (:func:`meddiff.utils.io.remove_stale_tmp`, logged).

    Args:
        inputpath: a ``.nii``/``.nii.gz`` file, a folder (searched recursively) or a list of files/folders.
        datasetname: prefix of the output name ``<datasetname>_p<image_size>_s<stride>.h5``.
        targetdir: output folder (created).
        image_size: patch side P in pixels.
        stride: grid step, ``1 <= stride <= image_size`` (borders are always covered).
        axis: voxel axis (0, 1, 2) of the canonical volume to slice along; 2 = axial for RAS.
        min_foreground: keep a patch only if at least this fraction of its pixels is foreground
            (normalised value > ``foreground_threshold``); 0 keeps all patches.
        intensity: ``"robust"`` (clip to ``percentiles`` of the foreground, default), ``"minmax"``,
            ``"none"`` (data already in [-1, 1]; clipped) or a fixed window ``(low, high)`` (e.g. CT HU).
        percentiles: (lower, upper) for ``"robust"``.
        dtype: storage type of ``patches``; float16 halves the file (stitching is then exact to float16).
        canonical, frame, nan_policy: passed to :func:`meddiff.data.formats.nifti.load_volume`.
        compression: h5py compression for ``patches`` (None, "gzip", "lzf").
        filename: override the output file name.
        progress: show a tqdm bar over volumes.
        skip_bad: skip a volume that fails to load (truncated / corrupt file of any dimensionality, 2D image,
            NaN voxels) and list it; False raises the :class:`DataError` naming the file instead.

    Returns:
        Path of the written file.

    Raises:
        ConfigError: invalid settings. DataError: no input; no volume could be converted (the reasons are
        listed); with ``skip_bad=False``, the first volume that fails to load. Volumes that load but carry no
        usable patches (constant, smaller than the patch, no foreground patch) are always skipped; every skip is
        logged as it happens, reported with a :class:`SkippedVolumeWarning` and kept in the file's ``skipped``
        attribute.
    """
    from tqdm.auto import tqdm

    image_size, stride, axis = int(image_size), int(stride), int(axis)
    if image_size < 1:
        raise ConfigError(f"image_size={image_size} must be >= 1")
    if not 1 <= stride <= image_size:
        raise ConfigError(
            f"stride={stride} must be between 1 and image_size={image_size} so the patches cover every pixel"
        )
    if axis not in (0, 1, 2):
        raise ConfigError(f"axis={axis} must be 0, 1 or 2")
    if not 0.0 <= float(min_foreground) <= 1.0:
        raise ConfigError(f"min_foreground={min_foreground} must be a fraction in [0, 1]")
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype={dtype!r} must be 'float32' or 'float16'")
    if nan_policy not in ("raise", "zero"):
        raise ConfigError(f"nan_policy={nan_policy!r} is not one of 'raise', 'zero'")
    if not re.fullmatch(r"[\w.\-]+", str(datasetname)):
        raise ConfigError(f"datasetname={datasetname!r} must be a plain name (letters, digits, _ . -)")
    intensity_p = _parse_intensity(intensity)
    percentiles = (float(percentiles[0]), float(percentiles[1]))
    if not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
        raise ConfigError(f"percentiles={percentiles} must satisfy 0 <= lower < upper <= 100")

    files = collect_inputs(inputpath)
    targetdir = Path(targetdir)
    targetdir.mkdir(parents=True, exist_ok=True)
    out = targetdir / (filename or f"{datasetname}_p{image_size}_s{stride}.h5")
    # a conversion killed with -9 leaves its hidden temporary (often hundreds of MB); clean up after dead ones
    stale = remove_stale_tmp(targetdir)
    if stale:
        log.warning("%s: removed %d temporary file(s) left by killed writers: %s", targetdir, len(stale),
                    ", ".join(t.name for t in stale))
    settings: dict[str, Any] = {
        "datasetname": str(datasetname),
        "image_size": image_size,
        "stride": stride,
        "axis": axis,
        "min_foreground": float(min_foreground),
        "foreground_threshold": float(foreground_threshold),
        "intensity": list(intensity_p) if isinstance(intensity_p, tuple) else intensity_p,
        "percentiles": list(percentiles),
        "dtype": dtype,
        "canonical": bool(canonical),
        "frame": int(frame),
        "nan_policy": nan_policy,
    }

    skipped: list[dict[str, str]] = []
    meta: list[dict[str, Any]] = []
    P = image_size
    n_total = 0
    vrange = [np.inf, -np.inf]  # min / max of the stored patches -> attribute value_range

    def _skip(name: str, reason: str) -> None:
        reason = " ".join(reason.split())  # one line per skip (nibabel messages contain newlines)
        log.warning("skipping %s: %s", name, reason)
        skipped.append({"file": name, "reason": reason})

    def _write(tmp: Path) -> None:  # filled in a temporary file, renamed over `out` by atomic_write
        nonlocal n_total
        with h5py.File(tmp, "w") as f:
            dpatch = f.create_dataset(
                "patches",
                shape=(0, 1, P, P),
                maxshape=(None, 1, P, P),
                chunks=(1, 1, P, P),
                dtype=dtype,
                compression=compression,
            )
            dcoord = f.create_dataset(
                "coords", shape=(0, 4), maxshape=(None, 4), chunks=(4096, 4), dtype=np.int32
            )
            bar = tqdm(files, desc=f"{datasetname}: volumes", unit="vol", disable=not progress)
            for path, name in bar:
                try:
                    vol, affine = _read_volume(path, canonical, frame, nan_policy)
                except DataError as exc:
                    if not skip_bad:
                        raise
                    _skip(name, str(exc))
                    continue
                vol_s = np.moveaxis(vol, axis, 0)  # [S, H, W]
                hw = vol_s.shape[1:]
                if hw[0] < P or hw[1] < P:
                    _skip(
                        name,
                        f"slice shape {tuple(hw)} (volume {vol.shape}, axis={axis}) is smaller than "
                        f"image_size={P}; use a smaller image_size or another axis",
                    )
                    continue
                norm, rng = _normalise(vol_s, intensity_p, percentiles)
                const = _constant_reason(vol_s, norm, intensity_p, rng)
                if const is not None:
                    _skip(name, const)
                    continue
                grid = patch_grid(hw, P, stride)
                v_idx = len(meta)
                n_vol = 0
                for s0 in range(0, norm.shape[0], _SLICE_BLOCK):
                    p, c = _extract(
                        norm[s0 : s0 + _SLICE_BLOCK],
                        grid,
                        P,
                        float(min_foreground),
                        float(foreground_threshold),
                    )
                    if not len(p):
                        continue
                    k = len(p)
                    dpatch.resize(n_total + k, axis=0)
                    dcoord.resize(n_total + k, axis=0)
                    stored = p[:, None].astype(dtype)
                    dpatch[n_total : n_total + k] = stored
                    vrange[0] = min(vrange[0], float(stored.min()))
                    vrange[1] = max(vrange[1], float(stored.max()))
                    c[:, 0] += s0
                    dcoord[n_total : n_total + k] = np.concatenate(
                        [np.full((k, 1), v_idx, dtype=np.int64), c], axis=1
                    ).astype(np.int32)
                    n_total += k
                    n_vol += k
                if n_vol == 0:
                    _skip(
                        name,
                        f"no patch has >= {min_foreground:.0%} foreground (> {foreground_threshold}); "
                        "lower min_foreground",
                    )
                    continue
                meta.append(
                    {
                        "name": name,
                        "sha256": _sha256(path),
                        "shape": vol.shape,
                        "slice_shape": hw,
                        "affine": affine,
                        "range": rng,
                        "n_patches": n_vol,
                    }
                )
                bar.set_postfix(patches=n_total)
            bar.close()

            if not meta:
                details = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped)
                raise DataError(f"no volume of {len(files)} could be converted to {P}px patches: {details}")

            vt = np.dtype(
                [
                    ("name", h5py.string_dtype()),
                    ("sha256", "S64"),
                    ("shape", "<i8", (3,)),
                    ("n_patches", "<i8"),
                ]
            )
            table = np.zeros(len(meta), dtype=vt)
            table["name"] = [m["name"] for m in meta]
            table["sha256"] = [m["sha256"].encode() for m in meta]
            table["shape"] = [m["shape"] for m in meta]
            table["n_patches"] = [m["n_patches"] for m in meta]
            f.create_dataset("volumes", data=table)
            f.create_dataset("slice_shape", data=np.asarray([m["slice_shape"] for m in meta], dtype=np.int32))
            f.create_dataset("affines", data=np.stack([m["affine"] for m in meta]).astype(np.float64))
            f.create_dataset("intensity_range", data=np.asarray([m["range"] for m in meta], dtype=np.float64))
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["settings"] = json.dumps(settings, sort_keys=True)
            for k in ("image_size", "stride", "axis"):
                f.attrs[k] = settings[k]
            f.attrs["skipped"] = json.dumps(skipped)
            f.attrs["n_volumes"] = len(meta)
            f.attrs["n_patches"] = n_total
            f.attrs["value_range"] = np.asarray(vrange, dtype=np.float64)
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    atomic_write(out, _write)

    if skipped:
        lines = "\n".join(f"  - {s['file']}: {s['reason']}" for s in skipped)
        msg = f"{out.name}: skipped {len(skipped)} of {len(files)} volumes:\n{lines}"
        log.warning(msg)
        warnings.warn(msg, SkippedVolumeWarning, stacklevel=2)
    log.info("wrote %s: %d patches from %d volumes", out, n_total, len(meta))
    return out
