"""Data layer: every DataModule (exported here) on :class:`meddiff.data.base.SplitDataModule`.

Rooms: ``modules/`` (the DataModules and their Datasets, one per source), ``formats/`` (readers, one file format
each, no Lightning, no pipelines), ``preprocess/`` (the resumable cache, CT windows, MRI slicing, image intensities,
the NIfTI -> HDF5 patch writer), ``synthetic/`` (phantoms written in real file formats, called from
``prepare_data``), ``splits.py`` (subject-level splits, the one fraction check). DataModules are imported lazily so
``import meddiff.data.formats.dicom`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_DATAMODULES = {
    "MNISTSplotchDataModule": "meddiff.data.modules.mnist_splotch",
    "RSNACTDataModule": "meddiff.data.modules.rsna_ct",
    "HDF5PatchDataModule": "meddiff.data.modules.hdf5_patches",
    "ADNISliceDataModule": "meddiff.data.modules.adni.datamodule",
    "ImageFolderAnomalyDataModule": "meddiff.data.modules.image_folder",
    "SplitDataModule": "meddiff.data.base",
}

__all__ = list(_DATAMODULES)


def __getattr__(name: str) -> Any:
    if name in _DATAMODULES:
        return getattr(importlib.import_module(_DATAMODULES[name]), name)
    raise AttributeError(f"module 'meddiff.data' has no attribute {name!r}")
