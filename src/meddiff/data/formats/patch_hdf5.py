"""The HDF5 patch file format: NIfTI volumes cut into 2D patches in one file. Constants, reader and inspector.

File layout written by :func:`meddiff.data.preprocess.nifti_patches.save_as_hdf5`
(``<targetdir>/<datasetname>_p<P>_s<S>.h5``)::

    patches         float32|float16 [N, 1, P, P]   in [-1, 1], chunked one patch per chunk
    coords          int32 [N, 4]                   (volume, slice, y, x): row of ``volumes``, index along
                                                   ``axis``, top-left corner of the patch in the slice
    volumes         compound [V]                   name, sha256 of the source file, shape [3], n_patches
    slice_shape     int32 [V, 2]                   (H, W) of the slices of each volume
    affines         float64 [V, 4, 4]              voxel->world of the (canonical) volume
    intensity_range float64 [V, 2]                 source intensities mapped to -1 / +1
    attrs: format, format_version, settings (json), skipped (json list of {file, reason}), n_volumes, n_patches,
           value_range float64 [2] (min, max of the stored patches; format_version >= 2)

Every read checks the patch against ``value_range`` (:func:`check_patch_values`), so a patch whose values were
overwritten after writing (a bad copy, a stray script) is a :class:`DataError` naming the file and the patch row,
never a batch. Files of format_version 1 (no ``value_range``) still load and are checked against ``[-1, 1]``, the
range the format has always promised.

Slice ``s`` of volume ``v`` is ``np.take(volume, s, axis)`` of the canonical (RAS) volume after intensity
normalisation, so :func:`meddiff.patches.stitch` of all patches reproduces those slices exactly (float32
storage). The patch grid is :func:`meddiff.patches.patch_grid`. No Lightning, no splits: the Dataset and
DataModule reading these files are in :mod:`meddiff.data.modules.hdf5_patches`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from meddiff.errors import DataError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "REQUIRED_DATASETS",
    "REQUIRED_SETTINGS",
    "PatchFileInfo",
    "check_patch_values",
    "inspect_hdf5",
    "recreate_hint",
]

FORMAT = "meddiff-hdf5-patches"
FORMAT_VERSION = 2  # 2: attribute value_range (checked on every read)
DEFAULT_VALUE_RANGE: tuple[float, float] = (-1.0, 1.0)  # the format's promise; the check for version-1 files
REQUIRED_DATASETS: tuple[str, ...] = ("patches", "coords", "volumes", "slice_shape")
REQUIRED_SETTINGS: tuple[str, ...] = ("image_size", "stride", "axis", "min_foreground", "intensity", "dtype")


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
    value_range: tuple[float, float] = DEFAULT_VALUE_RANGE  # (min, max) every stored patch lies in
    format_version: int = FORMAT_VERSION

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


def recreate_hint(path: Path) -> str:
    """The fix for a missing, stale or broken patch file (error messages end with it)."""
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
            f"cannot open {str(path)!r} as HDF5 ({exc}); it is truncated or not HDF5; " + recreate_hint(path)
        ) from exc
    try:
        with f:
            missing = [k for k in REQUIRED_DATASETS if k not in f]
            if missing or "settings" not in f.attrs:
                what = ", ".join(missing + ([] if "settings" in f.attrs else ["attribute 'settings'"]))
                raise DataError(
                    f"{str(path)!r} is not a meddiff patch file (missing {what}); " + recreate_hint(path)
                )
            if f.attrs.get("format", "") != FORMAT:
                raise DataError(
                    f"{str(path)!r} has format {f.attrs.get('format')!r}, expected {FORMAT!r}; "
                    + recreate_hint(path)
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
                    f"{str(path)!r}: attribute 'settings' is not valid JSON; " + recreate_hint(path)
                ) from exc
            lacking = [k for k in REQUIRED_SETTINGS if k not in settings]
            if lacking:
                raise DataError(f"{str(path)!r}: settings lack {lacking}; " + recreate_hint(path))
            P = int(settings["image_size"])
            patches = f["patches"]
            n = int(patches.shape[0])
            if patches.ndim != 4 or tuple(patches.shape[1:]) != (1, P, P):
                raise DataError(
                    f"{str(path)!r}: patches have shape {patches.shape}, settings say [N, 1, {P}, {P}]; "
                    + recreate_hint(path)
                )
            coords = np.asarray(f["coords"][()], dtype=np.int64)
            table = f["volumes"][()]
            slice_shapes = np.asarray(f["slice_shape"][()], dtype=np.int64).reshape(-1, 2)
            skipped = json.loads(f.attrs.get("skipped", "[]"))
            value_range = _value_range(f, version, path)
            # touch the last patch: a truncated data block fails here rather than mid-epoch
            if n:
                check_patch_values(patches[n - 1], value_range, path, n - 1)
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"cannot read {str(path)!r} ({type(exc).__name__}: {exc}); the file is truncated or "
            "corrupt; " + recreate_hint(path)
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
            "are inconsistent; " + recreate_hint(path)
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
        value_range=value_range,
        format_version=version,
    )


def _value_range(f: h5py.File, version: int, path: Path) -> tuple[float, float]:
    """The file's stored ``value_range`` (version >= 2) or the format's ``[-1, 1]`` (version 1)."""
    if version < 2 and "value_range" not in f.attrs:
        return DEFAULT_VALUE_RANGE
    if "value_range" not in f.attrs:
        raise DataError(
            f"{str(path)!r} (format_version {version}) lacks the attribute 'value_range'; " + recreate_hint(path)
        )
    vr = np.asarray(f.attrs["value_range"], dtype=np.float64).ravel()
    lo_ok, hi_ok = DEFAULT_VALUE_RANGE
    # the writer stores the min / max of its patches, which lie in [-1, 1]
    if not (vr.shape == (2,) and lo_ok <= vr[0] <= vr[1] <= hi_ok):
        raise DataError(
            f"{str(path)!r}: attribute value_range={vr.tolist()} is not a range inside [-1, 1]; the file was "
            "modified after writing; " + recreate_hint(path)
        )
    return float(vr[0]), float(vr[1])


def check_patch_values(patch: np.ndarray, value_range: tuple[float, float], path: Path, row: int) -> None:
    """Raise :class:`DataError` naming ``path`` and ``row`` if ``patch`` has values outside ``value_range``.

    ``patch`` is one stored patch (``[1, P, P]``); NaN counts as outside. One vectorised pass, cheap per item.
    """
    lo, hi = value_range
    inside = (patch >= lo) & (patch <= hi)
    if not inside.all():
        bad = patch[~inside]
        raise DataError(
            f"patch {row} of {str(path)!r} has {bad.size} values outside the range [{lo:g}, {hi:g}] stored with "
            f"the file (e.g. {float(bad.flat[0])!r}); the file was modified after it was written; "
            + recreate_hint(path)
        )
