"""SplitDataModule: what every meddiff DataModule shares.

Hyperparameters saved (so a checkpoint can rebuild the data), the batch / worker / fraction checks written once,
``datasets[split]`` for ``train`` / ``val`` / ``test``, and the four loaders (``predict`` = test) from one recipe:
dict batches, default collate, persistent workers, seeded shuffling.

A subclass implements :meth:`build_dataset` (one split) and, if it needs one, :meth:`prepare_data`.
"""

from __future__ import annotations

import numbers
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

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
    """

    def __init__(self, batch_size: int = 16, num_workers: int = 0, pin_memory: bool = False, seed: int = 0,
                 val_fraction: float | None = None, test_fraction: float | None = None,
                 seeded_shuffle: bool = False) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.pin_memory = bool(pin_memory)
        self.seed = check_int("seed", seed, 0)
        if val_fraction is not None or test_fraction is not None:
            self.val_fraction, self.test_fraction = check_fractions(val_fraction or 0.0, test_fraction or 0.0)
        self.seeded_shuffle = bool(seeded_shuffle)
        self.datasets: dict[str, Dataset] = {}

    # -------------------------------------------------------------------------------- subclass hooks
    def build_dataset(self, split: str) -> Dataset:  # pragma: no cover - abstract
        """The dataset of one split (``train`` / ``val`` / ``test``)."""
        raise NotImplementedError

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

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """The DataLoader of one split with this DataModule's settings."""
        return dict_loader(self.dataset(split), batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                           pin_memory=self.pin_memory, seed=self.seed if self.seeded_shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")
