"""ADNI 2D slices from 3D NIfTI volumes (seed 004, classifier-free guided anomaly detection).

Input: a *task dir* ``<root>/<task>/`` (default task ``2d_cfg_anom_det``) holding ``dataset.json``::

    [{"image": "cn/cn0.nii.gz", "slice_label": 1}, {"image": "ad/ad0.nii.gz", "slice_label": 5}, ...]

``slice_label`` (alias ``label``; an int 1..5 or a class name) is the ADNI class CN=1, EMCI=2, MCI=3, LMCI=4,
AD=5; image paths are relative to the task dir (absolute paths work too). An optional ``"subject"`` key groups
several volumes of one subject for the splits; without it every volume is its own subject.

Per volume (:func:`volume_slices`):

1. read with :func:`meddiff.data.nifti_io.load_volume` in closest-canonical **RAS** orientation (axis 0 runs
   left→right, 1 posterior→anterior, 2 inferior→superior). **4D files: frame 0 is used** (``frame`` setting,
   with a ``FrameWarning``); trailing singleton dims are dropped; a 2D image is a :class:`DataError`.
2. robust intensity normalisation: the 1st..99th percentile of the foreground (voxels above the volume minimum,
   i.e. the skull-stripped brain) maps linearly to ``[-1, 1]``, clipped; background is -1.
3. :func:`slice_range` along each axis in ``axes``: ``[floor(lo·n), floor(hi·n))`` (see there for the rounding),
   52 slices per axis and 156 per volume for the seed's 128³ volumes.
4. each slice is rotated for display (``np.rot90``: superior / anterior at the top), zero-padded (value -1)
   to a centred square, which keeps the voxel aspect ratio, then resized bilinearly (antialiased when
   shrinking) to ``image_size``². The brain mask (foreground) is resized the same way and thresholded at 0.5.

Cache: with ``cache_dir`` each volume's slices are written once to
``<cache_dir>/adni_slices_<settings hash>/<volume>_<file hash>.{img,mask,meta}.npy`` (``img`` float32
``[N, 1, S, S]``, ``mask`` uint8 ``[N, 1, S, S]``, ``meta`` int32 ``[N, 2]`` = (axis, index)); the settings hash
covers every setting that changes the pixels, the file hash the file's resolved path, size and mtime. Files are
written to a temp name and moved into place with ``os.replace`` (``img`` last: its presence means complete), read back as
read-only memmaps, so epochs, DataLoader workers and DDP ranks never re-read NIfTI. Without ``cache_dir`` the
slices are kept in memory for the dataset's life.

Items follow ``docs/contracts.md``: ``image`` float32 ``[1, S, S]`` in ``[-1, 1]``, ``brain_mask`` bool
``[1, S, S]``, ``class_label`` int64 (0..4 = CN..AD, i.e. ``slice_label - 1``), ``label`` int64 (0 CN, 1 other),
``id`` ``"<volume>:<axis>:<index>"``, ``subject``, ``volume`` (volume id: image path relative to the task dir
without ``.nii[.gz]``), ``axis`` and ``index`` (int64).

Errors: a bad ``dataset.json`` entry (missing file, label outside 1-5, 2D image, unreadable file) raises a
:class:`DataError` naming the entry; building a dataset over many volumes with ``skip_bad=True`` skips a volume
that fails to load, warns once listing all skipped ones and keeps them in ``.skipped``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from meddiff.data import nifti_io
from meddiff.data.loaders import dict_loader
from meddiff.errors import ConfigError, DataError

__all__ = [
    "CLASS_NAMES",
    "ADNIEntry",
    "SliceSettings",
    "VolumeSlices",
    "ADNISliceDataset",
    "ADNISliceDataModule",
    "entry_from_dict",
    "extract_slices",
    "read_dataset_json",
    "slice_range",
    "split_subjects",
    "volume_slices",
]

#: class names indexed by ``class_label`` (= ``slice_label - 1``)
CLASS_NAMES: tuple[str, ...] = ("CN", "EMCI", "MCI", "LMCI", "AD")
_NAME_TO_SLICE_LABEL = {n.lower(): i + 1 for i, n in enumerate(CLASS_NAMES)}
_CACHE_VERSION = 1
# floor(lo * n + eps): products such as 0.29 * 100 = 28.999999999999996 must floor to 29, not 28
_RANGE_EPS = 1e-6


# ----------------------------------------------------------------------------------------------- slicing
def slice_range(n: int, lo: float = 0.35, hi: float = 0.75) -> list[int]:
    """Slice indices between the ``lo`` and ``hi`` fractions of an axis of ``n`` voxels.

    Rounding: ``range(floor(lo·n), floor(hi·n))``, i.e. start rounded down and the end exclusive (each product
    gets ``+1e-6`` before flooring so float error such as ``0.29·100 = 28.999…`` does not drop a slice). This is
    the rule that reproduces the seed: for ``n = 128``, ``floor(44.8) = 44`` and ``floor(96.0) = 96`` give the
    52 slices 44..95 ("52 slices for each dimension starting from 44th slice to 95th slice"); rounding the
    start to nearest would give 51. At least one slice is always returned (the one at ``floor(lo·n)``).

    Args:
        n: axis length (>= 1).
        lo, hi: fractions with ``0 <= lo < hi <= 1``.

    Returns:
        Ascending 0-based indices.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"axis length n={n!r} must be an integer >= 1")
    if not (0.0 <= lo < hi <= 1.0):
        raise ConfigError(
            f"slice fractions lo={lo}, hi={hi} must satisfy 0 <= lo < hi <= 1 (seed: 0.35, 0.75)"
        )
    start = min(int(math.floor(lo * n + _RANGE_EPS)), int(n) - 1)
    stop = min(int(math.floor(hi * n + _RANGE_EPS)), int(n))
    return list(range(start, max(stop, start + 1)))


def _pad_square(stack: np.ndarray, value: float) -> np.ndarray:
    """``[N, H, W]`` -> ``[N, M, M]`` with ``M = max(H, W)``, content centred, border filled with ``value``."""
    n, h, w = stack.shape
    m = max(h, w)
    if h == w:
        return stack
    out = np.full((n, m, m), value, dtype=stack.dtype)
    top, left = (m - h) // 2, (m - w) // 2
    out[:, top : top + h, left : left + w] = stack
    return out


def _resize_square(stack: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize ``[N, M, M]`` -> ``[N, size, size]`` (antialiased when shrinking)."""
    m = stack.shape[-1]
    if m == size:
        return stack
    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < m)
    return y[:, 0].numpy()


def extract_slices(
    volume: np.ndarray,
    axes: Sequence[int] = (0, 1, 2),
    lo: float = 0.35,
    hi: float = 0.75,
    size: int = 128,
    pad_value: float = -1.0,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """2D slices of a 3D volume, padded to square and resized.

    Args:
        volume: ``[X, Y, Z]`` array (already normalised if you want ``[-1, 1]`` output).
        axes: axes to slice along, each in 0..2, in output order.
        lo, hi: fractions for :func:`slice_range`.
        size: output side in pixels.
        pad_value: value of the padding that squares a non-square slice (-1 = normalised background).

    Returns:
        ``(slices, meta)``: float32 ``[N, 1, size, size]`` and ``N`` ``(axis, index)`` pairs, axis-major in the
        order of ``axes``, ascending index; ``N = sum(len(slice_range(volume.shape[a], lo, hi)) for a in axes)``.
        Slice ``(a, i)`` is ``np.rot90(np.take(volume, i, axis=a))``: rows run along the later remaining axis,
        reversed (top = superior, or anterior for axis 2), columns along the earlier one.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise DataError(f"extract_slices expects a 3D volume [X, Y, Z], got shape {vol.shape}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"size={size!r} must be a positive integer (e.g. 128)")
    axes_t = _check_axes(axes)
    out: list[np.ndarray] = []
    meta: list[tuple[int, int]] = []
    for a in axes_t:
        idx = slice_range(int(vol.shape[a]), lo, hi)
        stack = np.moveaxis(vol, a, 0)[idx].astype(np.float32, copy=False)  # [n, d1, d2]
        stack = np.rot90(stack, k=1, axes=(1, 2))  # [n, d2, d1], d2 reversed
        stack = _resize_square(_pad_square(np.ascontiguousarray(stack), pad_value), int(size))
        out.append(stack[:, None])
        meta.extend((a, int(i)) for i in idx)
    return np.ascontiguousarray(np.concatenate(out, axis=0), dtype=np.float32), meta


def _check_axes(axes: Iterable[int]) -> tuple[int, ...]:
    try:
        t = tuple(int(a) for a in axes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"axes={axes!r} must be a list of distinct axes from 0, 1, 2") from exc
    if not t or len(set(t)) != len(t) or any(a not in (0, 1, 2) for a in t):
        raise ConfigError(f"axes={axes!r} must be a non-empty list of distinct axes from 0, 1, 2")
    return t


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SliceSettings:
    """Everything that changes the extracted pixels (and so keys the cache).

    Attributes:
        image_size: output side ``S`` in pixels.
        lo, hi: slice fractions per axis (:func:`slice_range`).
        axes: slice axes of the canonical RAS volume (0 sagittal, 1 coronal, 2 axial).
        pct_lo, pct_hi: foreground percentiles mapped to -1 / +1.
        frame: frame used for 4D files.
    """

    image_size: int = 128
    lo: float = 0.35
    hi: float = 0.75
    axes: tuple[int, ...] = (0, 1, 2)
    pct_lo: float = 1.0
    pct_hi: float = 99.0
    frame: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", _check_axes(self.axes))
        s = self.image_size
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 8:
            raise ConfigError(f"image_size={s!r} must be an integer >= 8 (seed: 128)")
        object.__setattr__(self, "image_size", int(s))
        slice_range(1, float(self.lo), float(self.hi))  # validates lo/hi
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))
        if not 0.0 <= float(self.pct_lo) < float(self.pct_hi) <= 100.0:
            raise ConfigError(
                f"percentiles pct_lo={self.pct_lo}, pct_hi={self.pct_hi} need 0 <= lo < hi <= 100"
            )
        object.__setattr__(self, "pct_lo", float(self.pct_lo))
        object.__setattr__(self, "pct_hi", float(self.pct_hi))
        object.__setattr__(self, "frame", int(self.frame))

    def key(self) -> str:
        """Stable 12-hex-digit hash of the settings (plus the cache format version and orientation rules)."""
        d = asdict(self) | {
            "version": _CACHE_VERSION,
            "orientation": "RAS",
            "display": "rot90",
            "pad": "centre",
        }
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class VolumeSlices:
    """Slices of one volume: ``images`` float32 ``[N, 1, S, S]`` in ``[-1, 1]``, ``masks`` bool
    ``[N, 1, S, S]`` (brain foreground), ``meta`` int32 ``[N, 2]`` = (axis, index), ``shape`` of the canonical
    volume."""

    images: np.ndarray
    masks: np.ndarray
    meta: np.ndarray
    shape: tuple[int, int, int] = (0, 0, 0)


# ---------------------------------------------------------------------------------------- dataset.json
@dataclass(frozen=True)
class ADNIEntry:
    """One ``dataset.json`` record.

    Attributes:
        image: the path as written in the json.
        path: resolved file path.
        slice_label: ADNI class 1..5 (CN, EMCI, MCI, LMCI, AD).
        volume_id: ``image`` relative to the task dir, POSIX, without ``.nii``/``.nii.gz`` (e.g. ``cn/cn0``).
        subject: subject id for splits (the json's ``subject`` or ``volume_id``).
        position: 0-based index in the json list.
    """

    image: str
    path: Path
    slice_label: int
    volume_id: str
    subject: str
    position: int = 0

    @property
    def class_label(self) -> int:
        """0..4 (CN..AD)."""
        return self.slice_label - 1

    @property
    def label(self) -> int:
        """0 healthy (CN), 1 otherwise."""
        return int(self.slice_label != 1)

    def describe(self) -> str:
        """Human-readable name used in every error about this entry."""
        return f"dataset.json entry #{self.position} (image {self.image!r}, slice_label {self.slice_label})"


def _strip_nifti_suffix(p: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", p, flags=re.IGNORECASE)


def _parse_label(value: Any, where: str) -> int:
    if isinstance(value, str):
        v = value.strip()
        if v.lower() in _NAME_TO_SLICE_LABEL:
            return _NAME_TO_SLICE_LABEL[v.lower()]
        if re.fullmatch(r"[+-]?\d+", v):
            value = int(v)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(
            f"{where}: slice_label {value!r} is not a class; use an integer 1-5 "
            "(CN=1, EMCI=2, MCI=3, LMCI=4, AD=5) or a class name"
        )
    if not 1 <= int(value) <= 5:
        raise DataError(
            f"{where}: slice_label {int(value)} is outside 1-5 (CN=1, EMCI=2, MCI=3, LMCI=4, AD=5); fix the label"
        )
    return int(value)


def entry_from_dict(
    record: Mapping[str, Any],
    base_dir: str | os.PathLike[str] = ".",
    position: int = 0,
    check_file: bool = True,
) -> ADNIEntry:
    """Parse one record ``{"image": ..., "slice_label": 1..5}`` (alias ``label``; optional ``subject``).

    Also serves single-volume inference inputs such as the seed's
    ``{"image": "data/2d_cfg_anom_det/ad/ad0.nii.gz", "label": 5}`` (with ``base_dir="."``).

    Raises:
        DataError: naming the entry, for a non-dict record, a missing ``image``, a label that is missing, not a
            class or outside 1-5, conflicting ``slice_label``/``label``, or (``check_file``) a missing file.
    """
    where = f"dataset.json entry #{position}"
    if not isinstance(record, Mapping):
        raise DataError(f'{where} ({record!r}) is not an object; write {{"image": ..., "slice_label": 1..5}}')
    image = record.get("image")
    where = f"{where} (image {image!r})"
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: needs an 'image' path string, e.g. \"cn/cn0.nii.gz\"")
    if "slice_label" in record and "label" in record:
        a, b = _parse_label(record["slice_label"], where), _parse_label(record["label"], where)
        if a != b:
            raise DataError(f"{where}: slice_label {a} and label {b} disagree; keep one")
        lab = a
    elif "slice_label" in record or "label" in record:
        lab = _parse_label(record.get("slice_label", record.get("label")), where)
    else:
        raise DataError(f"{where}: no 'slice_label' (or 'label'); add one of 1-5 (CN=1 ... AD=5)")
    base = Path(base_dir)
    p = Path(image)
    path = p if p.is_absolute() else base / p
    if check_file and not path.is_file():
        raise DataError(
            f"{where}: image file {str(path)!r} not found; fix the path (relative to {str(base)!r}) or remove "
            "the entry"
        )
    if p.is_absolute():
        try:
            rel = path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            rel = p.name
    else:
        rel = p.as_posix()
    volume_id = _strip_nifti_suffix(rel)
    subject = record.get("subject", volume_id)
    return ADNIEntry(
        image=image,
        path=path,
        slice_label=lab,
        volume_id=volume_id,
        subject=str(subject),
        position=int(position),
    )


def read_dataset_json(
    path: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> list[ADNIEntry]:
    """Read the seed's ``dataset.json`` (a list of records, see :func:`entry_from_dict`).

    Args:
        path: the json file.
        base_dir: dir the image paths are relative to (default: the json's dir, i.e. the task dir).
        check_files: raise for a missing image file (``False``: leave it to the loading step, which can skip it).

    Raises:
        DataError: missing/invalid json, a non-list top level, a bad entry (named), a volume listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f'{str(path)!r} not found; a task dir needs dataset.json = [{{"image": "cn/cn0.nii.gz", '
            '"slice_label": 1}, ...] (write a synthetic one with scripts/make_synthetic_adni.py)'
        )
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{str(path)!r} is not valid JSON ({exc}); check for a missing comma between entries"
        ) from exc
    if not isinstance(records, list):
        raise DataError(f"{str(path)!r} must hold a JSON list of entries, found {type(records).__name__}")
    base = Path(base_dir) if base_dir is not None else path.parent
    entries = [entry_from_dict(r, base, i, check_files) for i, r in enumerate(records)]
    seen: dict[str, ADNIEntry] = {}
    for e in entries:
        if e.volume_id in seen:
            raise DataError(
                f"{e.describe()} repeats the volume of {seen[e.volume_id].describe()}; list each once"
            )
        seen[e.volume_id] = e
    return entries


# --------------------------------------------------------------------------------------- one volume
def volume_slices(
    entry: ADNIEntry | str | os.PathLike[str], settings: SliceSettings | None = None
) -> VolumeSlices:
    """Load, normalise and slice one volume (no cache).

    Args:
        entry: an :class:`ADNIEntry` (errors name it) or a NIfTI path.
        settings: slicing settings (default :class:`SliceSettings()`).

    Returns:
        :class:`VolumeSlices` with images in ``[-1, 1]``.

    Raises:
        DataError: naming the entry, for a missing/unreadable file, a 2D image, a bad 4D frame, NaN voxels.
    """
    settings = settings or SliceSettings()
    path = entry.path if isinstance(entry, ADNIEntry) else Path(entry)
    name = entry.describe() if isinstance(entry, ADNIEntry) else f"volume {str(path)!r}"
    try:
        vol, _affine = nifti_io.load_volume(path, canonical=True, frame=settings.frame)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc
    fg = vol > vol.min()
    norm = nifti_io.robust_normalise(vol, mask=fg, lower=settings.pct_lo, upper=settings.pct_hi)
    images, meta = extract_slices(norm, settings.axes, settings.lo, settings.hi, settings.image_size, -1.0)
    masks, _ = extract_slices(
        fg.astype(np.float32), settings.axes, settings.lo, settings.hi, settings.image_size, 0.0
    )
    return VolumeSlices(
        images=np.clip(images, -1.0, 1.0),
        masks=masks > 0.5,
        meta=np.asarray(meta, dtype=np.int32).reshape(-1, 2),
        shape=tuple(int(s) for s in vol.shape),  # type: ignore[arg-type]
    )


def _atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(fileobj)`` to a temp file in ``path``'s dir, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def _atomic_save_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def _cache_stem(entry: ADNIEntry) -> str:
    try:
        st = entry.path.stat()
    except OSError as exc:
        raise DataError(
            f"{entry.describe()}: image file {str(entry.path)!r} not found or unreadable ({exc})"
        ) from exc
    ident = f"{entry.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", entry.volume_id)[-80:]
    return f"{safe}_{hashlib.sha1(ident.encode()).hexdigest()[:12]}"


# ------------------------------------------------------------------------------------------- dataset
class ADNISliceDataset(Dataset):
    """All slices of a list of volumes, as contract dicts (see the module docstring for keys and shapes).

    Volumes are processed (or found in the cache) at construction, in entry order; item ``i`` is slice
    ``i - offset[v]`` of the ``v``-th kept volume, slices in :func:`extract_slices` order.

    Args:
        entries: :class:`ADNIEntry` records (e.g. from :func:`read_dataset_json`).
        image_size, lo, hi, axes, pct_lo, pct_hi, frame: see :class:`SliceSettings`.
        cache_dir: on-disk slice cache root (``None``: keep slices in memory).
        skip_bad: skip a volume that fails to load (warn, record in ``skipped``) instead of raising.
        return_brain_mask: include ``brain_mask`` in items.

    Attributes:
        volumes: the kept entries. ``skipped``: ``(image, reason)`` for each skipped entry.
        settings: the :class:`SliceSettings`. ``cache_subdir``: where this dataset's cache files live.
    """

    def __init__(
        self,
        entries: Sequence[ADNIEntry],
        image_size: int = 128,
        lo: float = 0.35,
        hi: float = 0.75,
        axes: Sequence[int] = (0, 1, 2),
        pct_lo: float = 1.0,
        pct_hi: float = 99.0,
        frame: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        skip_bad: bool = True,
        return_brain_mask: bool = True,
    ) -> None:
        self.settings = SliceSettings(image_size, lo, hi, tuple(axes), pct_lo, pct_hi, frame)
        self.return_brain_mask = bool(return_brain_mask)
        self.cache_subdir: Path | None = None
        if cache_dir is not None:
            self.cache_subdir = Path(cache_dir) / f"adni_slices_{self.settings.key()}"
            self.cache_subdir.mkdir(parents=True, exist_ok=True)
            settings_file = self.cache_subdir / "settings.json"  # for humans: what the hash stands for
            if not settings_file.exists():
                _atomic_save_bytes(settings_file, json.dumps(asdict(self.settings), indent=1).encode())
        self.volumes: list[ADNIEntry] = []
        self.skipped: list[tuple[str, str]] = []
        self._meta: list[np.ndarray] = []
        self._stems: list[str] = []
        self._memory: list[VolumeSlices] = []
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for entry in entries:
            try:
                stem, meta, vs = self._prepare(entry)
            except (DataError, OSError) as exc:
                if not skip_bad:
                    if isinstance(exc, DataError) and entry.describe() in str(exc):
                        raise
                    raise DataError(f"{entry.describe()}: {exc}") from exc
                self.skipped.append((entry.image, str(exc)))
                continue
            self.volumes.append(entry)
            self._stems.append(stem)
            self._meta.append(meta)
            if vs is not None:
                self._memory.append(vs)
        self._offsets = np.concatenate([[0], np.cumsum([len(m) for m in self._meta])]).astype(np.int64)
        if self.skipped:
            listing = "; ".join(f"{img}: {why}" for img, why in self.skipped)
            warnings.warn(
                f"ADNISliceDataset skipped {len(self.skipped)} of {len(entries)} volumes: {listing}",
                stacklevel=2,
            )
        if entries and not self.volumes:
            raise DataError(
                f"none of the {len(entries)} volumes could be loaded (first: {self.skipped[0][1]})"
            )

    # -- cache -----------------------------------------------------------------------------------------
    def _paths(self, stem: str) -> tuple[Path, Path, Path]:
        assert self.cache_subdir is not None
        d = self.cache_subdir
        return d / f"{stem}.img.npy", d / f"{stem}.mask.npy", d / f"{stem}.meta.npy"

    def _prepare(self, entry: ADNIEntry) -> tuple[str, np.ndarray, VolumeSlices | None]:
        """Return ``(stem, meta, in-memory slices or None)``, extracting the volume unless cached."""
        if self.cache_subdir is None:
            vs = volume_slices(entry, self.settings)
            return entry.volume_id, vs.meta, vs
        stem = _cache_stem(entry)
        img_p, mask_p, meta_p = self._paths(stem)
        if img_p.is_file() and mask_p.is_file() and meta_p.is_file():
            try:
                meta = np.load(meta_p, allow_pickle=False)
                return stem, meta, None
            except (OSError, ValueError):
                pass  # damaged cache file: rebuild below
        vs = volume_slices(entry, self.settings)
        _atomic_save(meta_p, vs.meta)
        _atomic_save(mask_p, vs.masks.astype(np.uint8))
        _atomic_save(img_p, vs.images.astype(np.float32))  # last: its presence marks a complete entry
        return stem, vs.meta, None

    def _arrays(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache_subdir is None:
            return self._memory[v].images, self._memory[v].masks
        arr = self._open.get(v)
        if arr is None:
            img_p, mask_p, _ = self._paths(self._stems[v])
            arr = (np.load(img_p, mmap_mode="r"), np.load(mask_p, mmap_mode="r"))
            self._open[v] = arr
        return arr

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}  # memmaps are reopened lazily in each worker process
        return state

    # -- access ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[ADNIEntry, int, int]:
        """``(entry, axis, slice index)`` of item ``index``."""
        v, r = self._vr(index)
        a, i = self._meta[v][r]
        return self.volumes[v], int(a), int(i)

    def volume_indices(self, volume_id: str) -> range:
        """Item indices of one volume's slices (for per-volume analysis)."""
        for v, e in enumerate(self.volumes):
            if e.volume_id == volume_id:
                return range(int(self._offsets[v]), int(self._offsets[v + 1]))
        raise KeyError(f"volume {volume_id!r} is not in this dataset")

    def _vr(self, index: int) -> tuple[int, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} slices")
        v = bisect.bisect_right(self._offsets, index) - 1
        return v, index - int(self._offsets[v])

    def __getitem__(self, index: int) -> dict[str, Any]:
        v, r = self._vr(int(index))
        entry = self.volumes[v]
        axis, idx = (int(x) for x in self._meta[v][r])
        images, masks = self._arrays(v)
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.array(images[r], dtype=np.float32)),
            "label": torch.tensor(entry.label, dtype=torch.int64),
            "class_label": torch.tensor(entry.class_label, dtype=torch.int64),
            "id": f"{entry.volume_id}:{axis}:{idx}",
            "subject": entry.subject,
            "volume": entry.volume_id,
            "axis": torch.tensor(axis, dtype=torch.int64),
            "index": torch.tensor(idx, dtype=torch.int64),
        }
        if self.return_brain_mask:
            item["brain_mask"] = torch.from_numpy(np.array(masks[r], dtype=bool))
        return item


# --------------------------------------------------------------------------------------------- splits
def _allocate(
    counts: Mapping[int, int], frac: float, room: dict[int, int], rng: np.random.Generator
) -> dict[int, int]:
    """Largest-remainder allocation of ``round(frac * total)`` items over classes, at most ``room[c]`` each."""
    total = sum(counts.values())
    target = int(math.floor(frac * total + 0.5))
    exact = {c: frac * n for c, n in counts.items()}
    alloc = {c: min(int(math.floor(x)), room[c]) for c, x in exact.items()}
    order = sorted(counts, key=lambda c: (-(exact[c] - math.floor(exact[c])), rng.random()))
    left = target - sum(alloc.values())
    while left > 0:
        progressed = False
        for c in order:
            if left > 0 and alloc[c] < room[c]:
                alloc[c] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return alloc


def split_subjects(
    entries: Sequence[ADNIEntry],
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: int = 0,
) -> dict[str, list[ADNIEntry]]:
    """Seeded train/val/test split by subject, stratified by class.

    Subjects (``entry.subject``; all of a subject's volumes stay together) get the most common class of their
    volumes. ``round(test_frac · n_subjects)`` test and ``round(val_frac · n_subjects)`` val subjects are spread
    over the classes by largest remainder (ties broken by the seed), never taking a class's last training
    subject; within a class the subjects are drawn from a seeded permutation of their sorted ids, so the split
    depends only on the set of subjects, not on json order.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` entries in input order; every entry in exactly one.
    """
    if not (0.0 <= val_frac < 1.0 and 0.0 <= test_frac < 1.0 and val_frac + test_frac < 1.0):
        raise ConfigError(
            f"val_frac={val_frac}, test_frac={test_frac} must be >= 0 with val_frac + test_frac < 1"
        )
    by_subject: dict[str, list[ADNIEntry]] = defaultdict(list)
    for e in entries:
        by_subject[e.subject].append(e)
    subj_class = {
        s: sorted(Counter(e.slice_label for e in es).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        for s, es in by_subject.items()
    }
    by_class: dict[int, list[str]] = defaultdict(list)
    for s in sorted(by_subject):
        by_class[subj_class[s]].append(s)
    rng = np.random.default_rng(seed)
    perm = {c: [subs[i] for i in rng.permutation(len(subs))] for c, subs in sorted(by_class.items())}
    counts = {c: len(s) for c, s in perm.items()}
    room = {c: max(n - 1, 0) for c, n in counts.items()}  # keep >= 1 training subject per class
    n_test = _allocate(counts, test_frac, room, rng)
    room = {c: room[c] - n_test[c] for c in counts}
    n_val = _allocate(counts, val_frac, room, rng)
    which: dict[str, str] = {}
    for c, subs in perm.items():
        for k, s in enumerate(subs):
            which[s] = "test" if k < n_test[c] else "val" if k < n_test[c] + n_val[c] else "train"
    out: dict[str, list[ADNIEntry]] = {"train": [], "val": [], "test": []}
    for e in entries:
        out[which[e.subject]].append(e)
    return out


def _parse_classes(classes: Iterable[int | str] | None) -> frozenset[int] | None:
    if classes is None:
        return None
    if isinstance(classes, (str, int)):
        classes = [classes]
    out = set()
    for c in classes:
        try:
            out.add(_parse_label(c, "train_classes"))
        except DataError as exc:
            raise ConfigError(f"{exc} (train_classes takes names CN..AD or slice labels 1..5)") from exc
    return frozenset(out)


# ------------------------------------------------------------------------------------------ DataModule
class ADNISliceDataModule(L.LightningDataModule):
    """ADNI slice DataModule for the seed's task dir (``<root>/<task>/dataset.json``).

    Args:
        root: dataset dir (the seed's ``--datasetDir``).
        task: task sub-dir name.
        image_size, lo, hi, axes, pct_lo, pct_hi, frame: slicing settings (:class:`SliceSettings`).
        val_frac, test_frac, split_seed: subject-level stratified split (:func:`split_subjects`).
        batch_size, num_workers, pin_memory: DataLoader settings.
        train_classes: classes kept in the *train* split (names ``"CN"``.. or slice labels 1..5; ``None`` all);
            val and test keep every class.
        synthetic: write a synthetic task dir (:func:`meddiff.data.synthetic_mri.write_synthetic_adni`) when
            ``dataset.json`` is missing; ``synthetic_n_per_class``, ``synthetic_shape``, ``synthetic_seed``
            configure it.
        cache_dir: slice cache root (``None``: in-memory per dataset).
        skip_bad: skip volumes that fail to load (listed in ``skipped``) instead of raising.
        return_brain_mask: include ``brain_mask`` in batches.

    Attributes:
        train_set, val_set, test_set: :class:`ADNISliceDataset` after ``setup``.
        splits: the entry split. ``skipped``: ``(image, reason)`` over all built splits.
    """

    num_classes: int = len(CLASS_NAMES)
    class_names: tuple[str, ...] = CLASS_NAMES

    def __init__(
        self,
        root: str = "data/adni",
        task: str = "2d_cfg_anom_det",
        image_size: int = 128,
        lo: float = 0.35,
        hi: float = 0.75,
        axes: Sequence[int] = (0, 1, 2),
        pct_lo: float = 1.0,
        pct_hi: float = 99.0,
        frame: int = 0,
        val_frac: float = 0.1,
        test_frac: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        train_classes: Sequence[int | str] | None = None,
        synthetic: bool = False,
        synthetic_n_per_class: int = 4,
        synthetic_shape: Sequence[int] = (64, 64, 64),
        synthetic_seed: int = 0,
        cache_dir: str | None = None,
        skip_bad: bool = True,
        return_brain_mask: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root)
        self.task = str(task)
        self.settings = SliceSettings(image_size, lo, hi, tuple(int(a) for a in axes), pct_lo, pct_hi, frame)
        split_subjects([], val_frac, test_frac)  # validate fractions early
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be >= 1")
        if int(num_workers) < 0:
            raise ConfigError(f"num_workers={num_workers!r} must be >= 0")
        self.val_frac, self.test_frac, self.split_seed = float(val_frac), float(test_frac), int(split_seed)
        self.batch_size, self.num_workers, self.pin_memory = (
            int(batch_size),
            int(num_workers),
            bool(pin_memory),
        )
        self.train_classes = _parse_classes(train_classes)
        self.synthetic = bool(synthetic)
        self.synthetic_n_per_class = int(synthetic_n_per_class)
        self.synthetic_shape = tuple(int(s) for s in synthetic_shape)
        self.synthetic_seed = int(synthetic_seed)
        self.cache_dir = None if cache_dir in (None, "") else str(cache_dir)
        self.skip_bad = bool(skip_bad)
        self.return_brain_mask = bool(return_brain_mask)
        self.splits: dict[str, list[ADNIEntry]] | None = None
        self.train_set: ADNISliceDataset | None = None
        self.val_set: ADNISliceDataset | None = None
        self.test_set: ADNISliceDataset | None = None
        self.skipped: list[tuple[str, str]] = []

    @property
    def task_dir(self) -> Path:
        """``<root>/<task>``."""
        return self.root / self.task

    @property
    def json_path(self) -> Path:
        return self.task_dir / "dataset.json"

    def _ensure_task_dir(self) -> None:
        if self.json_path.is_file():
            return
        if not self.synthetic:
            raise DataError(
                f"{str(self.json_path)!r} not found; point root/task at an ADNI task dir with dataset.json, or set "
                "synthetic=true to generate a synthetic one there"
            )
        from meddiff.data.synthetic_mri import write_synthetic_adni

        write_synthetic_adni(
            self.root, self.synthetic_n_per_class, self.synthetic_shape, self.synthetic_seed, task=self.task
        )

    def _dataset(self, entries: Sequence[ADNIEntry]) -> ADNISliceDataset:
        s = self.settings
        ds = ADNISliceDataset(
            entries,
            s.image_size,
            s.lo,
            s.hi,
            s.axes,
            s.pct_lo,
            s.pct_hi,
            s.frame,
            cache_dir=self.cache_dir,
            skip_bad=self.skip_bad,
            return_brain_mask=self.return_brain_mask,
        )
        self.skipped.extend(x for x in ds.skipped if x not in self.skipped)
        return ds

    def prepare_data(self) -> None:
        """Generate the synthetic task dir if asked, and fill the on-disk cache (once, on rank 0)."""
        self._ensure_task_dir()
        if self.cache_dir is not None:
            self._dataset(read_dataset_json(self.json_path, check_files=not self.skip_bad))

    def _split(self) -> dict[str, list[ADNIEntry]]:
        if self.splits is None:
            self._ensure_task_dir()
            entries = read_dataset_json(self.json_path, check_files=not self.skip_bad)
            splits = split_subjects(entries, self.val_frac, self.test_frac, self.split_seed)
            if self.train_classes is not None:
                splits["train"] = [e for e in splits["train"] if e.slice_label in self.train_classes]
            self.splits = splits
        return self.splits

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs (``fit``: train+val, ``validate``: val, ``test``/``predict``: test)."""
        splits = self._split()
        if stage in (None, "fit") and self.train_set is None:
            if not splits["train"]:
                raise DataError(
                    f"the train split is empty (train_classes={sorted(self.train_classes or [])}); add volumes "
                    "or widen train_classes"
                )
            self.train_set = self._dataset(splits["train"])
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._dataset(splits["val"])
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset(splits["test"])

    def _loader(self, ds: ADNISliceDataset | None, shuffle: bool, name: str) -> DataLoader:
        if ds is None:
            raise DataError(f"{name} dataset is not built; call setup() with the matching stage first")
        return dict_loader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, "train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, "test")
