"""Data layer: one module per source (Dataset + DataModule), on :class:`meddiff.data.base.SplitDataModule`.

Rooms: ``formats/`` (file formats, no Lightning), ``preprocess/`` (the resumable cache, CT windows, MRI slicing),
``synthetic/`` (phantoms written in real file formats), ``splits.py`` (subject-level splits, the one fraction
check). DataModules are imported lazily so ``import meddiff.data.formats.dicom`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_DATAMODULES = {
    "MNISTSplotchDataModule": "meddiff.data.mnist_splotch",
    "RSNACTDataModule": "meddiff.data.rsna_ct",
    "HDF5PatchDataModule": "meddiff.data.hdf5_patches",
    "ADNISliceDataModule": "meddiff.data.adni_slices",
    "SplitDataModule": "meddiff.data.base",
}

__all__ = list(_DATAMODULES)


def __getattr__(name: str) -> Any:
    if name in _DATAMODULES:
        return getattr(importlib.import_module(_DATAMODULES[name]), name)
    raise AttributeError(f"module 'meddiff.data' has no attribute {name!r}")
