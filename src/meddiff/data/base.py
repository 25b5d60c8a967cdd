"""SplitDataModule: what every meddiff DataModule shares.

Hyperparameters saved (so a checkpoint can rebuild the data), the batch / worker / fraction checks written once,
``datasets[split]`` for ``train`` / ``val`` / ``test``, and the four loaders (``predict`` = test) from one recipe:
dict batches, default collate, persistent workers, seeded shuffling.

A subclass implements :meth:`build_dataset` (one split) and, if it needs one, :meth:`prepare_data`.

``aucp_holdout: k > 0`` (label-free selection, ``val/aucp``; :mod:`meddiff.data.known_healthy`): ``k`` healthy
training images are held out of training as the known-healthy pool, and :meth:`val_dataloader` returns two loaders,
``[val split tagged as the unannotated pool, known-healthy pool]``. A subclass supporting it builds its training
split without them (:meth:`holdout_split` gives the positions) and implements :meth:`build_known_healthy`.
Selection on labelled validation data (the evaluation protocols) reads :meth:`val_labelled_dataloader`, the val
split alone, whatever ``aucp_holdout`` is.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from meddiff.data.known_healthy import KNOWN_HEALTHY, PoolTagged, check_holdout, holdout_split
from meddiff.data.splits import SPLITS, check_fractions
from meddiff.errors import ConfigError

# the splits each Lightning stage needs
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    None: SPLITS,
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


def dict_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int = 0,
                pin_memory: bool = False, seed: int | None = None) -> DataLoader:
    """A loader over a dict-returning dataset; workers persist between epochs. Shuffled loaders are
    :class:`meddiff.data.resumable.ResumableLoader` (order from ``seed`` and the epoch; ``seed`` None draws one from
    torch's global RNG, which ``seed_everything`` fixes)."""
    kwargs: dict[str, Any] = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                                  persistent_workers=num_workers > 0, drop_last=False)
    if shuffle:
        # the order of epoch e comes from (seed, e) alone and the position is checkpointed, so a resumed run
        # (even mid-epoch) sees exactly the batches an uninterrupted one would
        from meddiff.data.resumable import ResumableLoader

        return ResumableLoader(dataset, seed=seed, **kwargs)
    return DataLoader(dataset, shuffle=False, **kwargs)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools rejected), else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | np.integer) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid: use an integer >= {minimum}.")
    return int(value)


class SplitDataModule(L.LightningDataModule):
    """Base DataModule: checks, ``datasets[split]`` and the four loaders.

    Args:
        batch_size: >= 1. num_workers: >= 0. pin_memory: DataLoader setting.
        seed: split seed; also seeds training-set shuffling when ``seeded_shuffle``.
        val_fraction, test_fraction: split shares (checked once here), or None for DataModules whose splits
            come from the data itself (e.g. image folders).
        seeded_shuffle: draw the training order from ``seed`` (reproducible runs).
        aucp_holdout: healthy training images held out as the known-healthy pool of ``val/aucp`` (0 = off; see
            the module docstring). Only DataModules implementing :meth:`build_known_healthy` accept k > 0.
    """

    def __init__(self, batch_size: int = 16, num_workers: int = 0, pin_memory: bool = False, seed: int = 0,
                 val_fraction: float | None = None, test_fraction: float | None = None,
                 seeded_shuffle: bool = False, aucp_holdout: int = 0) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.pin_memory = bool(pin_memory)
        self.seed = check_int("seed", seed, 0)
        if val_fraction is not None or test_fraction is not None:
            self.val_fraction, self.test_fraction = check_fractions(val_fraction or 0.0, test_fraction or 0.0)
        self.seeded_shuffle = bool(seeded_shuffle)
        self.aucp_holdout = check_holdout(aucp_holdout)
        self.datasets: dict[str, Dataset] = {}
        #: the held-out known-healthy images (``aucp_holdout > 0``), built by :meth:`build_known_healthy`
        self.known_healthy: Dataset | None = None

    # -------------------------------------------------------------------------------- subclass hooks
    def build_dataset(self, split: str) -> Dataset:  # pragma: no cover - abstract
        """The dataset of one split (``train`` / ``val`` / ``test``)."""
        raise NotImplementedError

    def build_known_healthy(self) -> Dataset:
        """The held-out known-healthy images of ``aucp_holdout`` (never in the training split)."""
        raise ConfigError(f"data.aucp_holdout={self.aucp_holdout}: {type(self).__name__} has no known-healthy "
                          "hold-out; set data.aucp_holdout=0 (label-free selection is available for the MNIST "
                          "splotch, RSNA CT and ADNI DataModules, and image folders have their own pools).")

    # -------------------------------------------------------------------------------- shared
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (idempotent): fit -> train+val, validate -> val, test -> test."""
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)

    def dataset(self, split: str) -> Dataset:
        """``datasets[split]``, built on first use."""
        if split not in SPLITS:
            raise ConfigError(f"split={split!r} must be one of {list(SPLITS)}")
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        return self.datasets[split]

    def holdout_split(self, n: int, groups: Sequence[str] | None = None, what: str = "healthy training images"
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(kept, held-out) positions into the ``n`` healthy training items for ``aucp_holdout`` (seeded by
        ``seed``; whole ``groups`` when given): :func:`meddiff.data.known_healthy.holdout_split`."""
        return holdout_split(n, self.aucp_holdout, self.seed, groups, what)

    def known_healthy_dataset(self) -> Dataset:
        """The known-healthy pool (``aucp_holdout > 0``), built on first use."""
        if not self.aucp_holdout:
            raise ConfigError("there is no known-healthy pool: set data.aucp_holdout to a number of healthy training "
                              "images to hold out (e.g. 64).")
        if self.known_healthy is None:
            self.known_healthy = self.build_known_healthy()
        return self.known_healthy

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """The DataLoader of one split with this DataModule's settings."""
        return self.loader_of(self.dataset(split), shuffle=shuffle)

    def loader_of(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        """A DataLoader over ``dataset`` with this DataModule's settings."""
        return dict_loader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                           pin_memory=self.pin_memory, seed=self.seed if self.seeded_shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Lightning's validation: the val split; with ``aucp_holdout`` the loaders ``[val split tagged
        unannotated(_labelled), known-healthy pool]`` (the val batches are exactly those without the option)."""
        if not self.aucp_holdout:
            return self.loader("val")
        return [self.loader_of(PoolTagged(self.dataset("val"))),
                self.loader_of(PoolTagged(self.known_healthy_dataset(), KNOWN_HEALTHY))]

    def val_labelled_dataloader(self) -> DataLoader:
        """The val split alone (no pool tags, no known-healthy pool): what selection on labelled validation reads."""
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")
