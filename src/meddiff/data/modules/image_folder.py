"""``ImageFolderAnomalyDataModule``: Brainomaly / BMAD image folders (``meddiff.data.formats.folder_layout``) as pools.

Pools (``pool_dataset(name)`` / ``pool_loader(name)``):

- ``known_healthy``: known-healthy training images (``train/neg`` or ``train/good``) minus the held-out part;
- ``known_healthy_val``: ``val_fraction`` of the known-healthy *subjects*, held out for validation (AUCp label 0);
- ``mixed``: the unannotated pool (Brainomaly ``train/pos`` + ``train/neg_mixed``; BMAD: ``valid/``), **label-blind
  by construction**: its items carry no ``label`` key, their ids and subjects do not name the label folder and the
  pool is ordered by (subject, file name) whatever folder holds an image (``formats.folder_layout``), so moving
  files between ``train/pos`` and ``train/neg_mixed`` leaves its items, order and seeded batches bit-identical;
  its dataset's records carry no label either (``label=-1``);
- ``mixed_labelled``: the same images, same order, with their folder labels, for scoring the transductive protocol
  only (or :meth:`ImageFolderAnomalyDataModule.unannotated_labels`, the id -> label map);
- ``labelled_val``: a labelled validation set (Brainomaly ``val/pos`` + ``val/neg``, BMAD ``valid/``), if present;
- ``test``: the labelled test set.

Lightning splits: ``train`` = ``known_healthy`` (with ``train_pools=[known_healthy, mixed]`` the training loader is
``{"known_healthy": loader, "mixed": loader}``, cycled to the longer one, for the coarse GAN; ``hflip=true``: each
training image flipped left-right with probability 1/2, as Brainomaly's official training does, drawn from
(seed, epoch, pool index) by :class:`FlipSampler`, so flips are label-blind and resumable; never in validation, test
or the protocols' pools); ``val`` = a list of
loaders ``[known_healthy_val, mixed, labelled_val]`` (those that exist), each item tagged ``pool`` =
``known_healthy`` / ``unannotated`` / ``labelled`` (``meddiff.models.validation``); ``test`` = ``test``; selection on
labelled validation (``val_labelled_dataloader``, the anomaly protocol) reads ``labelled_val`` when it exists.

Items (dicts, ``docs/contracts.md``): ``image [C, H, W]`` float32 in ``[-1, 1]``, ``id``, ``subject``, ``pool``,
``label`` (int64, only where labels may be seen), ``mask`` (bool ``[1, H, W]``, labelled pools with masks: BMAD
``anomaly_mask`` folders; Brainomaly ``val/anomaly_mask`` / ``test/anomaly_mask`` holding the masks of ``val/pos`` /
``test/pos`` under the image's file name, BMAD-like; healthy images get an empty mask),
``brain_mask`` (bool ``[1, H, W]``, ``foreground_mask=true``: pixels above the image minimum).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from meddiff.data.base import SplitDataModule, dict_loader
from meddiff.data.formats.folder_layout import (
    DEFAULT_SUBJECT_REGEX,
    FolderIndex,
    ImageRecord,
    check_subject_overlap,
    scan_image_folder,
)
from meddiff.data.formats.raster import read_image, read_size
from meddiff.data.preprocess.intensity import scale_intensity
from meddiff.data.resumable import EpochShuffleSampler, ResumableLoader
from meddiff.data.splits import split_groups
from meddiff.errors import ConfigError, DataError

log = logging.getLogger(__name__)

POOL_NAMES = ("known_healthy", "known_healthy_val", "mixed", "mixed_labelled", "labelled_val", "test")
TRAIN_POOLS = ("known_healthy", "mixed")
#: pools Lightning's validation can serve (``val_pools``)
VAL_POOLS = ("known_healthy_val", "mixed", "labelled_val")
#: the ``pool`` tag items carry (the vocabulary of meddiff.models.validation)
_TAG = {"known_healthy": "known_healthy", "known_healthy_val": "known_healthy", "mixed": "unannotated",
        "mixed_labelled": "labelled", "labelled_val": "labelled", "test": "labelled"}


class ImageFolderDataset(Dataset):
    """Images of a list of records, preprocessed to ``[C, H, W]`` in ``[-1, 1]`` (see the module docstring).

    Args:
        records: the images. pool: the ``pool`` tag of every item. with_labels: put ``label`` into items.
        channels: 1 (RGB -> luminance) or 3 (gray repeated). crop: centre crop (px) before resizing.
        image_size: resize to ``image_size`` x ``image_size`` (None = keep; then all sizes must agree).
        intensity, percentiles: see ``scale_intensity``. with_masks: read ``mask`` (records without one: zeros).
        foreground_mask: add ``brain_mask`` = pixels above the image's minimum (background of skull-stripped MRI).
        cache: keep preprocessed images in memory after the first read.
    """

    def __init__(self, records: Sequence[ImageRecord], pool: str, with_labels: bool, channels: int = 1,
                 crop: int | None = None, image_size: int | None = None, intensity: str = "auto",
                 percentiles: Sequence[float] = (1.0, 99.0), with_masks: bool = False, foreground_mask: bool = False,
                 cache: bool = False) -> None:
        self.records = list(records)
        self.pool, self.with_labels, self.channels = pool, with_labels, int(channels)
        self.crop, self.image_size = crop, image_size
        self.intensity, self.percentiles = intensity, tuple(percentiles)
        self.with_masks, self.foreground_mask = with_masks, foreground_mask
        self._cache: dict[int, dict[str, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def _geometry(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Centre crop then resize ``[C, H, W]``."""
        if self.crop is not None:
            h, w = x.shape[-2:]
            c = int(self.crop)
            if c > min(h, w):
                raise DataError(f"data.crop={c} is larger than an image of {h}x{w}; lower data.crop.")
            top, left = (h - c) // 2, (w - c) // 2
            x = x[:, top : top + c, left : left + c]
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            size = (int(self.image_size), int(self.image_size))
            if mode == "nearest":
                x = F.interpolate(x[None].float(), size=size, mode="nearest")[0]
            else:
                x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        return x

    def _image(self, rec: ImageRecord) -> tuple[torch.Tensor, torch.Tensor | None]:
        arr = read_image(rec.path)
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        x = torch.from_numpy(np.ascontiguousarray(scale_intensity(arr, self.intensity, self.percentiles)))
        x = x.permute(2, 0, 1)  # [C, H, W]
        if self.channels == 1 and x.shape[0] == 3:
            x = (0.299 * x[0:1] + 0.587 * x[1:2] + 0.114 * x[2:3])
        elif self.channels == 3 and x.shape[0] == 1:
            x = x.repeat(3, 1, 1)
        fg = None
        if self.foreground_mask:
            fg = self._geometry((x.amax(0, keepdim=True) > x.min() + 1e-3).float(), "nearest") > 0.5
        return self._geometry(x, "bilinear").clamp(-1.0, 1.0).float(), fg

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._cache is not None and i in self._cache:
            return dict(self._cache[i])
        rec = self.records[i]
        image, fg = self._image(rec)
        item: dict[str, Any] = {"image": image, "id": rec.id, "subject": rec.subject, "pool": self.pool}
        if self.with_labels:
            item["label"] = torch.tensor(rec.label, dtype=torch.long)
        if self.with_masks:
            if rec.mask_path is not None:
                m = torch.from_numpy(np.ascontiguousarray(read_image(rec.mask_path)[:, :, 0] > 0))[None].float()
                item["mask"] = self._geometry(m, "nearest") > 0.5
            else:
                item["mask"] = torch.zeros(1, *image.shape[-2:], dtype=torch.bool)
        if fg is not None:
            item["brain_mask"] = fg
        if self._cache is not None:
            self._cache[i] = item
        return dict(item)


#: item keys that are images of the slice (flipped together)
FLIP_KEYS = ("image", "mask", "brain_mask")


class FlipSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` whose indices also carry a horizontal-flip bit: ``i + n`` = item ``i`` flipped.

    The order and the flips of epoch ``e`` come from ``(seed, e)`` alone (the flip of item ``i`` is a fair coin of
    ``(seed, e)`` indexed by ``i``, the item's place in the label-blind pool order), so a resumed run flips exactly as
    an uninterrupted one, and the indices stay plain integers (workers and Lightning's sampler wrappers pass them on).
    """

    def flips(self, epoch: int) -> torch.Tensor:
        """``[n]`` bool: which items epoch ``epoch`` flips."""
        seed = int(np.random.SeedSequence([self.seed, int(epoch), 0xF1]).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.rand(self.n, generator=torch.Generator().manual_seed(seed)) < 0.5

    def __iter__(self):  # noqa: ANN204 - Iterator[int]
        start, self.start = self.start, 0
        flips = self.flips(self.epoch)
        for i in self.order(self.epoch)[start:]:
            yield i + self.n * int(flips[i])


class HFlipped(Dataset):
    """A pool's dataset indexed by :class:`FlipSampler`: index ``i + n`` is item ``i`` with ``FLIP_KEYS`` flipped
    left-right (``[C, H, W]`` along ``W``); ``len`` is the pool's."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, j: int) -> dict[str, Any]:
        n = len(self)
        item = self.dataset[j % n]
        if j >= n:  # new tensors: a cached item is never modified
            item = {k: (torch.flip(v, dims=(-1,)) if k in FLIP_KEYS and torch.is_tensor(v) else v)
                    for k, v in item.items()}
        return item


#: Brainomaly layout: the folder beside ``<split>/pos`` holding its images' lesion masks (BMAD's name)
BRAINOMALY_MASK_FOLDER = "anomaly_mask"


def brainomaly_masks(index: FolderIndex) -> FolderIndex:
    """``index`` with the lesion masks of the labelled Brainomaly groups (``val``, ``test``): a ``<split>/anomaly_mask``
    folder holds one mask per ``<split>/pos`` image, under the image's file name. Never for the unannotated mixed
    set (its labels stay unread). DataError when the folder exists but misses a positive image's mask."""
    records, has_masks = list(index.records), dict(index.has_masks)
    for group in ("val", "test"):
        folder = index.root / group / BRAINOMALY_MASK_FOLDER
        if not folder.is_dir():
            continue
        missing = []
        for k, r in enumerate(records):
            if r.group != group or r.label != 1:
                continue
            path = folder / r.path.name
            if not path.is_file():
                missing.append(r.path.name)
            records[k] = dataclasses.replace(r, mask_path=path)
        if missing:
            raise DataError(f"{len(missing)} images in {index.root / group / 'pos'} have no mask in {folder} "
                            f"({', '.join(missing[:5])}); add the masks (same file name) or set data.use_masks=false.")
        has_masks[group] = True
    return dataclasses.replace(index, records=records, has_masks=has_masks)


class ImageFolderAnomalyDataModule(SplitDataModule):
    """Brainomaly / BMAD image folders for anomaly detection with an unannotated pool (see the module docstring).

    Args:
        root: the data folder. layout: ``auto`` | ``brainomaly`` | ``bmad``.
        channels: 1 or 3. image_size: square resize (px) or None. crop: centre crop (px) before resizing or None.
        intensity: ``auto`` | ``dtype`` | ``minmax`` | ``percentile`` (with ``percentiles``).
        subject_regex: captures the subject id from a file name without extension (``<subject>__<nnn>``);
            unmatched names are their own subject (warned once).
        allow_subject_overlap: a subject in two groups is an error unless true (then a warning).
        val_fraction: share of known-healthy subjects held out for validation (AUCp's known-healthy side).
        train_pools: ``[known_healthy]`` (the refiner, diffusion models) or ``[known_healthy, mixed]`` (the GAN).
        val_max_per_pool: at most this many images per validation pool (a fixed seeded subset), or None.
        val_pools: the pools of Lightning's validation loaders (a subset of ``known_healthy_val``, ``mixed``,
            ``labelled_val``, each must exist), or None for all that exist (:meth:`val_loader_pools`); e.g.
            ``[labelled_val]`` for a labelled-selection model (val/auroc, val/loss from one loader: benchmark_uad).
        use_masks: read the ``anomaly_mask`` folders (BMAD; Brainomaly ``val/`` and ``test/``).
        foreground_mask: add ``brain_mask`` to items.
        hflip: flip each training image left-right with probability 1/2 (Brainomaly's official training
            augmentation; training loaders only, per epoch from the seed: :class:`FlipSampler`).
        cache: keep preprocessed images in memory. synthetic: kwargs of
            ``meddiff.data.synthetic.lesion_folders.write_synthetic_image_folder`` to write a phantom set into
            ``root`` when it has none (demos and tests), or None.
        batch_size, num_workers, pin_memory, seed, seeded_shuffle: ``SplitDataModule``'s.
    """

    def __init__(self, root: str, layout: str = "auto", channels: int = 1, image_size: int | None = None,
                 crop: int | None = None, intensity: str = "auto", percentiles: Sequence[float] = (1.0, 99.0),
                 subject_regex: str | None = DEFAULT_SUBJECT_REGEX, allow_subject_overlap: bool = False,
                 val_fraction: float = 0.1, train_pools: Sequence[str] = ("known_healthy",),
                 val_max_per_pool: int | None = None, use_masks: bool = True, foreground_mask: bool = False,
                 cache: bool = False, hflip: bool = False, synthetic: dict[str, Any] | None = None,
                 val_pools: Sequence[str] | None = None,
                 batch_size: int = 16,
                 num_workers: int = 0, pin_memory: bool = False, seed: int = 0, seeded_shuffle: bool = True) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed,
                         val_fraction=val_fraction, test_fraction=0.0, seeded_shuffle=seeded_shuffle)
        if int(channels) not in (1, 3):
            raise ConfigError(f"data.channels={channels} must be 1 (grayscale) or 3 (RGB).")
        for name, v in (("image_size", image_size), ("crop", crop), ("val_max_per_pool", val_max_per_pool)):
            if v is not None and (isinstance(v, bool) or int(v) < 1):
                raise ConfigError(f"data.{name}={v!r} must be a positive integer or null.")
        pools = [str(p) for p in train_pools]
        if "known_healthy" not in pools or not set(pools) <= set(TRAIN_POOLS):
            raise ConfigError(f"data.train_pools={pools} must be [known_healthy] (refiner, diffusion models) or "
                              "[known_healthy, mixed] (the coarse GAN).")
        self.root = Path(str(root)).expanduser()
        self.layout, self.channels = layout, int(channels)
        self.image_size = None if image_size is None else int(image_size)
        self.crop = None if crop is None else int(crop)
        self.intensity, self.percentiles = intensity, tuple(float(p) for p in percentiles)
        self.subject_regex, self.allow_subject_overlap = subject_regex, bool(allow_subject_overlap)
        self.train_pools = tuple(pools)
        if val_pools is not None and (isinstance(val_pools, str) or not val_pools
                                      or not {str(p) for p in val_pools} <= set(VAL_POOLS)):
            raise ConfigError(f"data.val_pools={val_pools!r} must be null or a non-empty list of {list(VAL_POOLS)}.")
        self.val_pools = None if val_pools is None else tuple(str(p) for p in val_pools)
        self.val_max_per_pool = None if val_max_per_pool is None else int(val_max_per_pool)
        self.use_masks, self.foreground_mask, self.cache = bool(use_masks), bool(foreground_mask), bool(cache)
        if not isinstance(hflip, bool):
            raise ConfigError(f"data.hflip={hflip!r} must be true or false.")
        self.hflip = hflip
        self.synthetic = None if synthetic is None else dict(synthetic)
        self.index: FolderIndex | None = None
        self._pools: dict[str, ImageFolderDataset] = {}

    # -------------------------------------------------------------------------------- files
    def prepare_data(self) -> None:
        """Write the synthetic phantom set into ``root`` when configured and not there yet."""
        if self.synthetic is not None:
            from meddiff.data.synthetic.lesion_folders import write_synthetic_image_folder

            write_synthetic_image_folder(self.root, **self.synthetic)

    def _build_index(self) -> FolderIndex:
        if self.index is not None:
            return self.index
        if self.synthetic is not None:
            self.prepare_data()  # idempotent; makes setup() alone enough (tests, eval on a fresh machine)
        index = scan_image_folder(self.root, self.layout, self.subject_regex, use_masks=self.use_masks)
        if index.layout == "brainomaly" and self.use_masks:
            index = brainomaly_masks(index)
        if index.unparsed_subjects:
            log.warning("%d image name(s) under %s carry no subject id (%s does not match, e.g. %r): each such image "
                        "is its own subject, so subject-level scores and the leakage check cannot group its slices. "
                        "Name 3D slices <subject>__<nnn>.png or set data.subject_regex.",
                        len(index.unparsed_subjects), self.root, self.subject_regex, index.unparsed_subjects[0])
        check_subject_overlap(index, allow=self.allow_subject_overlap)
        self._check_sizes(index)
        self.index = index
        return index

    def _check_sizes(self, index: FolderIndex) -> None:
        """All images must end up one size: equal on disk, or made equal by ``image_size``."""
        if self.image_size is not None:
            return
        sizes: dict[tuple[int, int], str] = {}
        for r in index.records:
            hw = read_size(r.path)
            if self.crop is not None:
                hw = (self.crop, self.crop)
            sizes.setdefault(hw, r.id)
            if len(sizes) > 1:
                listing = ", ".join(f"{h}x{w} ({rid})" for (h, w), rid in sizes.items())
                raise DataError(f"images under {self.root} have different sizes: {listing}. Set data.image_size "
                                "(and/or data.crop) so they are resized to one size.")

    # -------------------------------------------------------------------------------- pools
    def _records(self, name: str) -> list[ImageRecord]:
        index = self._build_index()
        if name in ("known_healthy", "known_healthy_val"):
            kh = index.group("known_healthy")
            if not self.val_fraction:
                return kh if name == "known_healthy" else []
            parts = split_groups([r.subject for r in kh], self.val_fraction, 0.0, seed=self.seed)
            return [kh[i] for i in parts["train" if name == "known_healthy" else "val"]]
        if name in ("mixed", "mixed_labelled"):
            return index.group("mixed") if index.layout == "brainomaly" else index.group("val")
        if name == "labelled_val":
            return index.group("val")
        if name == "test":
            return index.group("test")
        raise ConfigError(f"pool {name!r} is unknown; choose one of {list(POOL_NAMES)}.")

    def unannotated_labels(self) -> dict[str, int]:
        """``{id: folder label}`` of the unannotated pool (0 healthy, 1 diseased): for scoring the transductive
        protocol only; never for training or selection."""
        return {r.id: int(r.label) for r in self._records("mixed_labelled")}

    def has_pool(self, name: str) -> bool:
        """Whether the data has images for pool ``name``."""
        return len(self._records(name)) > 0

    def pool_dataset(self, name: str) -> ImageFolderDataset:
        """The dataset of one pool (built once). ``mixed`` items carry no ``label``."""
        if name not in self._pools:
            records = self._records(name)
            if not records:
                raise DataError(f"{self.root} has no images for pool {name!r}"
                                + (" (no test/ folder)" if name == "test" else "") + ".")
            index = self._build_index()
            group = "val" if name == "labelled_val" or (name.startswith("mixed") and index.layout == "bmad") else \
                ("test" if name == "test" else "")
            with_labels = name != "mixed"
            if not with_labels:  # the unannotated pool's records keep no label either (only the image's path)
                records = [dataclasses.replace(r, label=-1, folder=r.folder.split("/")[0], mask_path=None)
                           for r in records]
            self._pools[name] = ImageFolderDataset(
                records, _TAG[name], with_labels=with_labels, channels=self.channels, crop=self.crop,
                image_size=self.image_size, intensity=self.intensity, percentiles=self.percentiles,
                with_masks=with_labels and index.has_masks.get(group, False), foreground_mask=self.foreground_mask,
                cache=self.cache)
        return self._pools[name]

    def pool_loader(self, name: str, shuffle: bool = False, max_items: int | None = None) -> DataLoader:
        """A loader over one pool; ``max_items`` takes a fixed seeded subset."""
        ds: Dataset = self.pool_dataset(name)
        if max_items is not None and len(ds) > max_items:
            keep = np.sort(np.random.default_rng([self.seed, POOL_NAMES.index(name)]).choice(len(ds), max_items,
                                                                                              replace=False))
            ds = torch.utils.data.Subset(ds, keep.tolist())
        return dict_loader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                           pin_memory=self.pin_memory, seed=self.seed if (shuffle and self.seeded_shuffle) else None)

    # -------------------------------------------------------------------------------- Lightning
    def build_dataset(self, split: str) -> Dataset:
        name = {"train": "known_healthy", "val": "known_healthy_val", "test": "test"}[split]
        if split == "val" and not self.has_pool(name):
            name = "known_healthy"
        return self.pool_dataset(name)

    def _train_loader(self, name: str) -> DataLoader:
        """The shuffled training loader of one pool; with ``hflip`` its items are flipped by :class:`FlipSampler`."""
        if not self.hflip:
            return self.pool_loader(name, shuffle=True)
        ds = self.pool_dataset(name)
        # as dict_loader: the seed is data.seed when seeded_shuffle, else one from torch's global RNG
        seed = self.seed if self.seeded_shuffle else int(torch.randint(0, 2**62, ()).item())
        return ResumableLoader(HFlipped(ds), batch_size=self.batch_size, seed=seed, sampler=FlipSampler(len(ds), seed),
                               num_workers=self.num_workers, pin_memory=self.pin_memory,
                               persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader | dict[str, DataLoader]:
        if self.train_pools == ("known_healthy",):
            return self._train_loader("known_healthy")
        return {p: self._train_loader(p) for p in self.train_pools}

    def val_loader_pools(self) -> list[str]:
        """Pools of the validation loaders, in order (``val_pools`` when given, each checked to exist)."""
        if self.val_pools is not None:
            missing = [p for p in self.val_pools if not self.has_pool(p)]
            if missing:
                raise DataError(f"data.val_pools={list(self.val_pools)}: {self.root} has no images for {missing}; "
                                "drop them from data.val_pools (or null for every pool the data has).")
            return list(self.val_pools)
        pools = []
        if self.has_pool("known_healthy_val"):
            pools.append("known_healthy_val")
        else:
            log.warning("data.val_fraction=0: validation AUCp scores the known-healthy *training* images as its "
                        "healthy side, which flatters models that fit them.")
            pools.append("known_healthy")
        pools.append("mixed")
        if self.has_pool("labelled_val"):
            pools.append("labelled_val")
        return pools

    def val_dataloader(self) -> list[DataLoader]:
        return [self.pool_loader(p, max_items=self.val_max_per_pool) for p in self.val_loader_pools()]

    def val_labelled_dataloader(self) -> DataLoader:
        """What selection on labelled validation reads (the anomaly protocol): the labelled validation set
        (``labelled_val``: Brainomaly ``val/pos`` + ``val/neg``, BMAD ``valid/``) when the data has one, else the
        val split as every SplitDataModule (the held-out known-healthy images, all healthy)."""
        if self.has_pool("labelled_val"):
            return self.pool_loader("labelled_val")
        return super().val_labelled_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.pool_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.pool_loader("test")
