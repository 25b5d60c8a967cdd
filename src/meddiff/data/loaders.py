"""One DataLoader recipe for every DataModule (dict batches, default collate)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def dict_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int | None = None,
) -> DataLoader:
    """A loader over a dict-returning dataset; workers persist between epochs; shuffling is seeded when ``seed``
    is given (so a run is reproducible from its config)."""
    generator = torch.Generator().manual_seed(seed) if (shuffle and seed is not None) else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=generator,
        drop_last=False,
    )


class SplitLoaders:
    """Mixin for DataModules that build loaders by split name: supplies the four Lightning hooks from
    ``self._loader(split: str, shuffle: bool)``; ``predict`` is the test split."""

    def _loader(self, split: str, shuffle: bool) -> DataLoader:  # pragma: no cover - provided by the DataModule
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
