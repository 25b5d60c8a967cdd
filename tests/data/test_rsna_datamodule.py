"""RSNACTDataModule on synthetic RSNA data: contract-conforming batches, patient-level splits, reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from meddiff.data.formats.rsna_labels import SUBTYPES
from meddiff.data.modules.rsna_ct import RSNACTDataModule, split_subjects
from meddiff.errors import ConfigError, DataError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "rsna_ct.yaml"
S = 48


def _dm(root: Path, **kw) -> RSNACTDataModule:
    args = dict(image_size=S, windows=["brain"], batch_size=8, val_fraction=0.2, test_fraction=0.2, seed=0,
                synthetic=True, synthetic_patients=10, synthetic_slices_per_patient=4, synthetic_image_size=96,
                cache_workers=0, chunk_size=16, progress=False)
    args.update(kw)
    return RSNACTDataModule(root, **args)


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> RSNACTDataModule:
    root = tmp_path_factory.mktemp("rsna_dm") / "rsna"  # empty: synthetic=True generates the data first
    m = _dm(root)
    m.prepare_data()
    m.setup("fit")
    return m


def _check_batch(batch: dict, channels: int) -> None:
    b = batch["image"].shape[0]
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (b, channels, S, S)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (b,)
    assert set(batch["label"].tolist()) <= {0, 1}
    assert batch["subtypes"].dtype == torch.float32 and batch["subtypes"].shape == (b, 5)
    assert torch.equal(batch["subtypes"].amax(1).long(), batch["label"])  # any == max over subtypes
    for key in ("brain_mask", "mask"):
        assert batch[key].dtype == torch.bool and batch[key].shape == (b, 1, S, S)
    assert batch["brain_mask"].flatten(1).any(1).all()
    assert not (batch["mask"] & ~batch["brain_mask"]).any()  # lesions lie inside the brain mask
    assert isinstance(batch["id"], list) and all(isinstance(i, str) and i.startswith("ID_") for i in batch["id"])
    assert isinstance(batch["subject"], list) and len(batch["subject"]) == b
    assert None not in batch.values()


def test_batches_follow_the_contract(dm):
    assert dm.num_channels == 1 and dm.subtype_names == SUBTYPES
    labels = {}
    for name, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader()),
                         ("test", dm.test_dataloader())):
        labels[name] = []
        for batch in loader:
            _check_batch(batch, 1)
            labels[name] += batch["label"].tolist()
            # healthy slices carry an empty lesion mask; most hemorrhage slices a non-empty one
            has = batch["mask"].flatten(1).any(1)
            assert not has[batch["label"] == 0].any()
    assert labels["train"] and set(labels["train"]) == {0}  # train: healthy slices only
    assert 1 in labels["val"] and 0 in labels["val"]  # val: both, for thresholds / model selection
    assert 1 in labels["test"] and 0 in labels["test"]


def test_items_match_the_label_file_and_masks(dm):
    truth = pd.read_csv(dm.root / "synthetic_images.csv").set_index("id")
    ds = dm.datasets["val"]
    n_pos = n_pos_mask = 0
    for i in range(len(ds)):
        item = ds[i]
        row = truth.loc[item["id"]]
        assert item["label"].item() == row["any"]
        assert item["subtypes"].tolist() == [float(row[s]) for s in SUBTYPES]
        assert item["subject"] == row["patient_id"]  # subject = PatientID from the DICOM header
        if row["any"]:
            n_pos += 1
            n_pos_mask += bool(item["mask"].any())
            lesion = item["image"][0][item["mask"][0]]
            brain = item["image"][0][item["brain_mask"][0] & ~item["mask"][0]]
            assert lesion.mean() > brain.mean() + 0.3  # hyperdense in the brain window
    assert n_pos > 0 and n_pos_mask >= 0.8 * n_pos


def test_split_by_patient_no_overlap_and_reproducible(dm, tmp_path):
    idx = dm.index
    by_split = {s: set(idx.loc[idx["split"] == s, "subject"]) for s in ("train", "val", "test")}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    assert (idx.groupby("subject")["split"].nunique() == 1).all()
    for name in ("train", "val", "test"):
        assert set(dm.datasets[name].subjects) <= by_split[name]
    split_csv = dm.default_split_file()
    assert split_csv.is_file() and set(pd.read_csv(split_csv)["split"]) == {"train", "val", "test"}
    # same data + seed -> same split, even when computed afresh into another file
    fresh = _dm(dm.root, split_file=tmp_path / "again.csv")
    fresh.setup("fit")
    a = dm.splits.set_index("subject")["split"].sort_index()
    b = fresh.splits.set_index("subject")["split"].sort_index()
    assert a.equals(b) and (tmp_path / "again.csv").is_file()
    # the pure function: seed matters, input order does not
    per_slice = idx[["subject", "any"]]
    s0 = split_subjects(per_slice, 0.2, 0.2, seed=0)
    assert s0.equals(split_subjects(per_slice.sample(frac=1.0, random_state=1), 0.2, 0.2, seed=0))
    assert any(not split_subjects(per_slice, 0.2, 0.2, seed=k)["split"].equals(s0["split"]) for k in (1, 2, 3))


def test_split_subjects_is_pinned():
    """The values of the pre-restructure code: a refactor must not move a patient to another split."""
    per_slice = pd.DataFrame({"subject": [f"P{i // 3:02d}" for i in range(45)], "any": [int(i % 7 == 0) for i in range(45)]})
    got = split_subjects(per_slice, 0.2, 0.2, seed=3)
    assert got["split"].tolist() == ["train", "train", "val", "val", "test", "val", "train", "train", "train", "train",
                                     "train", "train", "test", "test", "train"]
    assert got["subject"].tolist() == [f"P{i:02d}" for i in range(15)]


def test_split_file_is_reused_and_checked(dm, tmp_path):
    custom = dm.splits.copy()
    moved = custom.loc[custom["split"] == "train", "subject"].iloc[0]
    custom.loc[custom["subject"] == moved, "split"] = "test"
    path = tmp_path / "split.csv"
    custom.to_csv(path, index=False)
    m = _dm(dm.root, split_file=path)
    m.setup("test")
    assert moved in set(m.datasets["test"].subjects) and moved not in set(m.datasets["train"].subjects)
    custom[custom["subject"] != moved].to_csv(path, index=False)
    with pytest.raises(DataError, match="lacks 1 subject"):
        _dm(dm.root, split_file=path).setup("fit")


def test_bad_files_reported_and_near_empty_dropped(dm):
    truth = pd.read_csv(dm.root / "synthetic_images.csv")
    truncated = truth.loc[truth["truncated"], "id"].tolist()
    near_empty = truth.loc[truth["near_empty"], "id"].tolist()
    skipped = dm.cache.skipped
    assert skipped["id"].tolist() == truncated and "cannot decode" in skipped["reason"].iloc[0]
    assert (dm.cache.path / "skipped.csv").is_file()
    used = set(dm.index["id"])
    assert not (set(truncated) | set(near_empty)) & used
    assert len(used) == len(truth) - len(truncated) - len(near_empty)
    non_square = truth.loc[truth["rows"] != truth["cols"], "id"].iloc[0]
    assert non_square in used  # a 490 x 638-like slice is resized like the others


def test_three_windows_use_another_cache(dm):
    m3 = _dm(dm.root, windows=["brain", "subdural", "bone"])
    m3.setup("fit")
    assert m3.num_channels == 3 and m3.cache.path != dm.cache.path
    batch = next(iter(m3.val_dataloader()))
    _check_batch(batch, 3)
    assert not torch.equal(batch["image"][:, 0], batch["image"][:, 2])
    # same images, same split (the split depends on data and seed, not on the windows)
    assert sorted(m3.datasets["test"].ids) == sorted(dm.datasets["test"].ids)


def test_max_slices_caps_the_data(dm):
    m = _dm(dm.root, max_slices=12)
    m.setup("fit")
    assert len(m.cache.index) == 12 and m.cache.path != dm.cache.path


def test_missing_data_and_bad_config(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*stage_2_train\.csv"):
        _dm(tmp_path / "nowhere", synthetic=False).prepare_data()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "stage_2_train").mkdir()
    with pytest.raises(DataError, match=r"half/stage_2_train\.csv' does not exist"):
        _dm(tmp_path / "half", synthetic=False).setup("fit")
    with pytest.raises(ConfigError, match="unknown CT window 'lung'"):
        _dm(tmp_path, windows=["lung"])
    with pytest.raises(ConfigError, match="val_fraction"):
        _dm(tmp_path, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(DataError, match="setup"):
        _dm(tmp_path).train_dataloader()


def test_hydra_config_instantiates(dm):
    from hydra.utils import instantiate

    cfg = OmegaConf.load(CONFIG)
    assert cfg._target_ == "meddiff.data.modules.rsna_ct.RSNACTDataModule"
    cfg.root, cfg.cache_dir, cfg.image_size, cfg.num_workers = str(dm.root), str(dm.cache_dir), S, 0
    cfg.val_fraction = cfg.test_fraction = 0.2
    cfg.chunk_size, cfg.cache_workers, cfg.progress = 16, 0, False
    m = instantiate(cfg)
    assert isinstance(m, RSNACTDataModule) and m.windows == (("brain", 40.0, 80.0),)
    m.setup("fit")
    assert m.cache.path == dm.cache.path  # identical settings -> the same cache is reused
    assert np.array_equal(sorted(m.datasets["train"].ids), sorted(dm.datasets["train"].ids))


def test_lightning_trainer_drives_the_datamodule(dm):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[str, list[int]] = {"train": [], "val": []}

        def training_step(self, batch, i):
            _check_batch(batch, 1)
            self.seen["train"] += batch["label"].tolist()
            return (self.w * batch["image"].mean()).sum()

        def validation_step(self, batch, i):
            _check_batch(batch, 1)
            self.seen["val"] += batch["label"].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=_dm(dm.root))
    assert len(probe.seen["train"]) == len(dm.datasets["train"]) and set(probe.seen["train"]) == {0}
    assert len(probe.seen["val"]) == len(dm.datasets["val"])
