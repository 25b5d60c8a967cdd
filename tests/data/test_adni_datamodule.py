"""ADNISliceDataModule / ADNISliceDataset: subject splits, batch contract, slice cache, config."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import meddiff.data.formats.nifti as nifti_io
from meddiff.data.formats.adni_json import ADNIEntry, read_dataset_json
from meddiff.data.modules.adni.datamodule import ADNISliceDataModule, split_subjects
from meddiff.data.modules.adni.dataset import ADNISliceDataset
from meddiff.data.preprocess.mri_slices import slice_range
from meddiff.data.synthetic.mri import write_synthetic_adni
from meddiff.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
SHAPE = (32, 32, 32)
PER_VOLUME = 3 * len(slice_range(32))  # 3 axes x 13 slices (floor(11.2)=11 .. floor(24)=24 exclusive)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("adni_root")
    write_synthetic_adni(r, n_per_class=4, shape=SHAPE, seed=0)
    return r


@pytest.fixture(scope="module")
def entries(root: Path) -> list[ADNIEntry]:
    return read_dataset_json(root / "2d_cfg_anom_det" / "dataset.json")


class CountingLoader:
    """Wraps nifti_io.load_volume and counts calls (a second pass over a cache must make none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self._real = nifti_io.load_volume
        monkeypatch.setattr(nifti_io, "load_volume", self)

    def __call__(self, path, *args, **kwargs):  # noqa: ANN001, ANN204
        self.calls.append(str(path))
        return self._real(path, *args, **kwargs)


# ----------------------------------------------------------------------------------------- splits
def test_splits_by_subject_stratified_and_seeded(entries: list[ADNIEntry]) -> None:
    s = split_subjects(entries, val_fraction=0.1, test_fraction=0.2, seed=0)
    ids = {k: {e.volume_id for e in v} for k, v in s.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == {e.volume_id for e in entries}
    assert (len(ids["test"]), len(ids["val"])) == (4, 2)  # round(0.2*20), round(0.1*20)
    assert len({e.slice_label for e in s["test"]}) == 4  # spread over classes, not 4 of one class
    assert {e.slice_label for e in s["train"]} == {1, 2, 3, 4, 5}
    again = split_subjects(list(reversed(entries)), 0.1, 0.2, seed=0)
    assert {e.volume_id for e in again["test"]} == ids["test"]  # independent of json order
    others = [{e.volume_id for e in split_subjects(entries, 0.1, 0.2, seed=k)["test"]} for k in range(1, 6)]
    assert any(o != ids["test"] for o in others)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_subjects(entries, 0.5, 0.5)


def test_volumes_of_one_subject_never_straddle_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    es = [
        ADNIEntry(
            f"x/s{s}_v{v}.nii.gz", tmp_path / f"s{s}_v{v}.nii.gz", int(1 + s % 5), f"x/s{s}_v{v}", f"S{s}", k
        )
        for k, (s, v) in enumerate((s, v) for s in range(30) for v in range(int(rng.integers(1, 4))))
    ]
    for seed in range(5):
        split = split_subjects(es, 0.2, 0.3, seed=seed)
        subj = {k: {e.subject for e in v} for k, v in split.items()}
        assert not (subj["train"] & subj["val"] or subj["train"] & subj["test"] or subj["val"] & subj["test"])
        assert sum(len(v) for v in split.values()) == len(es)
        assert len(subj["test"]) == 9 and len(subj["val"]) == 6


# ------------------------------------------------------------------------------------- batch contract
def test_batches_match_the_contract(root: Path, tmp_path: Path) -> None:
    dm = ADNISliceDataModule(root=str(root), image_size=32, batch_size=8, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None
    assert len(dm.train_set) == PER_VOLUME * len(dm.splits["train"]) == PER_VOLUME * 14
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        b = next(iter(loader))
        assert b["image"].dtype == torch.float32 and b["image"].shape == (8, 1, 32, 32)
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
        assert b["brain_mask"].dtype == torch.bool and b["brain_mask"].shape == (8, 1, 32, 32)
        for k in ("label", "class_label", "axis", "index"):
            assert b[k].dtype == torch.int64 and b[k].shape == (8,), k
        assert set(b["class_label"].tolist()) <= set(range(5))
        assert torch.equal(b["label"], (b["class_label"] != 0).long())
        assert isinstance(b["id"], list) and isinstance(b["subject"], list) and len(b["id"]) == 8
        for i, v, a, j in zip(b["id"], b["volume"], b["axis"].tolist(), b["index"].tolist()):
            assert i == f"{v}:{a}:{j}" and re.fullmatch(r"(cn|emci|mci|lmci|ad)/\w+\d:[012]:\d+", i)
        assert all(v is not None for v in b.values())
    ids = [dm.test_set[i]["id"] for i in range(len(dm.test_set))]
    assert len(set(ids)) == len(ids)
    vid = dm.test_set.volumes[1].volume_id
    rng = dm.test_set.volume_indices(vid)
    assert len(rng) == PER_VOLUME and all(ids[i].startswith(vid + ":") for i in rng)
    entry, axis, index = dm.test_set.locate(rng[-1])
    assert (entry.volume_id, axis, index) == (vid, 2, slice_range(32)[-1])
    item = dm.test_set[0]
    assert item["class_label"].item() == dm.test_set.volumes[0].slice_label - 1
    assert item["subject"] == dm.test_set.volumes[0].volume_id


def test_worker_processes_read_the_cache(root: Path, entries: list[ADNIEntry], tmp_path: Path) -> None:
    ds = ADNISliceDataset(entries[:2], image_size=32, cache_dir=tmp_path / "cache")
    ref = torch.stack([ds[i]["image"] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=1)
    got = torch.cat([b["image"] for b in loader])
    assert torch.equal(got, ref)


# -------------------------------------------------------------------------------------------- cache
def test_cache_is_reused_without_reading_nifti(
    entries: list[ADNIEntry], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = CountingLoader(monkeypatch)
    cache = tmp_path / "cache"
    first = ADNISliceDataset(entries[:3], image_size=32, cache_dir=cache)
    assert len(loader.calls) == 3
    epoch1 = [first[i]["image"] for i in range(len(first))]
    epoch2 = [first[i]["image"] for i in range(len(first))]
    assert len(loader.calls) == 3  # epochs read the cache, not NIfTI
    second = ADNISliceDataset(entries[:3], image_size=32, cache_dir=cache)
    assert len(loader.calls) == 3, loader.calls  # second pass: no NIfTI read at all
    assert len(second) == len(first) == 3 * PER_VOLUME
    assert all(
        torch.equal(a, b) and torch.equal(a, second[i]["image"])
        for i, (a, b) in enumerate(zip(epoch1, epoch2))
    )
    assert not list(cache.rglob("*.tmp"))  # atomic writes leave no temp files
    ADNISliceDataset(entries[:3], image_size=32, hi=0.7, cache_dir=cache)  # other settings -> other key
    assert len(loader.calls) == 6
    os.utime(entries[0].path, ns=(1, 1))  # a changed file is re-read
    ADNISliceDataset(entries[:3], image_size=32, cache_dir=cache)
    assert loader.calls[6:] == [str(entries[0].path)]


def test_in_memory_dataset_reads_each_volume_once(
    entries: list[ADNIEntry], monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = CountingLoader(monkeypatch)
    ds = ADNISliceDataset(entries[:2], image_size=32)
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]
    assert len(loader.calls) == 2


def test_second_datamodule_uses_the_cache(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = dict(root=str(root), image_size=32, batch_size=4, cache_dir=str(tmp_path / "c"))
    dm = ADNISliceDataModule(**kw)
    dm.prepare_data()
    dm.setup()

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("NIfTI was read although the cache holds every volume")

    import nibabel

    monkeypatch.setattr(nifti_io, "load_volume", boom)
    monkeypatch.setattr(nibabel, "load", boom)
    dm2 = ADNISliceDataModule(**kw)
    dm2.prepare_data()
    dm2.setup()
    assert len(dm2.train_set) == len(dm.train_set)
    b1, b2 = dm.val_set[5], dm2.val_set[5]
    assert b1["id"] == b2["id"] and torch.equal(b1["image"], b2["image"])


# ---------------------------------------------------------------------------- options and failures
def test_train_classes_filters_only_the_train_split(root: Path) -> None:
    dm = ADNISliceDataModule(root=str(root), image_size=32, train_classes=["CN"])
    dm.setup()
    assert {e.slice_label for e in dm.train_set.volumes} == {1}
    assert {int(dm.train_set[i]["class_label"]) for i in range(0, len(dm.train_set), 7)} == {0}
    assert {e.slice_label for e in dm.val_set.volumes + dm.test_set.volumes} - {1}
    with pytest.raises(ConfigError, match="train_classes"):
        ADNISliceDataModule(root=str(root), train_classes=[6])


def test_eval_classes_filters_val_and_test_after_the_subject_split(root: Path) -> None:
    """eval_classes=[CN, AD]: val/test keep only CN and AD volumes of the unfiltered split (label 1 = AD), train is
    untouched; a bad class name is a ConfigError naming the option."""
    plain = ADNISliceDataModule(root=str(root), image_size=32, train_classes=["CN"])
    dm = ADNISliceDataModule(root=str(root), image_size=32, train_classes=["CN"], eval_classes=["CN", "AD"])
    plain.setup()
    dm.setup()
    assert [e.volume_id for e in dm.train_set.volumes] == [e.volume_id for e in plain.train_set.volumes]
    for split in ("val", "test"):
        kept = [e.volume_id for e in plain.datasets[split].volumes if e.slice_label in (1, 5)]
        assert [e.volume_id for e in dm.datasets[split].volumes] == kept
        labels = {(int(it["class_label"]), int(it["label"])) for it in (dm.datasets[split][i]
                                                                       for i in range(0, len(dm.datasets[split]), 5))}
        assert labels <= {(0, 0), (4, 1)}
    assert {e.slice_label for e in dm.test_set.volumes} == {1, 5}
    with pytest.raises(ConfigError, match="eval_classes"):
        ADNISliceDataModule(root=str(root), eval_classes=["XX"])


def test_synthetic_flag_writes_a_task_dir_when_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="synthetic=true"):
        ADNISliceDataModule(root=str(tmp_path / "none")).prepare_data()
    dm = ADNISliceDataModule(
        root=str(tmp_path / "syn"),
        image_size=16,
        synthetic=True,
        synthetic_n_per_class=2,
        synthetic_shape=(20, 20, 20),
        batch_size=4,
    )
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "syn" / "2d_cfg_anom_det" / "dataset.json").is_file()
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 1, 16, 16)


def test_datamodule_skips_and_lists_a_broken_volume(tmp_path: Path) -> None:
    write_synthetic_adni(tmp_path, n_per_class=2, shape=(20, 20, 20), seed=1)
    (tmp_path / "2d_cfg_anom_det" / "mci" / "mci1.nii.gz").write_bytes(b"not a nifti file")
    shutil.rmtree(tmp_path / "2d_cfg_anom_det" / "lmci")
    dm = ADNISliceDataModule(root=str(tmp_path), image_size=16, val_fraction=0.0, test_fraction=0.0)
    with pytest.warns(UserWarning, match="skipped 3 of 10"):
        dm.setup("fit")
    assert sorted(img for img, _ in dm.skipped) == [
        "lmci/lmci0.nii.gz",
        "lmci/lmci1.nii.gz",
        "mci/mci1.nii.gz",
    ]
    assert len(dm.train_set.volumes) == 7
    strict = ADNISliceDataModule(root=str(tmp_path), image_size=16, skip_bad=False)
    with pytest.raises(DataError, match=r"entry #\d+ \(image 'lmci/lmci0.nii.gz'\).*not found"):
        strict.setup("fit")


def test_hydra_config_instantiates(root: Path, tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "data" / "adni_slices.yaml")
    assert cfg.root == "data/adni" and cfg.cache_dir == "data/cache/adni_slices"  # no paths group: defaults
    with_paths = OmegaConf.merge({"paths": {"data_dir": "/d"}}, {"data": cfg})
    assert with_paths.data.root == "/d/adni"
    cfg.root, cfg.cache_dir, cfg.num_workers, cfg.image_size = str(root), str(tmp_path / "c"), 0, 32
    dm = instantiate(cfg)
    assert isinstance(dm, ADNISliceDataModule)
    assert dm.settings.axes == (0, 1, 2) and (dm.settings.lo, dm.settings.hi) == (0.35, 0.75)
    dm.setup("fit")
    assert len(dm.train_set) > 0


# ---------------------------------------------------------------------------- split pinned, option names
def test_split_is_pinned_to_the_split_before_the_restructure(entries: list[ADNIEntry]) -> None:
    """The subject split is written into stored runs: these are the splits the pre-restructure code produced."""
    expected = {
        (0.1, 0.2, 0): (["cn/cn0", "lmci/lmci2"], ["cn/cn2", "emci/emci3", "lmci/lmci0", "ad/ad0"]),
        (0.2, 0.3, 1): (
            ["emci/emci2", "mci/mci0", "lmci/lmci3", "ad/ad0"],
            ["cn/cn0", "emci/emci0", "emci/emci3", "mci/mci3", "lmci/lmci2", "ad/ad1"],
        ),
        (0.3, 0.3, 5): (
            ["cn/cn2", "emci/emci3", "mci/mci1", "lmci/lmci0", "lmci/lmci1", "ad/ad1"],
            ["cn/cn1", "cn/cn3", "emci/emci2", "mci/mci3", "lmci/lmci3", "ad/ad0"],
        ),
    }
    for (vf, tf, seed), (val, test) in expected.items():
        s = split_subjects(entries, vf, tf, seed)
        assert [e.volume_id for e in s["val"]] == val and [e.volume_id for e in s["test"]] == test


def entries_of(root: Path) -> list[ADNIEntry]:
    return read_dataset_json(root / "2d_cfg_anom_det" / "dataset.json")


def test_stored_configs_with_the_old_split_option_names_build_the_same_split(root: Path) -> None:
    """0.1.0's val_frac / test_frac / split_seed are gone from the DataModule; a stored config naming them (at the
    old path) is translated on load (meddiff.compat) and builds the same split."""
    from hydra.utils import instantiate

    from meddiff.compat import translate_stored_config

    new = ADNISliceDataModule(root=str(root), image_size=16, val_fraction=0.2, test_fraction=0.3, seed=4)
    with pytest.raises(TypeError, match="val_frac"):
        ADNISliceDataModule(root=str(root), image_size=16, val_frac=0.2)
    stored = {"data": {"_target_": "meddiff.data.adni_slices.ADNISliceDataModule", "root": str(root), "image_size": 16,
                       "val_fraction": 0.1, "test_fraction": 0.2, "seed": 0,  # the composed defaults
                       "val_frac": 0.2, "test_frac": 0.3, "split_seed": 4}}
    translate_stored_config(stored)
    assert stored["data"] == {"_target_": "meddiff.data.modules.adni.datamodule.ADNISliceDataModule",
                              "root": str(root), "image_size": 16, "val_fraction": 0.2, "test_fraction": 0.3,
                              "seed": 4}
    old = instantiate(stored["data"])
    assert (old.val_fraction, old.test_fraction, old.seed) == (0.2, 0.3, 4)
    assert old.split_entries() == new.split_entries()
    assert not set(old.hparams) & {"val_frac", "test_frac", "split_seed"}
    current = {"data": dict(stored["data"])}
    assert translate_stored_config(current) == {"data": stored["data"]}  # a no-op on a current config
    clash = {"data": {"_target_": "meddiff.data.adni_slices.ADNISliceDataModule", "val_fraction": 0.3, "val_frac": 0.2}}
    with pytest.raises(ConfigError, match="val_frac=0.2 and val_fraction=0.3"):
        translate_stored_config(clash)


# ---------------------------------------------------------------------------------- per-volume access
def test_volumes_of_a_split_load_the_datasets_slices(root: Path) -> None:
    dm = ADNISliceDataModule(root=str(root), image_size=16)
    vols = dm.volumes("test")
    ds = dm.test_set
    assert vols.batch and vols.skipped == [] and [v.volume_id for v in vols.sources] == [e.volume_id for e in ds.volumes]
    src = vols.sources[1]
    data = src.load()
    idx = ds.volume_indices(src.volume_id)
    assert torch.equal(data.images, torch.stack([ds[i]["image"] for i in idx]))
    assert data.masks.dtype == torch.bool and data.masks.shape == data.images.shape
    assert list(zip(data.axes.tolist(), data.indices.tolist())) == [ds.locate(i)[1:] for i in idx]
    assert src.slice_label == ds.volumes[1].slice_label and src.class_name in ("CN", "EMCI", "MCI", "LMCI", "AD")


def test_input_volumes_slice_external_files_like_the_datamodule(root: Path, tmp_path: Path) -> None:
    dm = ADNISliceDataModule(root=str(root), image_size=16)
    ref = dm.volumes("train").sources[0]
    path = dm.task_dir / f"{ref.volume_id}.nii.gz"
    bare = dm.input_volumes(str(path))
    assert not bare.batch and bare.sources[0].slice_label is None and bare.sources[0].class_name == "?"
    assert torch.equal(bare.sources[0].load().images, ref.load().images)  # same settings -> same slices
    labelled = dm.input_volumes(str(path), "AD").sources[0]
    assert labelled.slice_label == 5 and labelled.volume_id == path.name[: -len(".nii.gz")]
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"image": str(path), "slice_label": 1}, {"image": "x.nii.gz", "slice_label": 0}]))
    listed = dm.input_volumes(str(js), what="eval.input")
    assert listed.batch and len(listed.sources) == 1 and "outside 1-5" in listed.skipped[0]["reason"]
    with pytest.raises(DataError, match="eval.input=.*neither"):
        dm.input_volumes(str(tmp_path / "a.txt"), what="eval.input")
