"""Deprecated: moved to meddiff.data.base (dict_loader; SplitLoaders is replaced by SplitDataModule); kept for one
release."""

from __future__ import annotations

from torch.utils.data import DataLoader

from meddiff.data.base import dict_loader

__all__ = ["dict_loader", "SplitLoaders"]


class SplitLoaders:
    """Deprecated mixin (subclass :class:`meddiff.data.base.SplitDataModule` instead): the four Lightning loader
    hooks from ``self._loader(split: str, shuffle: bool)``; ``predict`` is the test split."""

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
