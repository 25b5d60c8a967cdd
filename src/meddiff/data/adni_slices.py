"""ADNI 2D slices from 3D NIfTI volumes (seed 004, classifier-free guided anomaly detection): Dataset + DataModule.

Input: a *task dir* ``<root>/<task>/`` (default task ``2d_cfg_anom_det``) holding ``dataset.json`` (format:
:mod:`meddiff.data.formats.adni_json`). Slicing and the slice cache: :mod:`meddiff.data.preprocess.mri_slices`.

Items follow ``docs/contracts.md``: ``image`` float32 ``[1, S, S]`` in ``[-1, 1]``, ``brain_mask`` bool
``[1, S, S]``, ``class_label`` int64 (0..4 = CN..AD, i.e. ``slice_label - 1``), ``label`` int64 (0 CN, 1 other),
``id`` ``"<volume>:<axis>:<index>"``, ``subject``, ``volume`` (volume id: image path relative to the task dir
without ``.nii[.gz]``), ``axis`` and ``index`` (int64).

Per-volume access (for protocols that work on whole volumes, e.g. guided translation):
:meth:`ADNISliceDataModule.volumes` (one split) and :meth:`ADNISliceDataModule.input_volumes` /
:func:`input_volumes` (an external ``.nii.gz``, ``dataset.json`` or record), each a :class:`Volumes` of
:class:`VolumeSource` whose ``load()`` gives the volume's slices as :class:`VolumeData`.

Errors: a bad ``dataset.json`` entry (missing file, label outside 1-5, 2D image, unreadable, truncated or corrupt
file of any dimensionality, a constant volume) raises a :class:`DataError` naming the entry and the file; building
a dataset over many volumes with ``skip_bad=True`` skips a volume that fails to load, warns once listing all
skipped ones (file and reason) and keeps them in ``.skipped``. The slice cache is keyed by each file's size and
mtime, so a replaced volume is sliced again.

Label-free selection (``aucp_holdout: k > 0``, :mod:`meddiff.data.known_healthy`): whole CN training subjects (all
their slices) are held out of the train split, in a seeded order, until at least ``k`` slices are; they form the
known-healthy pool of ``val/aucp`` and are never trained on. Only subjects whose training volumes are all CN are
candidates. The val/test splits are those without the option.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from meddiff.data.base import SplitDataModule
from meddiff.data.formats.adni_json import (
    CLASS_NAMES,
    ADNIEntry,
    entry_from_dict,
    parse_label,
    read_dataset_json,
    read_json_list,
)
from meddiff.data.formats.nifti import is_nifti, strip_nifti_suffix
from meddiff.data.preprocess.mri_slices import (
    SliceSettings,
    VolumeData,
    VolumeSliceCache,
    VolumeSlices,
    extract_slices,
    slice_range,
    volume_slices,
)
from meddiff.data.splits import SPLITS, split_groups_stratified
from meddiff.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "ADNISliceDataModule",
    "ADNISliceDataset",
    "VolumeSource",
    "Volumes",
    "input_volumes",
    "split_subjects",
    "volume_source",
    # re-exported from their new homes (formats.adni_json, preprocess.mri_slices); kept for one release
    "CLASS_NAMES",
    "ADNIEntry",
    "SliceSettings",
    "VolumeData",
    "VolumeSlices",
    "entry_from_dict",
    "extract_slices",
    "read_dataset_json",
    "slice_range",
    "volume_slices",
]


# ------------------------------------------------------------------------------------------- volumes
@dataclass
class VolumeSource:
    """A volume to evaluate: id, ADNI ``slice_label`` 1..5 (None = unknown), a loader of its slices, a name for
    messages, and its subject (volumes of one subject are resampled together in bootstrap CIs; None = the volume
    is its own subject)."""

    volume_id: str
    slice_label: int | None
    load: Callable[[], VolumeData]
    name: str = ""
    subject: str | None = None

    @property
    def class_name(self) -> str:
        """``CN`` .. ``AD``, or ``?`` when the class is unknown."""
        return CLASS_NAMES[self.slice_label - 1] if self.slice_label else "?"


@dataclass
class Volumes:
    """Volumes of a split or an input.

    Attributes:
        sources: the loadable volumes, in dataset order.
        skipped: ``{"volume": image, "reason": why}`` for volumes that could not be listed or loaded.
        batch: False for one named input volume (a failure is then an error, not a skip).
    """

    sources: list[VolumeSource]
    skipped: list[dict[str, str]] = field(default_factory=list)
    batch: bool = True


def volume_source(entry: ADNIEntry | str | os.PathLike[str], settings: SliceSettings | None = None) -> VolumeSource:
    """A :class:`VolumeSource` that slices ``entry`` (an :class:`ADNIEntry` or a NIfTI path) when loaded (no cache).

    A bare path has an unknown class and the file name without ``.nii[.gz]`` as its id.
    """

    def load() -> VolumeData:
        return volume_slices(entry, settings).to_volume_data()

    if isinstance(entry, ADNIEntry):
        return VolumeSource(entry.volume_id, entry.slice_label, load, entry.describe(), entry.subject)
    path = Path(entry)
    return VolumeSource(strip_nifti_suffix(path.name), None, load, f"volume {str(path)!r}")


def input_volumes(
    spec: Any,
    input_label: Any = None,
    settings: SliceSettings | None = None,
    what: str = "input",
) -> Volumes:
    """Volumes named by an input option (e.g. ``eval.input``), sliced with ``settings``.

    Args:
        spec: a ``.nii``/``.nii.gz`` path, a ``dataset.json`` path (every entry; paths relative to the json's dir),
            a JSON record string or a mapping ``{"image": ..., "label"|"slice_label": 1..5}`` (the seed's
            ``--infDict``; a relative image path is relative to the working dir).
        input_label: class of a bare volume (1..5 or a name), or None (unknown).
        settings: slicing settings (default :class:`SliceSettings()`); use the DataModule's to match training.
        what: the option name used in error messages.

    Returns:
        :class:`Volumes`; bad ``dataset.json`` entries are skipped and listed (``batch=True``), a single volume
        has ``batch=False``.

    Raises:
        DataError: naming ``what``, for a bad single input (missing file, bad record or label) or an unreadable
            json.
    """
    if isinstance(spec, str) and spec.strip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{what}={spec!r} is not a valid JSON record ({exc}); write "
                '{"image": "path/to/vol.nii.gz", "label": 5}'
            ) from exc
    if isinstance(spec, Mapping):
        entry = entry_from_dict(dict(spec), base_dir=".", position=0, check_file=True)
        return Volumes([volume_source(entry, settings)], [], batch=False)
    path = Path(str(spec)).expanduser()
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise DataError(f"{what}={str(path)!r} not found; give a dataset.json, a .nii.gz volume or a record.")
        sources, skipped = [], []
        for i, rec in enumerate(read_json_list(path, what)):
            try:
                entry = entry_from_dict(rec, base_dir=path.parent, position=i, check_file=False)
            except DataError as exc:
                image = rec.get("image") if isinstance(rec, Mapping) else rec
                skipped.append({"volume": str(image), "reason": str(exc)})
                continue
            sources.append(volume_source(entry, settings))
        return Volumes(sources, skipped, batch=True)
    if not is_nifti(path.name):
        raise DataError(f"{what}={str(path)!r} is neither a .nii/.nii.gz volume nor a dataset.json.")
    if not path.is_file():
        raise DataError(f"{what} volume {str(path)!r} not found; check the path.")
    if input_label is None:
        return Volumes([volume_source(path, settings)], [], batch=False)
    lab = parse_label(input_label, f"{what}_label for {str(path)!r}")
    vid = strip_nifti_suffix(path.name)
    entry = ADNIEntry(image=str(path), path=path, slice_label=lab, volume_id=vid, subject=vid)
    return Volumes([volume_source(entry, settings)], [], batch=False)


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


# --------------------------------------------------------------------------------------------- splits
#: deprecated option name -> its name now (stored checkpoints and configs still name the old ones)
RENAMED_OPTIONS: dict[str, str] = {"val_frac": "val_fraction", "test_frac": "test_fraction", "split_seed": "seed"}


def _renamed(owner: str, values: dict[str, Any], defaults: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the deprecated options in ``old`` (those not None) moved to their new names; one warning
    lists them. A deprecated option and its new name given with different values is a :class:`ConfigError`."""
    used = {k: v for k, v in old.items() if v is not None}
    if not used:
        return values
    warnings.warn(
        f"{owner}: deprecated option(s) "
        + ", ".join(f"{k!r} (use {RENAMED_OPTIONS[k]!r})" for k in used)
        + "; rename them in your config",
        FutureWarning,
        stacklevel=3,
    )
    out = dict(values)
    for k, v in used.items():
        new = RENAMED_OPTIONS[k]
        if out[new] != defaults[new] and out[new] != v:
            raise ConfigError(f"{owner}: {new}={out[new]!r} and its deprecated alias {k}={v!r} disagree; keep {new}")
        out[new] = v
    return out


def split_subjects(
    entries: Sequence[ADNIEntry],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    val_frac: float | None = None,
    test_frac: float | None = None,
) -> dict[str, list[ADNIEntry]]:
    """Seeded train/val/test split by subject, stratified by class (:func:`meddiff.data.splits.split_groups_stratified`).

    Subjects (``entry.subject``; all of a subject's volumes stay together) get the most common class of their
    volumes; the split depends only on the set of subjects, not on json order. ``val_frac`` / ``test_frac`` are
    deprecated aliases of ``val_fraction`` / ``test_fraction``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` entries in input order; every entry in exactly one.
    """
    v = _renamed(
        "split_subjects",
        {"val_fraction": val_fraction, "test_fraction": test_fraction},
        {"val_fraction": 0.1, "test_fraction": 0.2},
        {"val_frac": val_frac, "test_frac": test_frac},
    )
    val_fraction, test_fraction = v["val_fraction"], v["test_fraction"]
    names = split_groups_stratified(
        [e.subject for e in entries], [e.slice_label for e in entries], val_fraction, test_fraction, seed
    )
    out: dict[str, list[ADNIEntry]] = {s: [] for s in SPLITS}
    for e, name in zip(entries, names):
        out[name].append(e)
    return out


def _parse_classes(classes: Iterable[int | str] | None) -> frozenset[int] | None:
    if classes is None:
        return None
    if isinstance(classes, (str, int)):
        classes = [classes]
    out = set()
    for c in classes:
        try:
            out.add(parse_label(c, "train_classes"))
        except DataError as exc:
            raise ConfigError(f"{exc} (train_classes takes names CN..AD or slice labels 1..5)") from exc
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
            val and test keep every class.
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
        val_frac, test_frac, split_seed: deprecated aliases of ``val_fraction``, ``test_fraction``, ``seed``
            (named by stored checkpoints and configs); a warning says so.

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
        synthetic: bool = False,
        synthetic_n_per_class: int | Sequence[int] = 4,
        synthetic_shape: Sequence[int] = (64, 64, 64),
        synthetic_seed: int = 0,
        synthetic_atrophy: str = "global",
        cache_dir: str | None = None,
        skip_bad: bool = True,
        return_brain_mask: bool = True,
        aucp_holdout: int = 0,
        val_frac: float | None = None,
        test_frac: float | None = None,
        split_seed: int | None = None,
    ) -> None:
        v = _renamed(
            type(self).__name__,
            {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
            {"val_fraction": 0.1, "test_fraction": 0.2, "seed": 0},
            {"val_frac": val_frac, "test_frac": test_frac, "split_seed": split_seed},
        )
        val_fraction, test_fraction, seed = v["val_fraction"], v["test_fraction"], v["seed"]
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed,
                         val_fraction=val_fraction, test_fraction=test_fraction, aucp_holdout=aucp_holdout)
        # saved under the new names only (the locals above already hold the aliases' values)
        self.save_hyperparameters(ignore=list(RENAMED_OPTIONS), logger=False)
        self.root = Path(root)
        self.task = str(task)
        self.settings = SliceSettings(image_size, lo, hi, tuple(int(a) for a in axes), pct_lo, pct_hi, frame)
        self.train_classes = _parse_classes(train_classes)
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
        if self.json_path.is_file():
            if self.synthetic:
                self._check_synthetic_task()
            return
        if not self.synthetic:
            raise DataError(
                f"{str(self.json_path)!r} not found; point root/task at an ADNI task dir with dataset.json, or set "
                "synthetic=true to generate a synthetic one there"
            )
        from meddiff.data.synthetic.mri import write_synthetic_adni

        write_synthetic_adni(
            self.root,
            self.synthetic_n_per_class,
            self.synthetic_shape,
            self.synthetic_seed,
            task=self.task,
            atrophy=self.synthetic_atrophy,
        )

    def _check_synthetic_task(self) -> None:
        """An existing synthetic task dir must have been written with this config's ``synthetic_*`` options (read
        from its ``synthetic.json``; task dirs written before that file existed are not checked)."""
        record = self.task_dir / "synthetic.json"
        if not record.is_file():
            return
        try:
            written = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(
                f"{str(record)!r} is unreadable ({exc}); delete {str(self.task_dir)!r} to regenerate it"
            ) from exc
        wanted = self._synthetic_options()
        diff = {k: (written.get(k), v) for k, v in wanted.items() if k != "generator" and written.get(k) != v}
        if diff:
            listing = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
            raise ConfigError(
                f"the synthetic task dir {str(self.task_dir)!r} was written with other options ({listing}); "
                "choose another data.task for these options or delete the dir to regenerate it"
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
        """``{"train"|"val"|"test": entries}`` (computed once; ``train_classes`` filters train only)."""
        if self.splits is None:
            self._ensure_task_dir()
            entries = read_dataset_json(self.json_path, check_files=not self.skip_bad)
            splits = split_subjects(entries, self.val_fraction, self.test_fraction, self.seed)
            self._train_non_cn = {e.subject for e in splits["train"] if e.slice_label != 1}
            if self.train_classes is not None:
                splits["train"] = [e for e in splits["train"] if e.slice_label in self.train_classes]
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
