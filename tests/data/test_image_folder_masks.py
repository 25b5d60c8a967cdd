"""Lesion masks of the synthetic Brainomaly set (issue 17: the demo's refiner report carries pixel metrics): the
writer puts a mask beside the labelled diseased images (``val/anomaly_mask``, ``test/anomaly_mask``, BMAD-like,
never for the unannotated mixed set), the DataModule loads them into the labelled pools' items, and they align with
the lesions the writer drew."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from meddiff.data.formats.raster import read_image
from meddiff.data.modules.image_folder import ImageFolderAnomalyDataModule
from meddiff.data.synthetic import lesion_folders
from meddiff.data.synthetic.lesion_folders import MARKER, write_synthetic_image_folder
from meddiff.errors import DataError

KW = dict(image_size=32, n_known_healthy=4, n_mixed=(2, 2), n_val=(2, 1), n_test=(2, 2), slices_per_subject=3,
          min_lesion_px=4, seed=5)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return write_synthetic_image_folder(tmp_path_factory.mktemp("masks") / "data", **KW)


def _module(root, **kw) -> ImageFolderAnomalyDataModule:
    d = ImageFolderAnomalyDataModule(str(root), val_fraction=0.25, batch_size=4, **kw)
    d.setup("fit")
    return d


def test_masks_beside_the_labelled_diseased_images_only(root):
    for split in ("val", "test"):
        pos = sorted(p.name for p in (root / split / "pos").iterdir())
        assert sorted(p.name for p in (root / split / "anomaly_mask").iterdir()) == pos
    assert not list(root.glob("train/*mask*")) and not list(root.glob("train/*/*mask*"))  # the mixed set: none


def test_labelled_pools_carry_masks_that_load_and_align(root, monkeypatch):
    """Each test / validation item carries ``mask``: the lesion for a diseased image (equal to the file, non-empty,
    and where the image differs from its lesion-free twin), empty for a healthy one; unlabelled pools have none."""
    d = _module(root)
    # the lesion-free twin of every diseased slice: the same subject with the lesion's intensity factor set to 1
    real = lesion_folders._lesion
    monkeypatch.setattr(lesion_folders, "_lesion", lambda *a: (real(*a)[0], 1.0))
    for pool, split in (("test", "test"), ("labelled_val", "val")):
        ds = d.pool_dataset(pool)
        assert len(ds) > 0
        n_pos = 0
        for i in range(len(ds)):
            item, rec = ds[i], ds.records[i]
            assert item["mask"].shape == (1, 32, 32) and item["mask"].dtype == torch.bool
            if int(item["label"]) == 0:
                assert not item["mask"].any()
                continue
            n_pos += 1
            on_disk = read_image(root / split / "anomaly_mask" / rec.path.name)[:, :, 0] > 0
            assert torch.equal(item["mask"][0], torch.from_numpy(on_disk))
            assert item["mask"].sum() >= KW["min_lesion_px"]
            subject, z = rec.path.stem.split("__")
            k = int(subject[len(split) + 1:])
            twins = {zz: img for zz, img, _ in lesion_folders._subject(f"{split}_pos", k, KW["seed"], 32,
                                                                         KW["slices_per_subject"], KW["min_lesion_px"])}
            lesioned = read_image(rec.path)[:, :, 0].astype(np.int64)
            changed = np.abs(lesioned - twins[int(z)].astype(np.int64)) >= 3
            mask = on_disk
            assert changed[mask].mean() > 0.8  # the mask covers changed pixels ...
            grown = binary_dilation(mask, iterations=2)  # the lesion's soft edge (w < 0.5) lies outside the mask
            assert changed[~grown].mean() < 0.01  # ... and (up to the soft edge) only those
        assert n_pos > 0
    for pool in ("mixed", "mixed_labelled", "known_healthy"):
        assert "mask" not in d.pool_dataset(pool)[0], pool
    assert "mask" not in _module(root, use_masks=False).pool_dataset("test")[0]


def test_a_missing_mask_is_an_error(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = sorted((copy / "test" / "anomaly_mask").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match=f"no mask.*{victim.name}"):
        _module(copy)


def test_a_folder_of_the_previous_writer_version_is_completed(root, tmp_path):
    """A demo folder written before masks existed (version 1, same settings) gets its masks, images unchanged."""
    old = tmp_path / "old"
    shutil.copytree(root, old)
    for split in ("val", "test"):
        shutil.rmtree(old / split / "anomaly_mask")
    marker = json.loads((old / MARKER).read_text())
    (old / MARKER).write_text(json.dumps({**marker, "version": 1}))
    before = {p: p.read_bytes() for p in old.rglob("*.png")}
    write_synthetic_image_folder(old, **KW)
    assert json.loads((old / MARKER).read_text()) == marker
    assert all(p.read_bytes() == b for p, b in before.items())
    assert len(list((old / "test" / "anomaly_mask").iterdir())) == len(list((old / "test" / "pos").iterdir()))
