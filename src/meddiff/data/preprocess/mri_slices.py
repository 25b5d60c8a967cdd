"""MRI slicing: 2D slices of a 3D NIfTI volume (geometry, settings) and the per-volume slice cache (seed 004).

Per volume (:func:`volume_slices`):

1. read with :func:`meddiff.data.formats.nifti.load_volume` in closest-canonical **RAS** orientation (axis 0 runs
   left→right, 1 posterior→anterior, 2 inferior→superior). **4D files: frame 0 is used** (``frame`` setting,
   with a ``FrameWarning``); trailing singleton dims are dropped; a 2D image is a :class:`DataError`.
2. robust intensity normalisation: the 1st..99th percentile of the foreground (voxels above the volume minimum,
   i.e. the skull-stripped brain) maps linearly to ``[-1, 1]``, clipped; background is -1. A volume without
   intensity range (all-constant, or one value in the foreground) is a :class:`DataError` (skipped and listed
   by batch loaders), never slices of -1.
3. :func:`slice_range` along each axis in ``axes``: ``[floor(lo·n), floor(hi·n))`` (see there for the rounding),
   52 slices per axis and 156 per volume for the seed's 128³ volumes.
4. each slice is rotated for display (``np.rot90``: superior / anterior at the top), zero-padded (value -1)
   to a centred square, which keeps the voxel aspect ratio, then resized bilinearly (antialiased when
   shrinking) to ``image_size``². The brain mask (foreground) is resized the same way and thresholded at 0.5.

Cache (:class:`VolumeSliceCache`): each volume's slices are written once to
``<cache_dir>/adni_slices_<settings hash>/<volume>_<file hash>.{img,mask,meta}.npy`` (``img`` float32
``[N, 1, S, S]``, ``mask`` uint8 ``[N, 1, S, S]``, ``meta`` int32 ``[N, 2]`` = (axis, index)); the settings hash
covers every setting that changes the pixels, the file hash the file's resolved path, size, mtime and a hash of its
first and last few kB (:func:`meddiff.data.preprocess.cache.content_tag`: a same-size replacement whose mtime was
kept is sliced again too). Files are
written through :mod:`meddiff.utils.io` (temp name + ``os.replace``, mode 0644; ``img`` last: its presence means
complete) and read back as read-only memmaps, so epochs, DataLoader workers and DDP ranks never re-read NIfTI.

(The generic chunked cache of :mod:`meddiff.data.preprocess.cache` is not used here: it stores float16 and keys
on the whole record list, which would change the slices and rebuild per split.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meddiff.data.formats import nifti
from meddiff.data.formats.adni_json import ADNIEntry
from meddiff.data.preprocess.cache import content_tag
from meddiff.errors import ConfigError, DataError
from meddiff.utils.io import atomic_save_npy, atomic_write_bytes

__all__ = [
    "SliceSettings",
    "VolumeData",
    "VolumeSliceCache",
    "VolumeSlices",
    "check_axes",
    "extract_slices",
    "pad_square",
    "resize_square",
    "slice_range",
    "volume_slices",
]

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


def pad_square(stack: np.ndarray, value: float) -> np.ndarray:
    """``[N, H, W]`` -> ``[N, M, M]`` with ``M = max(H, W)``, content centred, border filled with ``value``."""
    n, h, w = stack.shape
    m = max(h, w)
    if h == w:
        return stack
    out = np.full((n, m, m), value, dtype=stack.dtype)
    top, left = (m - h) // 2, (m - w) // 2
    out[:, top : top + h, left : left + w] = stack
    return out


def resize_square(stack: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize ``[N, M, M]`` -> ``[N, size, size]`` (antialiased when shrinking)."""
    m = stack.shape[-1]
    if m == size:
        return stack
    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < m)
    return y[:, 0].numpy()


def check_axes(axes: Iterable[int]) -> tuple[int, ...]:
    """``axes`` as a non-empty tuple of distinct axes from 0, 1, 2, else :class:`ConfigError`."""
    try:
        t = tuple(int(a) for a in axes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"axes={axes!r} must be a list of distinct axes from 0, 1, 2") from exc
    if not t or len(set(t)) != len(t) or any(a not in (0, 1, 2) for a in t):
        raise ConfigError(f"axes={axes!r} must be a non-empty list of distinct axes from 0, 1, 2")
    return t


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
    axes_t = check_axes(axes)
    out: list[np.ndarray] = []
    meta: list[tuple[int, int]] = []
    for a in axes_t:
        idx = slice_range(int(vol.shape[a]), lo, hi)
        stack = np.moveaxis(vol, a, 0)[idx].astype(np.float32, copy=False)  # [n, d1, d2]
        stack = np.rot90(stack, k=1, axes=(1, 2))  # [n, d2, d1], d2 reversed
        stack = resize_square(pad_square(np.ascontiguousarray(stack), pad_value), int(size))
        out.append(stack[:, None])
        meta.extend((a, int(i)) for i in idx)
    return np.ascontiguousarray(np.concatenate(out, axis=0), dtype=np.float32), meta


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
        object.__setattr__(self, "axes", check_axes(self.axes))
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

    def to_volume_data(self) -> VolumeData:
        """The same slices as torch tensors (what a model consumes)."""
        return VolumeData(
            torch.from_numpy(np.ascontiguousarray(self.images)),
            torch.from_numpy(np.ascontiguousarray(self.masks)),
            self.meta[:, 0].astype(np.int64),
            self.meta[:, 1].astype(np.int64),
        )


@dataclass
class VolumeData:
    """The slices of one volume as tensors: ``images`` float32 ``[N, 1, S, S]`` in [-1, 1], ``masks`` bool
    ``[N, 1, S, S]`` (brain foreground), ``axes`` / ``indices`` int ``[N]`` (slice position in the volume)."""

    images: torch.Tensor
    masks: torch.Tensor
    axes: np.ndarray
    indices: np.ndarray


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
        DataError: naming the entry, for a missing, unreadable, truncated or corrupt file, a 2D image, a bad 4D
            frame, NaN voxels, a constant volume or a foreground without intensity range (batch loaders skip
            and list such volumes).
    """
    settings = settings or SliceSettings()
    path = entry.path if isinstance(entry, ADNIEntry) else Path(entry)
    name = entry.describe() if isinstance(entry, ADNIEntry) else f"volume {str(path)!r}"
    try:
        vol, _affine = nifti.load_volume(path, canonical=True, frame=settings.frame)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc
    fg = vol > vol.min()
    why = nifti.constant_reason(vol, fg, settings.pct_lo, settings.pct_hi)
    if why is not None:  # it would become slices of -1 only: an empty "brain" the model would learn from
        raise DataError(f"{name}: {str(path)!r}: {why}; it carries no image (check the file)")
    norm = nifti.robust_normalise(vol, mask=fg, lower=settings.pct_lo, upper=settings.pct_hi)
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


# --------------------------------------------------------------------------------------------- cache
class VolumeSliceCache:
    """On-disk slice cache of many volumes under one :class:`SliceSettings` (layout in the module docstring).

    Args:
        cache_dir: cache root; this settings' files live in ``<cache_dir>/adni_slices_<settings.key()>/``.
        settings: the slicing settings.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], settings: SliceSettings) -> None:
        self.settings = settings
        self.directory = Path(cache_dir) / f"adni_slices_{settings.key()}"
        self.directory.mkdir(parents=True, exist_ok=True)
        settings_file = self.directory / "settings.json"  # for humans: what the hash stands for
        if not settings_file.exists():
            atomic_write_bytes(settings_file, json.dumps(asdict(settings), indent=1).encode())

    @staticmethod
    def stem(entry: ADNIEntry) -> str:
        """``<volume id>_<hash of the file's resolved path, size, mtime and content tag>``: a changed file gets a new
        stem (the tag: :func:`meddiff.data.preprocess.cache.content_tag`, two reads of a few kB)."""
        try:
            st = entry.path.stat()
            tag = content_tag(entry.path, st.st_size)
        except OSError as exc:
            raise DataError(
                f"{entry.describe()}: image file {str(entry.path)!r} not found or unreadable ({exc})"
            ) from exc
        ident = f"{entry.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tag}"
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", entry.volume_id)[-80:]
        return f"{safe}_{hashlib.sha1(ident.encode()).hexdigest()[:12]}"

    def paths(self, stem: str) -> tuple[Path, Path, Path]:
        """``(img, mask, meta)`` file paths of one cached volume."""
        d = self.directory
        return d / f"{stem}.img.npy", d / f"{stem}.mask.npy", d / f"{stem}.meta.npy"

    def prepare(self, entry: ADNIEntry) -> tuple[str, np.ndarray]:
        """``(stem, meta int32 [N, 2])`` of ``entry``, slicing and writing the volume unless it is cached."""
        stem = self.stem(entry)
        img_p, mask_p, meta_p = self.paths(stem)
        if img_p.is_file() and mask_p.is_file() and meta_p.is_file():
            try:
                return stem, np.load(meta_p, allow_pickle=False)
            except (OSError, ValueError):
                pass  # damaged cache file: rebuild below
        vs = volume_slices(entry, self.settings)
        atomic_save_npy(meta_p, vs.meta)
        atomic_save_npy(mask_p, vs.masks.astype(np.uint8))
        atomic_save_npy(img_p, vs.images.astype(np.float32))  # last: its presence marks a complete entry
        return stem, vs.meta

    def open(self, stem: str) -> tuple[np.ndarray, np.ndarray]:
        """Read-only memmaps ``(images float32 [N, 1, S, S], masks uint8 [N, 1, S, S])`` of one cached volume."""
        img_p, mask_p, _ = self.paths(stem)
        return np.load(img_p, mmap_mode="r"), np.load(mask_p, mmap_mode="r")
