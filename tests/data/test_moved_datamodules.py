"""DataModules moved into ``meddiff.data.modules``: stored configs naming the old paths still build (compat.py),
the old modules are gone (no shims), and every DataModule is exported from ``meddiff.data``."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
import pytest
import yaml

import meddiff.data
from meddiff.compat import MOVED_TARGETS, translate_stored_config

REPO = Path(__file__).resolve().parents[2]
OLD_DATAMODULE_PATHS = (
    "meddiff.data.mnist_splotch.MNISTSplotchDataModule",
    "meddiff.data.rsna_ct.RSNACTDataModule",
    "meddiff.data.hdf5_patches.HDF5PatchDataModule",
    "meddiff.data.adni_slices.ADNISliceDataModule",
    "meddiff.data.image_folder.ImageFolderAnomalyDataModule",
)


def _locate(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("old", OLD_DATAMODULE_PATHS)
def test_an_old_datamodule_path_translates_to_an_importable_class(old: str) -> None:
    cfg = {"data": {"_target_": old, "batch_size": 4}, "model": {"_target_": "meddiff.models.UnconditionalDiffusion"}}
    translate_stored_config(cfg)
    new = cfg["data"]["_target_"]
    assert new == MOVED_TARGETS[old] and new.startswith("meddiff.data.modules.")
    cls = _locate(new)
    assert issubclass(cls, L.LightningDataModule) and cls.__name__ == old.rpartition(".")[2]
    assert getattr(meddiff.data, cls.__name__) is cls  # exported from meddiff.data
    assert cfg["model"]["_target_"] == "meddiff.models.UnconditionalDiffusion"  # other targets untouched
    with pytest.raises(ModuleNotFoundError):  # the old module is gone: no re-export shim
        importlib.import_module(old.rpartition(".")[0])


def test_every_data_config_names_an_exported_datamodule() -> None:
    for path in sorted((REPO / "configs" / "data").glob("*.yaml")):
        target = yaml.safe_load(path.read_text())["_target_"]
        assert target not in MOVED_TARGETS, f"{path.name} names the old path {target}"
        cls = _locate(target)
        assert getattr(meddiff.data, cls.__name__) is cls, f"{path.name}: {target} is not exported from meddiff.data"
    assert set(meddiff.data.__all__) >= {_locate(MOVED_TARGETS[o]).__name__ for o in OLD_DATAMODULE_PATHS}
