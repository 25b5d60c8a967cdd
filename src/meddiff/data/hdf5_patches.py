"""2D patches of NIfTI volumes in one HDF5 file: writer, stitcher, Dataset and LightningDataModule.

File layout written by :func:`save_as_hdf5` (``<targetdir>/<datasetname>_p<P>_s<S>.h5``)::

    patches         float32|float16 [N, 1, P, P]   in [-1, 1], chunked one patch per chunk
    coords          int32 [N, 4]                   (volume, slice, y, x): row of ``volumes``, index along
                                                   ``axis``, top-left corner of the patch in the slice
    volumes         compound [V]                   name, sha256 of the source file, shape [3], n_patches
    slice_shape     int32 [V, 2]                   (H, W) of the slices of each volume
    affines         float64 [V, 4, 4]              voxel->world of the (canonical) volume
    intensity_range float64 [V, 2]                 source intensities mapped to -1 / +1
    attrs: format, format_version, settings (json), skipped (json list of {file, reason}), n_volumes, n_patches

Slice ``s`` of volume ``v`` is ``np.take(volume, s, axis)`` of the canonical (RAS) volume after intensity
normalisation, so ``stitch`` of all patches reproduces those slices exactly (float32 storage).

Batches follow ``docs/contracts.md``: ``image`` (clean) and ``cond`` (clean + Gaussian noise) ``[1, P, P]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from meddiff.data.loaders import SplitLoaders, dict_loader
from meddiff.data.nifti_io import (
    foreground_percentiles,
    is_nifti,
    load_volume,
    robust_normalise,
    write_synthetic_volumes,
)
from meddiff.errors import ConfigError, DataError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HDF5PatchDataModule",
    "PatchDataset",
    "PatchFileInfo",
    "SkippedVolumeWarning",
    "collect_inputs",
    "inspect_hdf5",
    "patch_grid",
    "patch_starts",
    "save_as_hdf5",
    "split_by_volume",
    "stitch",
    "stitch_volumes",
]

log = logging.getLogger(__name__)

FORMAT = "meddiff-hdf5-patches"
FORMAT_VERSION = 1
REQUIRED_DATASETS: tuple[str, ...] = ("patches", "coords", "volumes", "slice_shape")
REQUIRED_SETTINGS: tuple[str, ...] = ("image_size", "stride", "axis", "min_foreground", "intensity", "dtype")
_SLICE_BLOCK = 16  # slices extracted and written at once (bounds memory for big volumes)

IntensitySpec = str | tuple[float, float] | Sequence[float]


class SkippedVolumeWarning(UserWarning):
    """Some volumes of a batch conversion were skipped (the warning lists file and reason)."""


# ----------------------------------------------------------------------------------------------------------
# patch grid
# ----------------------------------------------------------------------------------------------------------
def patch_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Start offsets of patches of ``size`` every ``stride`` along ``length``, the last aligned to the edge.

    Returns int64 ``[K]``; patches ``[s, s + size)`` cover ``[0, length)`` completely. Empty if
    ``length < size``.
    """
    if length < size:
        return np.zeros(0, dtype=np.int64)
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return np.asarray(starts, dtype=np.int64)


def patch_grid(slice_shape: Sequence[int], size: int, stride: int) -> np.ndarray:
    """Top-left corners ``(y, x)`` int64 ``[K, 2]`` of the patch grid covering a slice of ``slice_shape``."""
    ys = patch_starts(int(slice_shape[0]), size, stride)
    xs = patch_starts(int(slice_shape[1]), size, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


# ----------------------------------------------------------------------------------------------------------
# stitching
# ----------------------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def stitch(
    patches: np.ndarray | torch.Tensor,
    coords: np.ndarray | torch.Tensor,
    slice_shape: Sequence[int] | np.ndarray,
    fill: float = -1.0,
) -> dict[tuple[int, int], np.ndarray]:
    """Put patches back into their slices, averaging where patches overlap.

    Args:
        patches: ``[N, 1, P, P]`` or ``[N, P, P]`` (numpy or torch).
        coords: ``[N, 4]`` rows ``(volume, slice, y, x)`` as written by :func:`save_as_hdf5`.
        slice_shape: ``(H, W)`` shared by all slices, or ``[V, 2]`` per volume (indexed by ``coords[:, 0]``),
            e.g. the file's ``slice_shape`` dataset.
        fill: value of pixels no patch covers (e.g. after the background filter).

    Returns:
        ``{(volume, slice): float32 [H, W]}`` sorted by key. Sums are accumulated in float64, so patches
        holding identical values in their overlaps reproduce the original slice bit-exactly.
    """
    p = _to_numpy(patches)
    c = _to_numpy(coords).astype(np.int64)
    if p.ndim == 4:
        if p.shape[1] != 1:
            raise DataError(f"patches must be [N, 1, P, P] or [N, P, P], got {p.shape}")
        p = p[:, 0]
    if p.ndim != 3 or c.ndim != 2 or c.shape[1] != 4 or len(c) != len(p):
        raise DataError(f"patches {p.shape} and coords {c.shape} must be [N, (1,) P, P] and [N, 4]")
    shapes = np.asarray(slice_shape, dtype=np.int64)
    P0, P1 = p.shape[1:]
    sums: dict[tuple[int, int], np.ndarray] = {}
    counts: dict[tuple[int, int], np.ndarray] = {}
    for patch, (v, s, y, x) in zip(p, c):
        key = (int(v), int(s))
        if key not in sums:
            hw = shapes if shapes.ndim == 1 else shapes[v]
            sums[key] = np.zeros((int(hw[0]), int(hw[1])), dtype=np.float64)
            counts[key] = np.zeros((int(hw[0]), int(hw[1])), dtype=np.int32)
        acc = sums[key]
        if y < 0 or x < 0 or y + P0 > acc.shape[0] or x + P1 > acc.shape[1]:
            raise DataError(f"patch at (y={y}, x={x}) of size {P0}x{P1} lies outside slice shape {acc.shape}")
        acc[y : y + P0, x : x + P1] += patch
        counts[key][y : y + P0, x : x + P1] += 1
    out: dict[tuple[int, int], np.ndarray] = {}
    for key in sorted(sums):
        n = counts[key]
        out[key] = np.where(n > 0, sums[key] / np.maximum(n, 1), fill).astype(np.float32)
    return out


def stitch_volumes(
    patches: np.ndarray | torch.Tensor,
    coords: np.ndarray | torch.Tensor,
    volume_shapes: Sequence[Sequence[int]] | np.ndarray,
    axis: int = 2,
    fill: float = -1.0,
) -> dict[int, np.ndarray]:
    """Stitch patches into whole volumes: ``{volume: float32 [X, Y, Z]}`` (slices without patches = ``fill``).

    ``volume_shapes`` is ``[V, 3]`` (the ``shape`` column of the file's ``volumes`` table); ``axis`` the
    slicing axis the file was written with (its ``settings['axis']``).
    """
    vshapes = np.asarray(volume_shapes, dtype=np.int64)
    if vshapes.ndim != 2 or vshapes.shape[1] != 3:
        raise DataError(f"volume_shapes must be [V, 3], got {vshapes.shape}")
    slice_shapes = np.delete(vshapes, axis, axis=1)
    slices = stitch(patches, coords, slice_shapes, fill=fill)
    vols: dict[int, np.ndarray] = {}
    for (v, s), sl in slices.items():
        if v not in vols:
            vols[v] = np.full(tuple(vshapes[v]), fill, dtype=np.float32)
        idx: list[Any] = [slice(None)] * 3
        idx[axis] = s
        vols[v][tuple(idx)] = sl
    return vols


# ----------------------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------------------
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
) -> Path:
    """Cut NIfTI volumes into 2D patches and write them to one HDF5 file (the seed's API, extended).

    Each volume is loaded (canonical RAS orientation, 4D -> ``frame``), normalised to ``[-1, 1]`` and sliced
    along ``axis``; every slice is covered by a ``image_size``-px patch grid with step ``stride`` whose last
    patch is aligned to the border. The file is written to a temporary name and renamed at the end (atomic).

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
        canonical, frame, nan_policy: passed to :func:`meddiff.data.nifti_io.load_volume`.
        compression: h5py compression for ``patches`` (None, "gzip", "lzf").
        filename: override the output file name.
        progress: show a tqdm bar over volumes.

    Returns:
        Path of the written file.

    Raises:
        ConfigError: invalid settings. DataError: no input, or no volume could be converted (the reasons are
        listed). Single bad volumes (unreadable, 2D, NaN, smaller than the patch, no foreground patch) are
        skipped and reported with a :class:`SkippedVolumeWarning` and in the file's ``skipped`` attribute.
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
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
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
    try:
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
            n_total = 0
            bar = tqdm(files, desc=f"{datasetname}: volumes", unit="vol", disable=not progress)
            for path, name in bar:
                try:
                    vol, affine = load_volume(path, canonical=canonical, frame=frame, nan_policy=nan_policy)
                except DataError as exc:
                    skipped.append({"file": name, "reason": str(exc)})
                    continue
                vol_s = np.moveaxis(vol, axis, 0)  # [S, H, W]
                hw = vol_s.shape[1:]
                if hw[0] < P or hw[1] < P:
                    skipped.append(
                        {
                            "file": name,
                            "reason": f"slice shape {tuple(hw)} (volume {vol.shape}, axis={axis}) is smaller than "
                            f"image_size={P}; use a smaller image_size or another axis",
                        }
                    )
                    continue
                norm, rng = _normalise(vol_s, intensity_p, percentiles)
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
                    dpatch[n_total : n_total + k] = p[:, None].astype(dtype)
                    c[:, 0] += s0
                    dcoord[n_total : n_total + k] = np.concatenate(
                        [np.full((k, 1), v_idx, dtype=np.int64), c], axis=1
                    ).astype(np.int32)
                    n_total += k
                    n_vol += k
                if n_vol == 0:
                    skipped.append(
                        {
                            "file": name,
                            "reason": f"no patch has >= {min_foreground:.0%} foreground "
                            f"(> {foreground_threshold}); lower min_foreground",
                        }
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
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    if skipped:
        lines = "\n".join(f"  - {s['file']}: {s['reason']}" for s in skipped)
        msg = f"{out.name}: skipped {len(skipped)} of {len(files)} volumes:\n{lines}"
        log.warning(msg)
        warnings.warn(msg, SkippedVolumeWarning, stacklevel=2)
    log.info("wrote %s: %d patches from %d volumes", out, n_total, len(meta))
    return out


# ----------------------------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PatchFileInfo:
    """What :func:`inspect_hdf5` reads from a patch file (all small; safe to keep in memory and pickle)."""

    path: Path
    settings: dict[str, Any]
    n_patches: int
    names: list[str]  # [V] volume names
    sha256: list[str]  # [V]
    volume_shapes: np.ndarray  # int64 [V, 3]
    slice_shapes: np.ndarray  # int64 [V, 2]
    coords: np.ndarray  # int64 [N, 4]
    skipped: list[dict[str, str]]

    @property
    def image_size(self) -> int:
        return int(self.settings["image_size"])

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        s = self.settings
        lines = [
            f"{self.path}: {self.n_patches} patches of {s['image_size']}x{s['image_size']} (stride {s['stride']}, "
            f"axis {s['axis']}, {s['dtype']}) from {len(self.names)} volumes",
            f"  intensity={s['intensity']} min_foreground={s['min_foreground']}",
        ]
        counts = np.bincount(self.coords[:, 0], minlength=len(self.names)) if self.n_patches else []
        for name, shape, n in zip(self.names, self.volume_shapes, counts):
            lines.append(f"  {name}: shape {tuple(int(v) for v in shape)}, {int(n)} patches")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            lines += [f"    {d['file']}: {d['reason']}" for d in self.skipped]
        return "\n".join(lines)


def _recreate_hint(path: Path) -> str:
    return f"re-create it with `python scripts/prepare_hdf5.py input=<nifti folder> name=<name>` (file {str(path)!r})"


def inspect_hdf5(path: str | Path, expected: dict[str, Any] | None = None) -> PatchFileInfo:
    """Open a patch file briefly, validate it and read its metadata (the handle is closed on return).

    Args:
        path: file written by :func:`save_as_hdf5`.
        expected: settings the caller requires, e.g. ``{"image_size": 64}``; None values are ignored.

    Raises:
        DataError: missing, truncated or non-HDF5 file; missing datasets/attributes; inconsistent shapes;
        settings different from ``expected`` (each mismatch named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"HDF5 patch file {str(path)!r} not found; create it with "
            "`python scripts/prepare_hdf5.py input=<nifti file or folder> name=<name>` or fix data.path"
        )
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(
            f"cannot open {str(path)!r} as HDF5 ({exc}); it is truncated or not HDF5; " + _recreate_hint(path)
        ) from exc
    try:
        with f:
            missing = [k for k in REQUIRED_DATASETS if k not in f]
            if missing or "settings" not in f.attrs:
                what = ", ".join(missing + ([] if "settings" in f.attrs else ["attribute 'settings'"]))
                raise DataError(
                    f"{str(path)!r} is not a meddiff patch file (missing {what}); " + _recreate_hint(path)
                )
            if f.attrs.get("format", "") != FORMAT:
                raise DataError(
                    f"{str(path)!r} has format {f.attrs.get('format')!r}, expected {FORMAT!r}; "
                    + _recreate_hint(path)
                )
            version = int(f.attrs.get("format_version", -1))
            if version > FORMAT_VERSION:
                raise DataError(
                    f"{str(path)!r} has format_version {version}, this meddiff reads <= {FORMAT_VERSION}; "
                    "update meddiff"
                )
            try:
                settings = json.loads(f.attrs["settings"])
            except (TypeError, ValueError) as exc:
                raise DataError(
                    f"{str(path)!r}: attribute 'settings' is not valid JSON; " + _recreate_hint(path)
                ) from exc
            lacking = [k for k in REQUIRED_SETTINGS if k not in settings]
            if lacking:
                raise DataError(f"{str(path)!r}: settings lack {lacking}; " + _recreate_hint(path))
            P = int(settings["image_size"])
            patches = f["patches"]
            n = int(patches.shape[0])
            if patches.ndim != 4 or tuple(patches.shape[1:]) != (1, P, P):
                raise DataError(
                    f"{str(path)!r}: patches have shape {patches.shape}, settings say [N, 1, {P}, {P}]; "
                    + _recreate_hint(path)
                )
            coords = np.asarray(f["coords"][()], dtype=np.int64)
            table = f["volumes"][()]
            slice_shapes = np.asarray(f["slice_shape"][()], dtype=np.int64).reshape(-1, 2)
            skipped = json.loads(f.attrs.get("skipped", "[]"))
            # touch the last patch: a truncated data block fails here rather than mid-epoch
            if n:
                patches[n - 1]
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"cannot read {str(path)!r} ({type(exc).__name__}: {exc}); the file is truncated or "
            "corrupt; " + _recreate_hint(path)
        ) from exc

    names = [v.decode() if isinstance(v, bytes) else str(v) for v in table["name"]]
    V = len(names)
    if (
        coords.shape != (n, 4)
        or len(slice_shapes) != V
        or (n and (coords[:, 0].min() < 0 or coords[:, 0].max() >= V))
    ):
        raise DataError(
            f"{str(path)!r}: coords {coords.shape}, {V} volumes and slice_shape {slice_shapes.shape} "
            "are inconsistent; " + _recreate_hint(path)
        )

    if expected:
        diffs = []
        for k, want in expected.items():
            if want is None:
                continue
            have = settings.get(k)
            if isinstance(want, (tuple, list)):
                want = list(want)
            if have != want:
                diffs.append(f"{k}: file has {have!r}, requested {want!r}")
        if diffs:
            raise DataError(
                f"{str(path)!r} was written with other settings than requested ({'; '.join(diffs)}); re-create it "
                "with the requested settings (scripts/prepare_hdf5.py) or change the data config to match"
            )

    return PatchFileInfo(
        path=path,
        settings=settings,
        n_patches=n,
        names=names,
        sha256=[v.decode() if isinstance(v, bytes) else str(v) for v in table["sha256"]],
        volume_shapes=np.asarray(table["shape"], dtype=np.int64).reshape(V, 3),
        slice_shapes=slice_shapes,
        coords=coords,
        skipped=skipped,
    )


def _parse_noise_std(noise_std: float | Sequence[float]) -> tuple[float, float]:
    """``0.1`` -> (0.1, 0.1); ``(0.05, 0.2)`` -> a range. Accepts Hydra ListConfig."""
    if isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool):
        lo = hi = float(noise_std)
    else:
        try:
            vals = [float(v) for v in noise_std]  # type: ignore[union-attr]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"noise_std={noise_std!r} must be a number or a [low, high] range") from exc
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) != 2:
            raise ConfigError(f"noise_std={noise_std!r} must be a number or a [low, high] range")
        lo, hi = vals
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi < lo:
        raise ConfigError(f"noise_std={noise_std!r} must be >= 0 (a range needs 0 <= low <= high)")
    return lo, hi


def _subject_of(name: str, subject_regex: str | None) -> str:
    if not subject_regex:
        return name
    m = re.search(subject_regex, name)
    if not m:
        raise ConfigError(f"subject_regex={subject_regex!r} does not match volume name {name!r}")
    return m.group(1) if m.groups() else m.group(0)


class PatchDataset(Dataset):
    """(noisy, clean) patch pairs from a :func:`save_as_hdf5` file, as contract dicts.

    The HDF5 file is opened lazily on first item access in each process (h5py handles cannot cross
    ``fork``/pickling); ``__init__`` only opens it briefly to validate and read the metadata.

    Item dict:
        ``image`` float32 ``[1, P, P]`` clean patch in ``[-1, 1]``;
        ``cond`` float32 ``[1, P, P]`` = image + N(0, noise_std²) (not clipped unless ``clip_cond``; so the noise
        keeps its configured std even in the background);
        ``noise_std`` float32 scalar; ``id`` str ``"<volume>:<slice>:<y>:<x>"``; ``subject`` str (volume name, or
        the ``subject_regex`` group); ``coords`` int64 ``[4]`` (volume, slice, y, x) for :func:`stitch`.

    Args:
        path: the HDF5 file.
        noise_std: Gaussian noise std in normalised units ([-1, 1] image), or a ``(low, high)`` range from which
            each item's std is drawn uniformly.
        indices: patch rows to use (default all); combined with ``volumes`` by intersection.
        volumes: volume rows (of the ``volumes`` table) to use.
        seed: seed of the deterministic noise.
        deterministic_noise: same noise for the same item on every access (validation / test); otherwise fresh
            noise from torch's global RNG (seeded per DataLoader worker).
        clip_cond: clip ``cond`` to ``[-1, 1]``.
        expected: settings the file must have (see :func:`inspect_hdf5`).
    """

    def __init__(
        self,
        path: str | Path,
        noise_std: float | Sequence[float] = 0.1,
        indices: Sequence[int] | np.ndarray | None = None,
        volumes: Sequence[int] | None = None,
        seed: int = 0,
        deterministic_noise: bool = False,
        clip_cond: bool = False,
        expected: dict[str, Any] | None = None,
        subject_regex: str | None = None,
        info: PatchFileInfo | None = None,
    ) -> None:
        self.path = Path(path)
        self.info = info if info is not None else inspect_hdf5(self.path, expected)
        self.noise_range = _parse_noise_std(noise_std)
        self.seed = int(seed)
        self.deterministic_noise = bool(deterministic_noise)
        self.clip_cond = bool(clip_cond)
        n = self.info.n_patches
        rows = np.arange(n, dtype=np.int64)
        if volumes is not None:
            rows = rows[np.isin(self.info.coords[:, 0], np.asarray(list(volumes), dtype=np.int64))]
        if indices is not None:
            idx = np.asarray(indices, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ConfigError(f"indices must lie in [0, {n}) for {str(self.path)!r}")
            rows = rows[np.isin(rows, idx)] if volumes is not None else idx
        self.rows = rows
        self.subjects = [_subject_of(nm, subject_regex) for nm in self.info.names]
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(len(self.rows))

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        """Close this process's handle (reopened on the next access)."""
        h5 = getattr(self, "_h5", None)  # absent if __init__ failed
        if h5 is not None and getattr(self, "_pid", None) == os.getpid():
            try:
                h5.close()
            except Exception:  # noqa: BLE001 - closing during interpreter shutdown
                pass
        self._h5 = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        self.close()

    def _noise(self, row: int, shape: tuple[int, ...]) -> tuple[float, torch.Tensor]:
        lo, hi = self.noise_range
        if self.deterministic_noise:
            g = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, row]).generate_state(1, np.uint64)[0] >> np.uint64(1))
            )
            u = float(torch.rand((), generator=g))
            z = torch.randn(shape, generator=g)
        else:
            u = float(torch.rand(()))
            z = torch.randn(shape)
        std = lo + (hi - lo) * u
        return std, z * std

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i])
        try:
            arr = self._file()["patches"][row]
        except (OSError, KeyError) as exc:
            raise DataError(
                f"cannot read patch {row} of {str(self.path)!r} ({exc}); " + _recreate_hint(self.path)
            ) from exc
        image = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        std, noise = self._noise(row, tuple(image.shape))
        cond = image + noise
        if self.clip_cond:
            cond = cond.clamp(-1.0, 1.0)
        v, s, y, x = (int(c) for c in self.info.coords[row])
        name = self.info.names[v]
        return {
            "image": image,
            "cond": cond,
            "noise_std": torch.tensor(std, dtype=torch.float32),
            "id": f"{name}:{s}:{y}:{x}",
            "subject": self.subjects[v],
            "coords": torch.tensor([v, s, y, x], dtype=torch.int64),
        }


def split_by_volume(
    names: Sequence[str],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    subject_regex: str | None = None,
) -> dict[str, list[int]]:
    """Assign volumes (grouped by subject) to train / val / test; no subject lands in two splits.

    A positive fraction gets at least one subject. Returns ``{"train"|"val"|"test": sorted volume rows}``.

    Raises:
        ConfigError: fractions outside [0, 1) or summing to >= 1.
        DataError: too few subjects to give train, and every split with a positive fraction, one each.
    """
    vf, tf = float(val_fraction), float(test_fraction)
    if not (0 <= vf < 1 and 0 <= tf < 1 and vf + tf < 1):
        raise ConfigError(f"val_fraction={vf} and test_fraction={tf} must be in [0, 1) with a sum < 1")
    subjects = [_subject_of(n, subject_regex) for n in names]
    groups = sorted(set(subjects))
    G = len(groups)
    n_test = max(1, round(tf * G)) if tf > 0 else 0
    n_val = max(1, round(vf * G)) if vf > 0 else 0
    if G - n_test - n_val < 1:
        raise DataError(
            f"cannot split {G} subject(s)/volume(s) by volume into train/val/test with val_fraction={vf}, "
            f"test_fraction={tf}: each split needs whole volumes; convert more volumes or set a fraction to 0"
        )
    order = np.random.default_rng(seed).permutation(G)
    which: dict[str, str] = {}
    for rank, g in enumerate(order):
        which[groups[g]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for v, sub in enumerate(subjects):
        out[which[sub]].append(v)
    return out


class HDF5PatchDataModule(SplitLoaders, L.LightningDataModule):
    """Denoising pairs from an HDF5 patch file, split by volume into train / val / test.

    Batches (contract dicts): ``image`` clean ``[B, 1, P, P]`` in [-1, 1], ``cond`` noisy ``[B, 1, P, P]``,
    ``noise_std`` ``[B]``, ``id`` / ``subject`` lists, ``coords`` ``[B, 4]``. Train draws fresh noise each epoch;
    val/test noise is deterministic (seeded per patch), so metrics are comparable across epochs and runs.

    Args:
        path: the HDF5 file (``<name>_p<P>_s<S>.h5``).
        noise_std: std of the Gaussian noise (normalised units) or a ``[low, high]`` range.
        val_fraction, test_fraction: shares of volumes (subjects) for val / test; 0 disables a split.
        seed: split and val/test-noise seed.
        batch_size, num_workers, pin_memory: DataLoader settings.
        image_size, stride, axis: if set, the file must have been written with them (else DataError).
        clip_cond: clip the noisy image to [-1, 1].
        subject_regex: regex whose group 1 extracts the subject from a volume name (volumes of one subject
            stay in one split); default: each volume is its own subject.
        source: if the file is missing, ``prepare_data`` creates it from this NIfTI file/folder, or from
            ``synthetic_volumes`` brain phantoms of ``synthetic_shape`` when ``source="synthetic"``.
        prepare_kwargs: extra arguments for :func:`save_as_hdf5` when converting ``source``.
    """

    def __init__(
        self,
        path: str | Path,
        noise_std: float | Sequence[float] = 0.1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        image_size: int | None = None,
        stride: int | None = None,
        axis: int | None = None,
        clip_cond: bool = False,
        subject_regex: str | None = None,
        source: str | None = None,
        synthetic_volumes: int = 8,
        synthetic_shape: Sequence[int] = (96, 96, 24),
        prepare_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.noise_std = noise_std if isinstance(noise_std, (int, float)) else tuple(noise_std)
        _parse_noise_std(self.noise_std)  # fail early on a bad value
        if int(batch_size) < 1 or int(num_workers) < 0:
            raise ConfigError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.expected = {"image_size": image_size, "stride": stride, "axis": axis}
        self.clip_cond = bool(clip_cond)
        self.subject_regex = subject_regex
        self.source = source
        self.synthetic_volumes = int(synthetic_volumes)
        self.synthetic_shape = tuple(int(s) for s in synthetic_shape)
        self.prepare_kwargs = dict(prepare_kwargs or {})
        self.info: PatchFileInfo | None = None
        self.splits: dict[str, list[int]] = {}
        self.datasets: dict[str, PatchDataset] = {}

    def prepare_data(self) -> None:
        """Create the file from ``source`` if it is missing (runs on one process only)."""
        if self.path.exists() or not self.source:
            return
        kw: dict[str, Any] = {k: v for k, v in self.expected.items() if v is not None}
        kw.update(self.prepare_kwargs)
        src: str | Path = self.source
        if str(self.source).lower() == "synthetic":
            src = write_synthetic_volumes(
                self.path.parent / f"{self.path.stem}_nifti",
                n=self.synthetic_volumes,
                shape=self.synthetic_shape,
                seed=self.seed,  # type: ignore[arg-type]
            )
        save_as_hdf5(src, self.path.stem, self.path.parent, filename=self.path.name, **kw)

    def setup(self, stage: str | None = None) -> None:
        """Validate the file and build the three split datasets (idempotent)."""
        if self.datasets:
            return
        self.info = inspect_hdf5(self.path, self.expected)
        self.splits = split_by_volume(
            self.info.names, self.val_fraction, self.test_fraction, self.seed, self.subject_regex
        )
        for split in ("train", "val", "test"):
            self.datasets[split] = self.make_dataset(split)

    def make_dataset(
        self,
        split: str,
        noise_std: float | Sequence[float] | None = None,
        deterministic_noise: bool | None = None,
    ) -> PatchDataset:
        """A dataset of one split, optionally at another noise level (for noise-level studies)."""
        if self.info is None:
            self.info = inspect_hdf5(self.path, self.expected)
            self.splits = split_by_volume(
                self.info.names, self.val_fraction, self.test_fraction, self.seed, self.subject_regex
            )
        if split not in ("train", "val", "test"):
            raise ConfigError(f"split={split!r} must be 'train', 'val' or 'test'")
        return PatchDataset(
            self.path,
            noise_std=self.noise_std if noise_std is None else noise_std,
            volumes=self.splits[split],
            seed=self.seed + {"train": 0, "val": 1, "test": 2}[split],
            deterministic_noise=(split != "train") if deterministic_noise is None else deterministic_noise,
            clip_cond=self.clip_cond,
            subject_regex=self.subject_regex,
            info=self.info,
        )

    def split_names(self) -> dict[str, list[str]]:
        """Volume names per split (after :meth:`setup`)."""
        assert self.info is not None, "call setup() first"
        return {k: [self.info.names[v] for v in vs] for k, vs in self.splits.items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        return dict_loader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
