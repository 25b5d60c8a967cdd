"""ADNI 2D slices from 3D NIfTI volumes (seed 004, classifier-free guided anomaly detection): the DataModule.

Input: a *task dir* ``<root>/<task>/`` (default task ``2d_cfg_anom_det``) holding ``dataset.json`` (format:
:mod:`meddiff.data.formats.adni_json`). Slicing and the slice cache: :mod:`meddiff.data.preprocess.mri_slices`.

Items: :mod:`meddiff.data.modules.adni.dataset`. Phantoms (``synthetic=true``): :mod:`meddiff.data.synthetic.mri`,
called from ``prepare_data``.

Per-volume access (for protocols that work on whole volumes, e.g. guided translation):
:meth:`ADNISliceDataModule.volumes` (one split) and :meth:`ADNISliceDataModule.input_volumes` /
:func:`meddiff.data.modules.adni.volumes.input_volumes` (an external ``.nii.gz``, ``dataset.json`` or record), each
a :class:`Volumes` of ``VolumeSource`` whose ``load()`` gives the volume's slices as ``VolumeData``.

Errors: a bad ``dataset.json`` entry (missing file, label outside 1-5, 2D image, unreadable, truncated or corrupt
file of any dimensionality, a constant volume) raises a :class:`DataError` naming the entry and the file; building
a dataset over many volumes with ``skip_bad=True`` skips a volume that fails to load, warns once listing all
skipped ones (file and reason) and keeps them in ``.skipped``. The slice cache is keyed by each file's size,
mtime and a hash of its end blocks, so a replaced volume is sliced again.

Label-free selection (``aucp_holdout: k > 0``, :mod:`meddiff.data.known_healthy`): whole CN training subjects (all
their slices) are held out of the train split, in a seeded order, until at least ``k`` slices are; they form the
known-healthy pool of ``val/aucp`` and are never trained on. Only subjects whose training volumes are all CN are
candidates. The val/test splits are those without the option.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.base import SplitDataModule
from meddiff.data.formats.adni_json import CLASS_NAMES, ADNIEntry, parse_label, read_dataset_json
from meddiff.data.modules.adni.dataset import ADNISliceDataset
from meddiff.data.modules.adni.volumes import Volumes, input_volumes
from meddiff.data.preprocess.mri_slices import SliceSettings
from meddiff.data.splits import SPLITS, split_groups_stratified
from meddiff.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["ADNISliceDataModule", "split_subjects"]


# --------------------------------------------------------------------------------------------- splits
def split_subjects(
    entries: Sequence[ADNIEntry],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[ADNIEntry]]:
    """Seeded train/val/test split by subject, stratified by class (:func:`meddiff.data.splits.split_groups_stratified`).

    Subjects (``entry.subject``; all of a subject's volumes stay together) get the most common class of their
    volumes; the split depends only on the set of subjects, not on json order.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` entries in input order; every entry in exactly one.
    """
    names = split_groups_stratified(
        [e.subject for e in entries], [e.slice_label for e in entries], val_fraction, test_fraction, seed
    )
    out: dict[str, list[ADNIEntry]] = {s: [] for s in SPLITS}
    for e, name in zip(entries, names):
        out[name].append(e)
    return out


def _parse_classes(classes: Iterable[int | str] | None, what: str = "train_classes") -> frozenset[int] | None:
    if classes is None:
        return None
    if isinstance(classes, (str, int)):
        classes = [classes]
    out = set()
    for c in classes:
        try:
            out.add(parse_label(c, what))
        except DataError as exc:
            raise ConfigError(f"{exc} ({what} takes names CN..AD or slice labels 1..5)") from exc
    return frozenset(out)


# ------------------------------------------------------------------------------------------ DataModule
class ADNISliceDataModule(SplitDataModule):
    """ADNI slice DataModule for the seed's task dir (``<root>/<task>/dataset.json``).

    Args:
        root: dataset dir (the seed's ``--datasetDir``).
        task: task sub-dir name.
        image_size, lo, hi, axes, pct_lo, pct_hi, frame: slicing settings (:class:`SliceSettings`).
        val_fraction, test_fraction, seed: subject-level stratified split (:func:`split_subjects`).
        batch_size, num_workers, pin_memory: DataLoader settings.
        train_classes: classes kept in the *train* split (names ``"CN"``.. or slice labels 1..5; ``None`` all);
            val and test keep every class unless ``eval_classes`` says otherwise.
        eval_classes: classes kept in the *val* and *test* splits (same names; ``None`` all), e.g. ``[CN, AD]`` for
            image-level anomaly detection with ``label`` 1 = AD (the anomaly protocol, benchmark_uad); the subject
            split is computed before this filter, so the kept subjects are exactly those of the unfiltered splits.
        synthetic: write a synthetic task dir (:func:`meddiff.data.synthetic.mri.write_synthetic_adni`) when
            ``dataset.json`` is missing; ``synthetic_n_per_class`` (one count, or five for CN..AD),
            ``synthetic_shape``, ``synthetic_seed``, ``synthetic_atrophy`` (``"global"`` | ``"matched"``, see
            :data:`meddiff.data.synthetic.mri.ATROPHY`) configure it. An existing synthetic task dir written with
            other options is a :class:`ConfigError` (it would be reused silently otherwise).
        cache_dir: slice cache root (``None``: in-memory per dataset).
        skip_bad: skip volumes that fail to load (listed in ``skipped``) instead of raising.
        return_brain_mask: include ``brain_mask`` in batches.
        aucp_holdout: CN training slices held out (whole subjects whose training volumes are all CN, so at least
            this many) as the known-healthy pool of ``val/aucp``; 0 = off (:mod:`meddiff.data.known_healthy`).

    Attributes:
        datasets: ``{split: ADNISliceDataset}`` once built; ``train_set``, ``val_set``, ``test_set`` name them.
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
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        train_classes: Sequence[int | str] | None = None,
        eval_classes: Sequence[int | str] | None = None,
        synthetic: bool = False,
        synthetic_n_per_class: int | Sequence[int] = 4,
        synthetic_shape: Sequence[int] = (64, 64, 64),
        synthetic_seed: int = 0,
        synthetic_atrophy: str = "global",
        cache_dir: str | None = None,
        skip_bad: bool = True,
        return_brain_mask: bool = True,
        aucp_holdout: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed,
                         val_fraction=val_fraction, test_fraction=test_fraction, aucp_holdout=aucp_holdout)
        self.save_hyperparameters(logger=False)
        self.root = Path(root)
        self.task = str(task)
        self.settings = SliceSettings(image_size, lo, hi, tuple(int(a) for a in axes), pct_lo, pct_hi, frame)
        self.train_classes = _parse_classes(train_classes)
        self.eval_classes = _parse_classes(eval_classes, "eval_classes")
        self.synthetic = bool(synthetic)
        n = synthetic_n_per_class
        self.synthetic_n_per_class: Any = n if isinstance(n, (int, np.integer, str)) else tuple(n)
        self.synthetic_shape = tuple(int(s) for s in synthetic_shape)
        self.synthetic_seed = int(synthetic_seed)
        self.synthetic_atrophy = str(synthetic_atrophy)
        if self.synthetic:
            self._synthetic_options()  # a bad synthetic_* option fails here, not at the first prepare_data
        self.cache_dir = None if cache_dir in (None, "") else str(cache_dir)
        self.skip_bad = bool(skip_bad)
        self.return_brain_mask = bool(return_brain_mask)
        self.splits: dict[str, list[ADNIEntry]] | None = None
        #: subjects with a non-CN volume in the train split before ``train_classes`` (never held out as healthy)
        self._train_non_cn: set[str] = set()
        self.datasets: dict[str, ADNISliceDataset] = {}
        self.skipped: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ paths and datasets
    @property
    def task_dir(self) -> Path:
        """``<root>/<task>``."""
        return self.root / self.task

    @property
    def json_path(self) -> Path:
        return self.task_dir / "dataset.json"

    @property
    def train_set(self) -> ADNISliceDataset | None:
        return self.datasets.get("train")

    @property
    def val_set(self) -> ADNISliceDataset | None:
        return self.datasets.get("val")

    @property
    def test_set(self) -> ADNISliceDataset | None:
        return self.datasets.get("test")

    def _synthetic_options(self) -> dict[str, Any]:
        from meddiff.data.synthetic.mri import synthetic_options

        return synthetic_options(
            self.synthetic_n_per_class, self.synthetic_shape, self.synthetic_seed, atrophy=self.synthetic_atrophy
        )

    def _ensure_task_dir(self) -> None:
        """A task dir with ``dataset.json``; with ``synthetic=true`` the phantom writer makes (or checks) it."""
        if self.synthetic:
            from meddiff.data.synthetic.mri import ensure_synthetic_adni

            ensure_synthetic_adni(self.root, self.task, self.synthetic_n_per_class, self.synthetic_shape,
                                  self.synthetic_seed, atrophy=self.synthetic_atrophy)
        elif not self.json_path.is_file():
            raise DataError(
                f"{str(self.json_path)!r} not found; point root/task at an ADNI task dir with dataset.json, or set "
                "synthetic=true to generate a synthetic one there"
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

    def split_entries(self) -> dict[str, list[ADNIEntry]]:
        """``{"train"|"val"|"test": entries}`` (computed once; ``train_classes`` filters train only,
        ``eval_classes`` val and test)."""
        if self.splits is None:
            self._ensure_task_dir()
            entries = read_dataset_json(self.json_path, check_files=not self.skip_bad)
            splits = split_subjects(entries, self.val_fraction, self.test_fraction, self.seed)
            self._train_non_cn = {e.subject for e in splits["train"] if e.slice_label != 1}
            if self.train_classes is not None:
                splits["train"] = [e for e in splits["train"] if e.slice_label in self.train_classes]
            if self.eval_classes is not None:
                for name in ("val", "test"):
                    splits[name] = [e for e in splits[name] if e.slice_label in self.eval_classes]
            self.splits = splits
        return self.splits

    def build_dataset(self, split: str) -> ADNISliceDataset:
        """The :class:`ADNISliceDataset` of one split (an empty train split is a :class:`DataError`)."""
        entries = self.split_entries()[split]
        if split == "train" and not entries:
            raise DataError(
                f"the train split is empty (train_classes={sorted(self.train_classes or [])}); add volumes "
                "or widen train_classes"
            )
        ds = self._dataset(entries)
        if split == "train" and self.aucp_holdout:
            ds = self._hold_out_subjects(ds)
        return ds

    def _hold_out_subjects(self, train: ADNISliceDataset) -> ADNISliceDataset:
        """``train`` minus the held-out CN subjects (``aucp_holdout``); their slices become :attr:`known_healthy`."""
        candidates = [v for v, e in enumerate(train.volumes)
                      if e.slice_label == 1 and e.subject not in self._train_non_cn]
        if not candidates:
            raise ConfigError(
                f"data.aucp_holdout={self.aucp_holdout}: the train split has no CN subject to hold out as the "
                f"known-healthy pool (train_classes={sorted(self.train_classes or [])}; only subjects whose "
                "training volumes are all CN qualify); set data.aucp_holdout=0 or add CN volumes."
            )
        per_volume = np.diff(train._offsets)  # slices of each kept volume
        groups = [train.volumes[v].subject for v in candidates for _ in range(int(per_volume[v]))]
        _, pos = self.holdout_split(len(groups), groups=groups, what="healthy (CN) training slices")
        held = {groups[i] for i in pos}
        pool = [v for v, e in enumerate(train.volumes) if e.subject in held]
        known = train.subset(pool)
        known.skipped = []  # the train split's skipped volumes stay listed with the train split
        self.known_healthy = known
        log.info("ADNI: %d CN slice(s) of %d train subject(s) held out as the known-healthy pool (aucp_holdout)",
                 len(known), len(held))
        return train.subset(v for v in range(len(train.volumes)) if train.volumes[v].subject not in held)

    def build_known_healthy(self) -> ADNISliceDataset:
        """The held-out CN subjects' slices (``aucp_holdout``), built with the train split."""
        self.dataset("train")
        assert self.known_healthy is not None
        return self.known_healthy

    # ------------------------------------------------------------------ per-volume access
    def volumes(self, split: str) -> Volumes:
        """The volumes of one split (built on first use), each loading its slices from the split's dataset;
        ``skipped`` lists the split's volumes that failed to load."""
        ds = self.dataset(split)
        return Volumes(ds.volume_sources(), [{"volume": img, "reason": why} for img, why in ds.skipped], True)

    def input_volumes(self, spec: Any, input_label: Any = None, what: str = "input") -> Volumes:
        """:func:`input_volumes` sliced with this DataModule's settings (so slices match training); needs no
        training data."""
        return input_volumes(spec, input_label, self.settings, what)
