"""Denoising pairs from an HDF5 patch file: :class:`PatchDataset` and :class:`HDF5PatchDataModule`.

The file format (reader and validator :func:`inspect_hdf5`) is :mod:`meddiff.data.formats.patch_hdf5`, its writer
:mod:`meddiff.data.preprocess.nifti_patches` (called from ``prepare_data``); the patch grid and stitcher are :mod:`meddiff.patches`; the split is
:func:`meddiff.data.splits.split_groups` by subject.

Batches follow ``docs/contracts.md``: ``image`` (clean) and ``cond`` (clean + Gaussian noise) ``[1, P, P]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from meddiff.data.base import SplitDataModule
from meddiff.data.formats.patch_hdf5 import PatchFileInfo, check_patch_values, inspect_hdf5, recreate_hint
from meddiff.data.preprocess.nifti_patches import save_as_hdf5
from meddiff.data.splits import SPLITS, split_groups, subject_of
from meddiff.data.synthetic.mr_heads import write_synthetic_volumes
from meddiff.errors import ConfigError, DataError

__all__ = ["HDF5PatchDataModule", "PatchDataset", "split_by_volume"]

# per-split offset of the deterministic val/test noise seed
_NOISE_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}


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
        subject_regex: see :class:`HDF5PatchDataModule`.
        info: the file's :class:`PatchFileInfo` if already read (skips re-validating the file).

    Attributes (public): ``info`` (:class:`PatchFileInfo`), ``rows`` (patch rows of the file, int64 ``[len]``),
    ``coords`` (their ``(volume, slice, y, x)``, int64 ``[len, 4]``), ``volumes`` (volume rows used).
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
        self.volumes = (sorted({int(v) for v in volumes}) if volumes is not None
                        else sorted({int(v) for v in self.info.coords[rows, 0]}))
        self.subjects = [subject_of(nm, subject_regex) for nm in self.info.names]
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    @property
    def coords(self) -> np.ndarray:
        """``(volume, slice, y, x)`` of this dataset's patches, int64 ``[len, 4]`` (in item order)."""
        return np.asarray(self.info.coords[self.rows], dtype=np.int64)

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
                f"cannot read patch {row} of {str(self.path)!r} ({exc}); " + recreate_hint(self.path)
            ) from exc
        # a patch overwritten after writing (e.g. 7500.0) must never reach the model
        check_patch_values(arr, self.info.value_range, self.path, row)
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

    :func:`meddiff.data.splits.split_groups` over the subjects of ``names`` (:func:`~meddiff.data.splits.subject_of`).
    A positive fraction gets at least one subject. Returns ``{"train"|"val"|"test": sorted volume rows}``.

    Raises:
        ConfigError: fractions outside [0, 1) or summing to >= 1; a volume name the regex does not match.
        DataError: too few subjects to give train, and every split with a positive fraction, one each.
    """
    subjects = [subject_of(n, subject_regex) for n in names]
    return split_groups(subjects, val_fraction, test_fraction, seed)


class HDF5PatchDataModule(SplitDataModule):
    """Denoising pairs from an HDF5 patch file, split by volume into train / val / test.

    Batches (contract dicts): ``image`` clean ``[B, 1, P, P]`` in [-1, 1], ``cond`` noisy ``[B, 1, P, P]``,
    ``noise_std`` ``[B]``, ``id`` / ``subject`` lists, ``coords`` ``[B, 4]``. Train draws fresh noise each epoch;
    val/test noise is deterministic (seeded per patch), so metrics are comparable across epochs and runs.

    Public API beyond the loaders (used by the denoise protocol): :meth:`noisy_dataset` (a split at any noise
    level), :meth:`split_names`, ``noise_std`` (the training level), ``info`` (:class:`PatchFileInfo`) and
    ``splits`` (volume rows per split), both set once the file has been read.

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
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed,
                         val_fraction=val_fraction, test_fraction=test_fraction)
        self.path = Path(path)
        self.noise_std = noise_std if isinstance(noise_std, (int, float)) else tuple(noise_std)
        _parse_noise_std(self.noise_std)  # fail early on a bad value
        self.expected = {"image_size": image_size, "stride": stride, "axis": axis}
        self.clip_cond = bool(clip_cond)
        self.subject_regex = subject_regex
        self.source = source
        self.synthetic_volumes = int(synthetic_volumes)
        self.synthetic_shape = tuple(int(s) for s in synthetic_shape)
        self.prepare_kwargs = dict(prepare_kwargs or {})
        self.info: PatchFileInfo | None = None
        self.splits: dict[str, list[int]] = {}

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
                shape=self.synthetic_shape,  # type: ignore[arg-type]
                seed=self.seed,
            )
        save_as_hdf5(src, self.path.stem, self.path.parent, filename=self.path.name, **kw)

    def _read_file(self) -> PatchFileInfo:
        """Validate the file and split its volumes (once)."""
        if self.info is None:
            info = inspect_hdf5(self.path, self.expected)
            self.splits = split_by_volume(info.names, self.val_fraction, self.test_fraction, self.seed,
                                          self.subject_regex)
            self.info = info
        return self.info

    def build_dataset(self, split: str) -> PatchDataset:
        """The dataset of one split at the configured noise level (fresh noise for train, fixed for val/test)."""
        return self.noisy_dataset(split)

    def noisy_dataset(
        self,
        split: str,
        noise_std: float | Sequence[float] | None = None,
        deterministic_noise: bool | None = None,
    ) -> PatchDataset:
        """The (noisy, clean) pairs of ``split`` at noise level ``noise_std`` (default: the configured one).

        Same volumes and, per patch, the same noise seed as :meth:`dataset` (``split``), so two levels differ only
        in the noise scale; e.g. for noise-level studies and the denoise protocol. ``deterministic_noise``
        defaults to True except for ``train``.

        Raises:
            ConfigError: unknown split or bad ``noise_std``. DataError: the file is missing / invalid, or too
            few volumes to split.
        """
        if split not in SPLITS:
            raise ConfigError(f"split={split!r} must be 'train', 'val' or 'test'")
        info = self._read_file()
        return PatchDataset(
            self.path,
            noise_std=self.noise_std if noise_std is None else noise_std,
            volumes=self.splits[split],
            seed=self.seed + _NOISE_SEED_OFFSET[split],
            deterministic_noise=(split != "train") if deterministic_noise is None else deterministic_noise,
            clip_cond=self.clip_cond,
            subject_regex=self.subject_regex,
            info=info,
        )

    def split_names(self) -> dict[str, list[str]]:
        """Volume names per split."""
        info = self._read_file()
        return {k: [info.names[v] for v in vs] for k, vs in self.splits.items()}
