"""RSNA Intracranial Hemorrhage (brain CT): the Datasets and the DataModule.

The folder layout is :mod:`meddiff.data.formats.rsna_layout` (the Kaggle download, or
:func:`meddiff.data.synthetic.ct.write_synthetic_rsna`'s output). ``prepare_data`` (rank 0) decodes every DICOM
once (:class:`meddiff.data.preprocess.rsna_slices.RSNAPreprocess`) into the preprocessing cache
(:mod:`meddiff.data.preprocess.cache`, ``<cache_dir>/rsna_ct-<hash12>/``): HU with the 12-bit intercept fix, windows as channels in ``[-1, 1]``, brain
mask from HU, crop to the brain, resize to ``image_size``. Undecodable files, and DICOMs without
``RescaleIntercept`` (ambiguous HU), are skipped and listed in the cache's ``skipped.csv``. Every open compares each
source file's size, mtime and content tag (a hash of its end blocks) with those it was decoded from: changed (e.g. repaired) files are decoded again and
leave the skip list (:mod:`meddiff.data.preprocess.cache`). ``setup`` splits by patient (``PatientID``, falling back to ``StudyInstanceUID``),
deterministically per seed, stratified by "has any hemorrhage", and writes/reuses ``split_file``.

Splits: train = healthy (``any == 0``) slices of train patients; val = all slices of val patients (healthy and
hemorrhage, for thresholds and model selection); test = all slices of test patients. Near-empty slices (brain
fraction < ``min_brain_fraction``) are left out of every split. With ``aucp_holdout: k`` whole train patients
(seeded, until at least ``k`` healthy slices) leave training: their healthy slices are the known-healthy pool of
``val/aucp`` (:mod:`meddiff.data.known_healthy`), so no patient is in both.

Where the data comes from: a given ``root`` is used as is, and a missing one is a :class:`DataError` naming it
(phantoms are written into it only with ``synthetic=true``, an explicit request). ``root: null`` means the synthetic
phantoms at ``synthetic_root`` (written there on first use): how the demos say where synthetic data goes, so that
``data.root=/my/rsna`` on a demo reads real data or fails, never fills that path with phantoms.

Items follow ``docs/contracts.md``: ``image`` float32 ``[C, S, S]`` in ``[-1, 1]``, ``label`` int64 (``any``),
``subtypes`` float32 ``[5]`` (:data:`SUBTYPES` order), ``brain_mask`` bool ``[1, S, S]``, ``mask`` bool
``[1, S, S]`` (only when lesion masks exist, i.e. synthetic data), ``id`` and ``subject`` strings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from meddiff.data.base import SplitDataModule
from meddiff.data.formats.rsna_labels import LABEL_COLUMNS, SUBTYPES
from meddiff.data.formats.rsna_layout import check_rsna_layout, rsna_records
from meddiff.data.preprocess.cache import SliceCache, build_cache, cache_path, source_stamp
from meddiff.data.preprocess.ct_windows import WindowSpec, resolve_windows
from meddiff.data.preprocess.rsna_slices import RSNAPreprocess
from meddiff.data.splits import SPLITS, split_patients_by_positive
from meddiff.errors import ConfigError, DataError
from meddiff.utils.io import atomic_write_csv

__all__ = [
    "CACHE_NAME",
    "RSNADataset",
    "RSNADicomDataset",
    "RSNACTDataModule",
    "split_subjects",
]

log = logging.getLogger(__name__)

CACHE_NAME = "rsna_ct"
_STR_COLUMNS = ("subject", "patient_id", "study_uid", "series_uid", "file", "mask_file")


def _item(
    image: np.ndarray, brain_mask: np.ndarray, mask: np.ndarray | None, labels: np.ndarray, image_id: str,
    subject: str,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "image": torch.from_numpy(np.clip(image.astype(np.float32), -1.0, 1.0)),
        "label": torch.tensor(int(labels[-1]), dtype=torch.int64),
        "subtypes": torch.from_numpy(labels[:-1].astype(np.float32)),
        "brain_mask": torch.from_numpy(np.ascontiguousarray(brain_mask, dtype=bool)),
        "id": image_id,
        "subject": subject,
    }
    if mask is not None:
        item["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
    return item


class RSNADataset(Dataset):
    """Slices read from a finished cache (no DICOM decoding).

    Args:
        cache: the opened :class:`SliceCache`.
        rows: index rows (a subset of ``cache.ok_index``) with columns ``row``, ``id``, ``subject`` and
            :data:`LABEL_COLUMNS`.

    Items: ``image`` float32 ``[C, S, S]`` in ``[-1, 1]``, ``label`` int64 scalar (any), ``subtypes`` float32
    ``[5]``, ``brain_mask`` bool ``[1, S, S]``, ``mask`` bool ``[1, S, S]`` (when the cache has masks), ``id``,
    ``subject``.
    """

    def __init__(self, cache: SliceCache, rows: pd.DataFrame) -> None:
        self.cache = cache
        self.rows = rows["row"].to_numpy(np.int64)
        self.ids = rows["id"].astype(str).tolist()
        self.subjects = rows["subject"].astype(str).tolist()
        self.labels = rows[list(LABEL_COLUMNS)].to_numpy(np.int64)
        self.has_mask = "mask" in cache.arrays

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = int(self.rows[i])
        mask = self.cache.get("mask", r) if self.has_mask else None
        return _item(self.cache.get("image", r), self.cache.get("brain_mask", r), mask, self.labels[i],
                     self.ids[i], self.subjects[i])


class RSNADicomDataset(Dataset):
    """The same items decoded from the DICOM files on every access (no cache): for quick looks and benchmarks.

    A file that fails to decode raises :class:`DataError` here; use the cached :class:`RSNADataset` for training.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], preprocess: RSNAPreprocess) -> None:
        self.records = list(records)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        out = self.preprocess(rec)
        labels = np.array([rec[c] for c in LABEL_COLUMNS], dtype=np.int64)
        return _item(out.arrays["image"], out.arrays["brain_mask"], out.arrays.get("mask"), labels, str(rec["id"]),
                     str(out.meta["subject"]))


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def split_subjects(
    subjects: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """Assign subjects to train/val/test, stratified by whether they have any hemorrhage slice
    (:func:`meddiff.data.splits.split_patients_by_positive`).

    Args:
        subjects: one row per slice with columns ``subject`` and ``any``.
    Returns:
        one row per subject: ``subject``, ``split`` ('train'/'val'/'test'), ``n_slices``, ``n_positive``;
        deterministic for a given set of subjects and seed.
    """
    return split_patients_by_positive(subjects, val_fraction, test_fraction, seed)


class RSNACTDataModule(SplitDataModule):
    """Lightning DataModule for RSNA brain-CT hemorrhage (real Kaggle data or the synthetic stand-in).

    Args:
        root: data folder (layout: :mod:`meddiff.data.formats.rsna_layout`); must exist unless ``synthetic``.
            ``None``: the synthetic phantoms at ``synthetic_root``.
        cache_dir: where caches live (default ``<root>/cache``).
        image_size: output side ``S`` (crop to the brain, then resize).
        windows: window presets / ``[center, width]`` pairs; one channel each (e.g. ``[brain]`` or
            ``[brain, subdural, bone]``).
        min_brain_fraction: slices whose brain mask covers less of the slice are left out of every split.
        crop_to_brain: crop to a square around the brain mask (else pad the whole slice to a square).
        val_fraction, test_fraction: shares of patients per stratum (with / without hemorrhage).
        seed: split seed (and ``max_slices`` subset seed).
        batch_size, num_workers, pin_memory: DataLoader settings.
        max_slices: cap on the number of slices (seeded random subset) for quick runs; null = all.
        synthetic: when the given ``root`` has no ``stage_2_train.csv``, write a synthetic dataset there first (an
            explicit request; without it a missing ``root`` is an error).
        synthetic_root: where synthetic phantoms go when ``root`` is ``None`` (written there on first use).
        synthetic_patients, synthetic_slices_per_patient, synthetic_image_size, synthetic_hemorrhage_fraction,
            synthetic_seed: generator settings (:func:`meddiff.data.synthetic.ct.write_synthetic_rsna`).
        split_file: CSV of the patient split; written when absent, reused when present (so a later eval sees the
            same split). Default ``<cache folder>/split_seed<seed>_val<v>_test<t>.csv``.
        cache_workers: processes for the one-time cache build (default: CPU count, at most 16).
        chunk_size: records per cache chunk (unit of resumption).
        train_healthy_only: train on ``any == 0`` slices only (unsupervised anomaly detection).
        progress: progress bar during the cache build.
        aucp_holdout: healthy training slices held out (whole patients, so at least this many) as the known-healthy
            pool of ``val/aucp``; 0 = off.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        cache_dir: str | os.PathLike | None = None,
        image_size: int = 96,
        windows: WindowSpec | Sequence[WindowSpec] = ("brain",),
        min_brain_fraction: float = 0.05,
        crop_to_brain: bool = True,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_slices: int | None = None,
        synthetic: bool = False,
        synthetic_root: str | os.PathLike | None = None,
        synthetic_patients: int = 24,
        synthetic_slices_per_patient: int = 8,
        synthetic_image_size: int = 128,
        synthetic_hemorrhage_fraction: float = 0.5,
        synthetic_seed: int = 0,
        split_file: str | os.PathLike | None = None,
        cache_workers: int | None = None,
        chunk_size: int = 512,
        train_healthy_only: bool = True,
        progress: bool = True,
        aucp_holdout: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed,
                         val_fraction=val_fraction, test_fraction=test_fraction, aucp_holdout=aucp_holdout)
        self.save_hyperparameters(logger=False)
        if int(image_size) < 8:
            raise ConfigError(f"image_size={image_size} is too small; use >= 8 (e.g. 96, 128 or 256).")
        if not 0.0 <= float(min_brain_fraction) < 1.0:
            raise ConfigError(f"min_brain_fraction={min_brain_fraction} must be in [0, 1).")
        if root is None and synthetic_root is None:
            raise ConfigError(
                "data.root is not set: set it to your RSNA folder (stage_2_train.csv + stage_2_train/*.dcm), or set "
                "data.synthetic_root to a folder where synthetic phantoms may be written."
            )
        self.synthetic_root = Path(synthetic_root) if synthetic_root is not None else None
        self.root = Path(root) if root is not None else self.synthetic_root
        # phantoms are written only where the config says synthetic data goes
        self.may_write_synthetic = bool(synthetic) or root is None or (
            self.synthetic_root is not None and _same_path(self.root, self.synthetic_root)
        )
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / "cache"
        self.image_size = int(image_size)
        self.windows = tuple(resolve_windows(windows))
        self.min_brain_fraction = float(min_brain_fraction)
        self.crop_to_brain = bool(crop_to_brain)
        self.max_slices = None if max_slices is None else int(max_slices)
        self.synthetic = bool(synthetic)
        self.synthetic_args = dict(
            n_patients=int(synthetic_patients), slices_per_patient=int(synthetic_slices_per_patient),
            image_size=int(synthetic_image_size), hemorrhage_fraction=float(synthetic_hemorrhage_fraction),
            seed=int(synthetic_seed),
        )
        self.split_file = Path(split_file) if split_file is not None else None
        self.cache_workers = min(os.cpu_count() or 1, 16) if cache_workers is None else int(cache_workers)
        self.chunk_size = int(chunk_size)
        self.train_healthy_only = bool(train_healthy_only)
        self.progress = bool(progress)
        self.prepare_data_per_node = True
        self.cache: SliceCache | None = None
        self.index: pd.DataFrame | None = None
        self.splits: pd.DataFrame | None = None
        self._records: list[dict[str, Any]] | None = None
        self.datasets: dict[str, RSNADataset] = {}

    # ------------------------------------------------------------------ properties
    @property
    def num_channels(self) -> int:
        """``C``: one channel per window."""
        return len(self.windows)

    @property
    def subtype_names(self) -> tuple[str, ...]:
        """Names of the ``subtypes`` entries, in order."""
        return SUBTYPES

    @property
    def with_masks(self) -> bool:
        """Whether lesion masks exist (``<root>/masks``, synthetic data)."""
        return (self.root / "masks").is_dir()

    def cache_settings(self) -> dict[str, Any]:
        """Everything that changes the cached arrays (hashed into the cache folder name)."""
        return {
            "dataset": CACHE_NAME,
            "version": 1,
            "windows": [list(w) for w in self.windows],
            "image_size": self.image_size,
            "crop_to_brain": self.crop_to_brain,
            "bone_threshold": 300.0,
            "with_masks": self.with_masks,
        }

    def preprocessor(self) -> RSNAPreprocess:
        """The picklable per-record preprocessing used for the cache."""
        return RSNAPreprocess(str(self.root), self.windows, self.image_size, self.crop_to_brain, self.with_masks)

    def records(self) -> list[dict[str, Any]]:
        """Cache records for this configuration (label file parsed once per process)."""
        if self._records is None:
            self._records = rsna_records(self.root, self.max_slices, self.seed, with_masks=self.with_masks)
        return self._records

    def source_stamps(self) -> list[str]:
        """One stamp per record (size, mtime_ns and content tag of its DICOM and lesion mask): changed files are decoded again."""
        return [
            source_stamp(self.root / r["file"], self.root / r["mask_file"] if r.get("mask_file") else None)
            for r in self.records()
        ]

    def cache_folder(self) -> Path:
        """``<cache_dir>/rsna_ct-<hash12>`` for the current settings and records."""
        return cache_path(self.cache_dir, CACHE_NAME, self.cache_settings(), self.records(), self.chunk_size)

    # ------------------------------------------------------------------ Lightning hooks
    def check_root(self) -> None:
        """:class:`DataError` naming a given-but-missing (or incomplete) ``root`` and the fix."""
        try:
            check_rsna_layout(self.root)
        except DataError as e:
            hint = ""
            if self.synthetic_root is not None and not self.may_write_synthetic:
                hint = (f" To use the synthetic phantoms of this config instead, drop the data.root override (they "
                        f"go to data.synthetic_root={str(self.synthetic_root)!r}).")
            raise DataError(f"{e}{hint}") from e

    def prepare_data(self) -> None:
        """Generate synthetic data where allowed and absent, then build (or resume, or refresh) the cache.

        Runs on rank 0 (and from :meth:`setup` when the cache is not open yet). Source files are stat'ed on every
        call: changed ones are decoded again.
        """
        if self.may_write_synthetic and not (self.root / "stage_2_train.csv").is_file():
            from meddiff.data.synthetic.ct import write_synthetic_rsna

            log.info("writing synthetic RSNA data to %s (%s)", self.root, self.synthetic_args)
            write_synthetic_rsna(self.root, **self.synthetic_args)
        self.check_root()
        self.cache = build_cache(
            self.records(), self.preprocessor(), self.cache_dir, CACHE_NAME, self.cache_settings(),
            chunk_size=self.chunk_size, num_workers=self.cache_workers, progress=self.progress,
            str_columns=_STR_COLUMNS, stamps=self.source_stamps(),
        )

    def setup(self, stage: str | None = None) -> None:
        """Open the cache, split by patient (write or reuse ``split_file``) and build the datasets."""
        if self.cache is None:  # opens a finished cache (after checking the source stamps) or builds it
            self.prepare_data()
        assert self.cache is not None
        index = self.cache.ok_index
        keep = index["brain_fraction"].astype(float) >= self.min_brain_fraction
        n_empty = int((~keep).sum())
        if n_empty:
            log.info("RSNA: %d near-empty slice(s) (brain fraction < %g) left out", n_empty, self.min_brain_fraction)
        index = index[keep].reset_index(drop=True)
        if index.empty:
            raise DataError(
                f"no usable slices in {self.cache.path} (all near-empty with min_brain_fraction="
                f"{self.min_brain_fraction}); lower min_brain_fraction or check the data."
            )
        self.splits = self._load_or_make_split(index)
        split_of = dict(zip(self.splits["subject"], self.splits["split"]))
        index["split"] = index["subject"].map(split_of)
        self.index = index
        n_skip = len(self.cache.skipped)
        if n_skip:
            log.warning("RSNA: %d file(s) could not be used, listed in %s", n_skip, self.cache.path / "skipped.csv")
        train = index[index["split"] == "train"]
        if self.aucp_holdout:
            train = self._hold_out_patients(train)
        if self.train_healthy_only:
            train = train[train["any"] == 0]
        self.datasets = {
            "train": RSNADataset(self.cache, train),
            "val": RSNADataset(self.cache, index[index["split"] == "val"]),
            "test": RSNADataset(self.cache, index[index["split"] == "test"]),
        }
        for name, ds in self.datasets.items():
            if len(ds) == 0:
                log.warning("RSNA: the %s split is empty; use more data or other split fractions", name)

    def _hold_out_patients(self, train: pd.DataFrame) -> pd.DataFrame:
        """Train rows minus the held-out patients; their healthy slices become :attr:`known_healthy`."""
        healthy = train[train["any"] == 0]
        _, pos = self.holdout_split(len(healthy), groups=healthy["subject"].astype(str).tolist(),
                                    what="healthy training slices")
        pool = healthy.iloc[pos]
        held_subjects = set(pool["subject"])
        self.known_healthy = RSNADataset(self.cache, pool)
        log.info("RSNA: %d healthy slice(s) of %d train patient(s) held out as the known-healthy pool (aucp_holdout)",
                 len(pool), len(held_subjects))
        return train[~train["subject"].isin(held_subjects)]

    def build_known_healthy(self) -> RSNADataset:
        """The held-out patients' healthy slices (``aucp_holdout``), built by :meth:`setup`."""
        if self.known_healthy is None:
            self.setup()
        assert self.known_healthy is not None
        return self.known_healthy

    def default_split_file(self) -> Path:
        """Split CSV path used when ``split_file`` is not given (inside the cache folder)."""
        assert self.cache is not None
        return self.cache.path / f"split_seed{self.seed}_val{self.val_fraction:g}_test{self.test_fraction:g}.csv"

    def _load_or_make_split(self, index: pd.DataFrame) -> pd.DataFrame:
        path = self.split_file or self.default_split_file()
        if path.is_file():
            saved = pd.read_csv(path, dtype={"subject": str, "split": str})
            if not {"subject", "split"} <= set(saved.columns):
                raise DataError(f"split file {str(path)!r} lacks the columns 'subject' and 'split'; delete it.")
            bad = set(saved["split"]) - set(SPLITS)
            if bad:
                raise DataError(f"split file {str(path)!r} has unknown split names {sorted(bad)}.")
            missing = sorted(set(index["subject"]) - set(saved["subject"]))
            if missing:
                raise DataError(
                    f"split file {str(path)!r} lacks {len(missing)} subject(s) of this data, e.g. {missing[:3]}; it "
                    f"belongs to other data: delete it to re-split, or point split_file elsewhere."
                )
            log.info("RSNA: reusing patient split %s", path)
            return saved
        splits = split_subjects(index[["subject", "any"]], self.val_fraction, self.test_fraction, self.seed)
        atomic_write_csv(path, splits)
        log.info("RSNA: wrote patient split %s (%s)", path, splits["split"].value_counts().to_dict())
        return splits

    def build_dataset(self, split: str) -> RSNADataset:
        """Datasets come from :meth:`setup` (cache, split and filters at once); asking before it is an error."""
        raise DataError(f"call setup() before asking for the {split} split (or its loader).")
