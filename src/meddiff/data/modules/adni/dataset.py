"""ADNI 2D slices of 3D NIfTI volumes as a Dataset (:class:`ADNISliceDataset`).

Items follow ``docs/contracts.md``: ``image`` float32 ``[1, S, S]`` in ``[-1, 1]``, ``brain_mask`` bool
``[1, S, S]``, ``class_label`` int64 (0..4 = CN..AD, i.e. ``slice_label - 1``), ``label`` int64 (0 CN, 1 other),
``id`` ``"<volume>:<axis>:<index>"``, ``subject``, ``volume`` (volume id: image path relative to the task dir
without ``.nii[.gz]``), ``axis`` and ``index`` (int64). Slicing and the slice cache:
:mod:`meddiff.data.preprocess.mri_slices` (keyed by each file's identity, so a replaced volume is sliced again).
"""

from __future__ import annotations

import bisect
import copy
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from meddiff.data.formats.adni_json import ADNIEntry
from meddiff.data.modules.adni.volumes import VolumeSource
from meddiff.data.preprocess.mri_slices import (
    SliceSettings,
    VolumeData,
    VolumeSliceCache,
    VolumeSlices,
    volume_slices,
)
from meddiff.errors import DataError

__all__ = ["ADNISliceDataset"]


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
        settings: the :class:`SliceSettings`. ``cache``: the :class:`VolumeSliceCache` or None;
        ``cache_subdir``: where this dataset's cache files live (None in memory).
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
        self.cache = VolumeSliceCache(cache_dir, self.settings) if cache_dir is not None else None
        self.cache_subdir: Path | None = self.cache.directory if self.cache is not None else None
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

    def _prepare(self, entry: ADNIEntry) -> tuple[str, np.ndarray, VolumeSlices | None]:
        """Return ``(stem, meta, in-memory slices or None)``, extracting the volume unless cached."""
        if self.cache is None:
            vs = volume_slices(entry, self.settings)
            return entry.volume_id, vs.meta, vs
        stem, meta = self.cache.prepare(entry)
        return stem, meta, None

    def _arrays(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is None:
            return self._memory[v].images, self._memory[v].masks
        arr = self._open.get(v)
        if arr is None:
            arr = self.cache.open(self._stems[v])
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

    def volume_sources(self) -> list[VolumeSource]:
        """One :class:`VolumeSource` per kept volume, loading its slices from this dataset (cache or memory)."""

        def loader(idx: range) -> Callable[[], VolumeData]:
            def load() -> VolumeData:
                items = [self[i] for i in idx]
                images = torch.stack([it["image"] for it in items])
                masks = torch.stack(
                    [
                        it["brain_mask"] if "brain_mask" in it else torch.ones_like(it["image"], dtype=torch.bool)
                        for it in items
                    ]
                )
                return VolumeData(
                    images,
                    masks,
                    np.array([int(it["axis"]) for it in items]),
                    np.array([int(it["index"]) for it in items]),
                )

            return load

        return [
            VolumeSource(e.volume_id, int(e.slice_label), loader(self.volume_indices(e.volume_id)), e.describe(),
                         e.subject)
            for e in self.volumes
        ]

    def subset(self, positions: Iterable[int]) -> ADNISliceDataset:
        """A view of the slices of the kept volumes at ``positions`` (into :attr:`volumes`, kept in this dataset's
        order), sharing the slices in memory or the cache (nothing is loaded again); ``skipped`` is carried over."""
        keep = sorted({int(v) for v in positions})
        out = copy.copy(self)
        out.volumes = [self.volumes[v] for v in keep]
        out._meta = [self._meta[v] for v in keep]
        out._stems = [self._stems[v] for v in keep]
        out._memory = [self._memory[v] for v in keep] if self.cache is None else []
        out._open = {}
        out.skipped = list(self.skipped)
        out._offsets = np.concatenate([[0], np.cumsum([len(m) for m in out._meta])]).astype(np.int64)
        return out

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
