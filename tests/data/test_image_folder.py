"""Image folders (Brainomaly and BMAD layouts): pools, labels hidden where they must be, subjects, preprocessing,
the phantom writer, and every bad input the issue lists."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.data.formats.folder_layout import scan_image_folder
from meddiff.data.formats.raster import read_image
from meddiff.data.modules.image_folder import ImageFolderAnomalyDataModule
from meddiff.data.synthetic.lesion_folders import write_synthetic_image_folder
from meddiff.errors import ConfigError, DataError


def png(path, value: int = 100, size=(16, 16), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(size + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8)
    arr[: size[0] // 2] = value // 2
    Image.fromarray(arr).save(path)


def brainomaly_tree(root, subjects=None, size=(16, 16)) -> None:
    """train/neg 4 subjects, train/pos + neg_mixed, test/pos + neg, 2 slices each."""
    subjects = subjects or {"train/neg": ["h1", "h2", "h3", "h4"], "train/pos": ["m1"], "train/neg_mixed": ["m2"],
                            "test/pos": ["t1"], "test/neg": ["t2"]}
    for folder, subs in subjects.items():
        for s in subs:
            for k in range(2):
                png(root / folder / f"{s}__{k:03d}.png", 50 + 40 * k, size)


def dm(root, **kw) -> ImageFolderAnomalyDataModule:
    kw.setdefault("val_fraction", 0.25)
    kw.setdefault("batch_size", 4)
    d = ImageFolderAnomalyDataModule(str(root), **kw)
    d.setup("fit")
    return d


def test_brainomaly_pools_labels_and_subjects(tmp_path):
    brainomaly_tree(tmp_path)
    d = dm(tmp_path, train_pools=["known_healthy", "mixed"])
    assert d.index.layout == "brainomaly"
    kh, khv = d.pool_dataset("known_healthy"), d.pool_dataset("known_healthy_val")
    assert (len(kh), len(khv)) == (6, 2)
    assert not {r.subject for r in kh.records} & {r.subject for r in khv.records}  # split by subject
    mixed = d.pool_dataset("mixed")
    item = mixed[0]
    assert "label" not in item and item["pool"] == "unannotated"  # labels of the mixed set never leave here
    assert item["subject"] == "m1" and item["id"] == "train/m1__000"  # no label folder in the id
    labelled = d.pool_dataset("mixed_labelled")
    assert sorted(int(labelled[i]["label"]) for i in range(len(labelled))) == [0, 0, 1, 1]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    train = d.train_dataloader()
    assert set(train) == {"known_healthy", "mixed"}
    assert "label" not in next(iter(train["mixed"]))
    vals = d.val_dataloader()
    assert d.val_loader_pools() == ["known_healthy_val", "mixed"]
    assert [next(iter(v))["pool"][0] for v in vals] == ["known_healthy", "unannotated"]
    test = next(iter(d.test_dataloader()))
    assert test["label"].tolist() == [0, 0, 1, 1] or sorted(test["label"].tolist()) == [0, 0, 1, 1]
    assert not d.has_pool("labelled_val")


def test_refiner_pools_train_on_known_healthy_only(tmp_path):
    brainomaly_tree(tmp_path)
    batch = next(iter(dm(tmp_path).train_dataloader()))
    assert set(batch["pool"]) == {"known_healthy"} and (batch["label"] == 0).all()


def test_optional_labelled_validation_set(tmp_path):
    brainomaly_tree(tmp_path)
    png(tmp_path / "val/pos/v1__000.png")
    png(tmp_path / "val/neg/v2__000.png")
    d = dm(tmp_path)
    assert d.val_loader_pools() == ["known_healthy_val", "mixed", "labelled_val"]
    assert next(iter(d.val_dataloader()[2]))["pool"] == ["labelled", "labelled"]
    # selection on labelled validation (the anomaly protocol) reads the labelled set, both classes
    lab = next(iter(d.val_labelled_dataloader()))
    assert sorted(lab["id"]) == ["val/neg/v2__000", "val/pos/v1__000"] and sorted(lab["label"].tolist()) == [0, 1]


def test_val_pools_chooses_the_validation_loaders(tmp_path):
    brainomaly_tree(tmp_path)
    png(tmp_path / "val/pos/v1__000.png")
    png(tmp_path / "val/neg/v2__000.png")
    d = dm(tmp_path, val_pools=["labelled_val"])
    assert d.val_loader_pools() == ["labelled_val"]
    (only,) = d.val_dataloader()
    assert sorted(next(iter(only))["label"].tolist()) == [0, 1]
    with pytest.raises(ConfigError, match="val_pools"):
        dm(tmp_path, val_pools=["test"])
    brainomaly_tree(tmp_path / "noval")  # no val/ folder: a named pool that is missing is an error
    with pytest.raises(DataError, match="val_pools"):
        dm(tmp_path / "noval", val_pools=["labelled_val"]).val_loader_pools()


def test_labelled_validation_falls_back_to_the_val_split(tmp_path):
    brainomaly_tree(tmp_path)
    d = dm(tmp_path)
    lab = next(iter(d.val_labelled_dataloader()))
    assert sorted(lab["id"]) == sorted(r.id for r in d.pool_dataset("known_healthy_val").records)


def test_bmad_layout_with_masks(tmp_path):
    for folder, subs in {"train/good": ["a", "b", "c", "d"], "valid/good": ["e"], "valid/Ungood/img": ["f"],
                         "test/good": ["g"], "test/Ungood/img": ["h"]}.items():
        for s in subs:
            png(tmp_path / folder / f"{s}__000.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    for split, name in (("valid", "f"), ("test", "h")):
        (tmp_path / split / "Ungood/anomaly_mask").mkdir(parents=True)
        Image.fromarray(mask).save(tmp_path / split / "Ungood/anomaly_mask" / f"{name}__000.png")
    d = dm(tmp_path)
    assert d.index.layout == "bmad"
    test = d.pool_dataset("test")
    by_label = {int(test[i]["label"]): test[i] for i in range(len(test))}
    assert by_label[1]["mask"].sum() == 16 and by_label[0]["mask"].sum() == 0
    assert by_label[1]["mask"].dtype == torch.bool and by_label[1]["mask"].shape == (1, 16, 16)
    assert "label" not in d.pool_dataset("mixed")[0]  # BMAD's unannotated pool is valid/, read without labels
    assert d.has_pool("labelled_val")


def test_missing_mask_is_an_error_unless_masks_are_off(tmp_path):
    png(tmp_path / "train/good/a__000.png")
    png(tmp_path / "test/Ungood/img/b__000.png")
    (tmp_path / "test/Ungood/anomaly_mask").mkdir(parents=True)
    with pytest.raises(DataError, match="no mask"):
        scan_image_folder(tmp_path)
    assert scan_image_folder(tmp_path, use_masks=False).records


def test_preprocessing_rgb_crop_resize_and_16_bit(tmp_path):
    brainomaly_tree(tmp_path, size=(20, 20))
    png(tmp_path / "train/neg/h9__000.png", 200, (20, 20), mode="RGB")
    d = dm(tmp_path, image_size=8, crop=16)
    item = d.pool_dataset("known_healthy")[0]
    assert item["image"].shape == (1, 8, 8)
    d3 = dm(tmp_path, channels=3)
    assert d3.pool_dataset("known_healthy")[0]["image"].shape == (3, 20, 20)
    arr = np.full((20, 20), 4000, np.uint16)
    arr[0, 0] = 0
    Image.fromarray(arr).save(tmp_path / "x16.png")
    assert read_image(tmp_path / "x16.png").dtype == np.uint16


def test_tiff_and_nifti_slices(tmp_path):
    import nibabel as nib
    import tifffile

    brainomaly_tree(tmp_path)
    tifffile.imwrite(tmp_path / "train/neg/h5__000.tif", np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    nib.save(nib.Nifti1Image(np.arange(256, dtype=np.float32).reshape(16, 16, 1), np.eye(4)),
             str(tmp_path / "train/neg/h6__000.nii.gz"))
    d = dm(tmp_path, val_fraction=0.0)
    ids = {r.id: i for i, r in enumerate(d.pool_dataset("known_healthy").records)}
    for rid in ("train/neg/h5__000", "train/neg/h6__000"):
        img = d.pool_dataset("known_healthy")[ids[rid]]["image"]
        assert img.shape == (1, 16, 16) and img.min() == -1 and img.max() == 1  # min-max for float pixels


def test_synthetic_writer_both_layouts(tmp_path):
    kw = dict(image_size=32, n_known_healthy=4, n_mixed=(2, 1), n_val=(1, 1), n_test=(1, 1), slices_per_subject=2,
              min_lesion_px=2)
    a = write_synthetic_image_folder(tmp_path / "a", **kw)
    d = dm(a, foreground_mask=True)
    assert d.index.layout == "brainomaly"
    assert {f for f in d.index.folders()} == {"train/neg", "train/pos", "train/neg_mixed", "val/pos", "val/neg",
                                               "test/pos", "test/neg"}
    item = d.pool_dataset("test")[0]
    assert item["brain_mask"].any() and not item["brain_mask"].all()
    assert write_synthetic_image_folder(tmp_path / "a", **kw) == a  # idempotent
    with pytest.raises(ConfigError, match="other settings"):
        write_synthetic_image_folder(tmp_path / "a", **{**kw, "seed": 1})
    b = write_synthetic_image_folder(tmp_path / "b", layout="bmad", **kw)
    db = dm(b)
    assert db.index.layout == "bmad" and db.index.has_masks.get("test")
    pos = [db.pool_dataset("test")[i] for i in range(len(db.pool_dataset("test")))]
    assert all(p["mask"].any() for p in pos if int(p["label"]) == 1)
    # the synthetic set is leakage-free by construction
    assert len({r.subject for r in db.index.records}) == 4 + 3 + 2 + 2


# ---------------------------------------------------------------------------------------------------- bad input
def test_missing_train_neg(tmp_path):
    png(tmp_path / "train/pos/a__000.png")
    png(tmp_path / "test/neg/b__000.png")
    with pytest.raises(DataError, match="train/neg"):
        dm(tmp_path)


def test_empty_folder(tmp_path):
    brainomaly_tree(tmp_path)
    (tmp_path / "test/empty_is_fine_elsewhere").mkdir()
    (tmp_path / "train/neg_mixed_tmp").mkdir()
    for p in (tmp_path / "test/pos").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="test/pos is empty"):
        dm(tmp_path)


def test_mixed_image_sizes(tmp_path):
    brainomaly_tree(tmp_path)
    png(tmp_path / "train/neg/h9__000.png", size=(24, 16))
    with pytest.raises(DataError, match="different sizes.*image_size"):
        dm(tmp_path)
    assert dm(tmp_path, image_size=16).pool_dataset("known_healthy")[0]["image"].shape == (1, 16, 16)


def test_non_image_files(tmp_path):
    brainomaly_tree(tmp_path)
    (tmp_path / "train/neg/notes.txt").write_text("x")
    (tmp_path / "train/neg/.DS_Store").write_text("x")  # hidden files are ignored
    with pytest.raises(DataError, match="not images.*notes.txt"):
        dm(tmp_path)


def test_names_without_subject_id_warn_once(tmp_path, caplog):
    brainomaly_tree(tmp_path)
    png(tmp_path / "train/neg/scanA.png")
    png(tmp_path / "train/neg/scanB.png")
    with caplog.at_level(logging.WARNING):
        d = dm(tmp_path)
        d.setup("test")
        d.pool_dataset("test")
    msgs = [r.message for r in caplog.records if "carry no subject id" in r.message]
    assert len(msgs) == 1 and msgs[0].startswith("2 image name(s)")
    subjects = {r.id: r.subject for r in d.index.records}
    assert subjects["train/neg/scanA"] == "train/neg/scanA"  # each image its own subject


def test_layout_matching_neither_lists_both(tmp_path):
    png(tmp_path / "images/a.png")
    with pytest.raises(DataError) as exc:
        dm(tmp_path)
    msg = str(exc.value)
    assert "neither" in msg and "train/neg_mixed" in msg and "Ungood" in msg


def test_subject_in_two_splits(tmp_path, caplog):
    brainomaly_tree(tmp_path, subjects={"train/neg": ["h1", "h2", "h3", "h4"], "train/pos": ["m1"],
                                        "test/pos": ["m1"], "test/neg": ["t2"]})
    with pytest.raises(DataError, match="m1: mixed\\+test.*allow_subject_overlap"):
        dm(tmp_path)
    with caplog.at_level(logging.WARNING):
        d = dm(tmp_path, allow_subject_overlap=True)
    assert d.index is not None and any("allow_subject_overlap=true" in r.message for r in caplog.records)


def test_no_mixed_set(tmp_path):
    brainomaly_tree(tmp_path, subjects={"train/neg": ["h1", "h2"], "test/pos": ["t1"]})
    with pytest.raises(DataError, match="unannotated mixed set"):
        dm(tmp_path)


@pytest.mark.parametrize("bad", [dict(channels=2), dict(train_pools=["mixed"]), dict(image_size=0),
                                 dict(layout="folders")])
def test_bad_options(tmp_path, bad):
    brainomaly_tree(tmp_path)
    with pytest.raises(ConfigError):
        dm(tmp_path, **bad)
