"""PatchDataset / HDF5PatchDataModule: contract batches, noise level, lazy open, split by volume, bad files;
plus the Hydra config and the prepare_hdf5.py CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from meddiff.data.formats.patch_hdf5 import inspect_hdf5
from meddiff.data.modules.hdf5_patches import HDF5PatchDataModule, PatchDataset, split_by_volume
from meddiff.data.preprocess.nifti_patches import save_as_hdf5
from meddiff.data.synthetic.mr_heads import write_synthetic_volumes
from meddiff.errors import ConfigError, DataError
from meddiff.patches import stitch

pytestmark = pytest.mark.filterwarnings("ignore::meddiff.data.formats.nifti.FrameWarning")

ROOT = Path(__file__).resolve().parents[2]
NIB_DATA = Path(os.path.dirname(nib.__file__)) / "tests" / "data"
EXAMPLE4D = NIB_DATA / "example4d.nii.gz"


@pytest.fixture(scope="module")
def epi_h5(tmp_path_factory) -> Path:
    return save_as_hdf5(
        EXAMPLE4D, "epi", tmp_path_factory.mktemp("epi"), image_size=32, stride=32, progress=False
    )


@pytest.fixture(scope="module")
def multi_h5(tmp_path_factory) -> Path:
    """Six phantom volumes (two 'visits' of three subjects) + the real EPI, 32 px patches."""
    d = tmp_path_factory.mktemp("multi")
    vols = write_synthetic_volumes(d / "nifti", n=6, shape=(48, 48, 6), seed=1)
    renamed = []
    for i, p in enumerate(vols):
        q = p.with_name(f"sub-{i // 2}_visit{i % 2}.nii.gz")
        p.rename(q)
        renamed.append(q)
    return save_as_hdf5(renamed + [EXAMPLE4D], "multi", d, image_size=32, stride=16, progress=False)


def test_dataset_items_follow_the_batch_contract(epi_h5):
    ds = PatchDataset(epi_h5, noise_std=0.1)
    assert len(ds) == inspect_hdf5(epi_h5).n_patches == 4 * 3 * 24
    item = ds[7]
    assert set(item) == {"image", "cond", "noise_std", "id", "subject", "coords"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 32, 32)
    assert item["cond"].dtype == torch.float32 and item["cond"].shape == (1, 32, 32)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["subject"] == "example4d.nii.gz" and isinstance(item["id"], str)
    v, s, y, x = item["coords"].tolist()
    assert item["id"] == f"example4d.nii.gz:{s}:{y}:{x}"
    with h5py.File(epi_h5) as f:
        np.testing.assert_array_equal(item["image"].numpy(), f["patches"][7])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch["image"].shape == (8, 1, 32, 32) and batch["coords"].shape == (8, 4)
    assert batch["noise_std"].shape == (8,) and len(batch["id"]) == 8


def test_noise_has_the_configured_std(epi_h5):
    for std in (0.05, 0.2):
        ds = PatchDataset(epi_h5, noise_std=std)
        diffs = torch.cat([(ds[i]["cond"] - ds[i]["image"]).flatten() for i in range(0, len(ds), 7)])
        assert abs(diffs.std().item() - std) < 0.03 * std, (diffs.std().item(), std)
        assert abs(diffs.mean().item()) < 0.02 * std
        # the noisy image as a whole: its residual to the clean image, not clipped
        assert ds[0]["noise_std"].item() == pytest.approx(std)
    ds0 = PatchDataset(epi_h5, noise_std=0.0)
    assert torch.equal(ds0[3]["cond"], ds0[3]["image"])


def test_noise_std_range_draws_per_item_within_bounds(epi_h5):
    ds = PatchDataset(epi_h5, noise_std=(0.05, 0.3), deterministic_noise=True)
    stds, emp = [], []
    for i in range(0, len(ds), 5):
        it = ds[i]
        stds.append(it["noise_std"].item())
        emp.append((it["cond"] - it["image"]).std().item())
    stds, emp = np.array(stds), np.array(emp)
    assert stds.min() >= 0.05 and stds.max() <= 0.3 and stds.std() > 0.03
    np.testing.assert_allclose(emp, stds, rtol=0.12)  # each item's noise matches its reported std
    with pytest.raises(ConfigError):
        PatchDataset(epi_h5, noise_std=(0.3, 0.1))
    with pytest.raises(ConfigError):
        PatchDataset(epi_h5, noise_std=-0.1)


def test_deterministic_noise_for_eval_fresh_noise_for_train(epi_h5):
    ev = PatchDataset(epi_h5, noise_std=0.1, deterministic_noise=True, seed=5)
    assert torch.equal(ev[3]["cond"], ev[3]["cond"])
    ev2 = PatchDataset(epi_h5, noise_std=0.1, deterministic_noise=True, seed=5)
    assert torch.equal(ev[3]["cond"], ev2[3]["cond"])
    ev3 = PatchDataset(epi_h5, noise_std=0.1, deterministic_noise=True, seed=6)
    assert not torch.equal(ev[3]["cond"], ev3[3]["cond"])
    assert not torch.equal(ev[3]["cond"] - ev[3]["image"], ev[4]["cond"] - ev[4]["image"])
    tr = PatchDataset(epi_h5, noise_std=0.1)
    assert not torch.equal(tr[3]["cond"], tr[3]["cond"])


def test_lazy_open_pickles_before_and_after_access_and_works_in_workers(epi_h5):
    ds = PatchDataset(epi_h5, noise_std=0.1, deterministic_noise=True)
    assert ds._h5 is None  # nothing open after __init__
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2]["cond"], ds[2]["cond"])
    assert ds._h5 is not None  # opened on first access
    clone2 = pickle.loads(pickle.dumps(ds))  # an open handle is not carried across
    assert clone2._h5 is None and torch.equal(clone2[5]["image"], ds[5]["image"])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    images = torch.cat([b["image"] for b in loader])
    assert images.shape == (len(ds), 1, 32, 32)
    with h5py.File(epi_h5) as f:
        np.testing.assert_array_equal(images.numpy(), f["patches"][()])


def test_split_by_volume_has_no_overlap(multi_h5):
    dm = HDF5PatchDataModule(
        multi_h5, noise_std=0.1, val_fraction=0.2, test_fraction=0.2, seed=3, batch_size=64
    )
    dm.setup("fit")
    tr, va, te = (set(dm.splits[k]) for k in ("train", "val", "test"))
    assert tr and va and te
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == set(range(7))
    seen: dict[str, set[str]] = {}
    for name, loader in (
        ("train", dm.train_dataloader()),
        ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()),
    ):
        subjects = set()
        for batch in loader:
            assert batch["image"].shape[1:] == (1, 32, 32) and batch["cond"].shape == batch["image"].shape
            subjects.update(batch["subject"])
            assert set(batch["coords"][:, 0].tolist()) <= set(dm.splits[name])
        seen[name] = subjects
    assert (
        not (seen["train"] & seen["val"])
        and not (seen["train"] & seen["test"])
        and not (seen["val"] & seen["test"])
    )
    assert sum(len(dm.datasets[k]) for k in ("train", "val", "test")) == inspect_hdf5(multi_h5).n_patches
    # the split is reproducible from the seed and changes with it
    dm2 = HDF5PatchDataModule(multi_h5, val_fraction=0.2, test_fraction=0.2, seed=3)
    dm2.setup()
    assert dm2.splits == dm.splits
    others = [split_by_volume(dm.info.names, 0.2, 0.2, seed=s) for s in range(4, 10)]
    assert any(o != dm.splits for o in others)


def test_subject_regex_keeps_a_subjects_volumes_together(multi_h5):
    names = inspect_hdf5(multi_h5).names
    regex = r"^(sub-\d+|example4d)"
    where = set()
    for seed in range(6):
        sp = split_by_volume(names, 0.25, 0.25, seed=seed, subject_regex=regex)
        split_of = {v: k for k, vols in sp.items() for v in vols}
        for sub in ("sub-0", "sub-1", "sub-2"):
            visits = [v for v, n in enumerate(names) if n.startswith(sub + "_")]
            assert len(visits) == 2 and split_of[visits[0]] == split_of[visits[1]]
            where.add((sub, split_of[visits[0]]))
    assert len(where) > 3  # subjects do move between splits across seeds
    # without the regex, the two visits of some subject end up apart for some seed
    assert any(
        len(
            {
                k
                for k, vols in split_by_volume(names, 0.25, 0.25, seed=s).items()
                for v in vols
                if names[v].startswith("sub-0_")
            }
        )
        > 1
        for s in range(20)
    )
    with pytest.raises(ConfigError, match="does not match volume name 'example4d.nii.gz'"):
        split_by_volume(names, 0.25, 0.25, subject_regex=r"^(sub-\d+)")


def test_too_few_volumes_to_split_is_a_clear_error(epi_h5):
    dm = HDF5PatchDataModule(epi_h5, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(DataError, match=r"cannot split 1 .*by volume"):
        dm.setup()
    dm = HDF5PatchDataModule(epi_h5, val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    assert len(dm.datasets["train"]) == 288 and len(dm.datasets["val"]) == 0


def test_missing_file_is_a_clear_error(tmp_path):
    dm = HDF5PatchDataModule(tmp_path / "ct_p64_s32.h5")
    with pytest.raises(DataError, match=r"ct_p64_s32\.h5.*not found.*prepare_hdf5"):
        dm.setup()


def test_truncated_or_garbage_file_is_a_clear_error(epi_h5, tmp_path):
    data = epi_h5.read_bytes()
    for cut in (len(data) // 2, 4096):
        bad = tmp_path / f"trunc{cut}.h5"
        bad.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"trunc\d+\.h5.*(truncated|corrupt)"):
            PatchDataset(bad)
        with pytest.raises(DataError, match="truncated"):
            HDF5PatchDataModule(bad, val_fraction=0, test_fraction=0).setup()
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(DataError, match="junk"):
        inspect_hdf5(junk)


def test_settings_mismatch_is_a_clear_error(epi_h5):
    dm = HDF5PatchDataModule(epi_h5, image_size=64, val_fraction=0, test_fraction=0)
    with pytest.raises(DataError, match=r"other settings.*image_size: file has 32, requested 64"):
        dm.setup()
    with pytest.raises(DataError, match=r"stride: file has 32, requested 16"):
        HDF5PatchDataModule(epi_h5, image_size=32, stride=16, val_fraction=0, test_fraction=0).setup()
    ok = HDF5PatchDataModule(epi_h5, image_size=32, stride=32, axis=2, val_fraction=0, test_fraction=0)
    ok.setup()
    assert ok.info.image_size == 32


def test_missing_settings_attributes_are_detected(epi_h5, tmp_path):
    import shutil

    a = tmp_path / "no_settings.h5"
    shutil.copy(epi_h5, a)
    with h5py.File(a, "r+") as f:
        del f.attrs["settings"]
    with pytest.raises(DataError, match=r"no_settings\.h5.*settings"):
        inspect_hdf5(a)
    b = tmp_path / "no_stride.h5"
    shutil.copy(epi_h5, b)
    with h5py.File(b, "r+") as f:
        s = json.loads(f.attrs["settings"])
        del s["stride"]
        f.attrs["settings"] = json.dumps(s)
    with pytest.raises(DataError, match=r"lack \['stride'\]"):
        inspect_hdf5(b)
    c = tmp_path / "other.h5"
    with h5py.File(c, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(DataError, match=r"not a meddiff patch file.*patches"):
        inspect_hdf5(c)


def test_denoised_predictions_stitch_back_per_split(multi_h5):
    dm = HDF5PatchDataModule(
        multi_h5, noise_std=0.0, val_fraction=0.2, test_fraction=0.2, seed=0, batch_size=32
    )
    dm.setup("test")
    imgs, coords = [], []
    for b in dm.test_dataloader():
        imgs.append(b["cond"])  # identity "denoiser" at noise 0
        coords.append(b["coords"])
    sl = stitch(torch.cat(imgs), torch.cat(coords), dm.info.slice_shapes)
    assert {v for v, _ in sl} == set(dm.splits["test"])
    assert all(img.min() >= -1 and img.max() <= 1 for img in sl.values())


def test_noisy_dataset_at_another_noise_level(multi_h5):
    dm = HDF5PatchDataModule(multi_h5, noise_std=0.1, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    ds = dm.noisy_dataset("test", noise_std=0.3)
    assert len(ds) == len(dm.datasets["test"]) and ds.deterministic_noise
    assert ds[0]["noise_std"].item() == pytest.approx(0.3)
    with pytest.raises(ConfigError):
        dm.noisy_dataset("holdout")


def test_prepare_data_builds_synthetic_file(tmp_path):
    path = tmp_path / "demo_p32_s16.h5"
    dm = HDF5PatchDataModule(
        path,
        source="synthetic",
        synthetic_volumes=3,
        synthetic_shape=(40, 40, 4),
        image_size=32,
        stride=16,
        val_fraction=0.3,
        test_fraction=0.3,
        batch_size=4,
    )
    dm.prepare_data()
    assert path.is_file()
    dm.setup()
    assert len(dm.info.names) == 3 and dm.info.settings["stride"] == 16
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 1, 32, 32)


def test_hydra_config_instantiates_the_datamodule(epi_h5):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "paths": {"data_dir": str(epi_h5.parent)},
            "data": OmegaConf.load(ROOT / "configs" / "data" / "hdf5_patches.yaml"),
        }
    )
    cfg.data.path = str(epi_h5)
    cfg.data.image_size = 32
    cfg.data.val_fraction = 0.0
    cfg.data.test_fraction = 0.0
    cfg.data.noise_std = [0.05, 0.2]
    dm = instantiate(cfg.data)
    assert isinstance(dm, HDF5PatchDataModule)
    assert dm.noise_std == (0.05, 0.2)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["cond"].shape == (16, 1, 32, 32)
    default = OmegaConf.create(
        {"paths": {"data_dir": "/d"}, "data": OmegaConf.load(ROOT / "configs" / "data" / "hdf5_patches.yaml")}
    )
    assert default.data.path == "/d/ct_p64_s32.h5"
    alone = OmegaConf.load(ROOT / "configs" / "data" / "hdf5_patches.yaml")  # no paths group: falls back
    assert alone.path == "data/ct_p64_s32.h5"


def _cli_module():
    script = ROOT / "scripts" / "prepare_hdf5.py"
    sys.path.insert(0, str(script.parent))
    try:
        import prepare_hdf5  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    return prepare_hdf5


def test_cli_runs_as_a_script():
    # --help exits before the heavy imports (torch, lightning), so this subprocess stays fast
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_hdf5.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "image_size" in r.stdout and "key=value" in r.stdout


def test_cli_key_value_args_print_path_and_summary(tmp_path, capsys):
    cli = _cli_module()
    rc = cli.main(
        [
            f"input={EXAMPLE4D}",
            "name=ct",
            "image_size=48",
            "stride=24",
            f"targetdir={tmp_path}",
            "progress=false",
        ]
    )
    assert rc == 0
    out = tmp_path / "ct_p48_s24.h5"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out) and out.is_file()
    assert any("example4d.nii.gz" in line and "patches" in line for line in printed)
    info = inspect_hdf5(out, {"image_size": 48, "stride": 24})
    assert info.n_patches == 5 * 3 * 24  # x: 0, 24, 48, 72, 80 (edge-aligned); y: 0, 24, 48; 24 slices


def test_cli_flags_errors_and_unknown_keys(tmp_path, capsys):
    cli = _cli_module()
    rc = cli.main(
        [
            "--input",
            str(NIB_DATA / "anatomical.nii"),
            "--name",
            "t1",
            "--image-size",
            "64",
            "--targetdir",
            str(tmp_path),
            "--progress",
            "false",
        ]
    )
    assert rc == 1  # too small for 64 px: error, no file
    assert "smaller than image_size=64" in capsys.readouterr().err
    assert not (tmp_path / "t1_p64_s32.h5").exists()
    rc = cli.main(
        [
            f"--input={NIB_DATA / 'anatomical.nii'}",
            "--name=t1",
            "--image_size=16",
            "--stride=8",
            f"--targetdir={tmp_path}",
            "--intensity=0,500",
            "--progress=false",
        ]
    )
    assert rc == 0
    assert inspect_hdf5(tmp_path / "t1_p16_s8.h5").settings["intensity"] == [0.0, 500.0]
    with pytest.raises(SystemExit):
        cli.main(["name=x", "colour=blue"])
    assert cli.main(["name=x", f"targetdir={tmp_path}"]) == 2  # no input


def test_split_is_the_shared_subject_split_with_todays_numbers():
    from meddiff.data.splits import split_groups

    names = [f"sub-{i // 2}_v{i % 2}" for i in range(14)]
    # pinned before the split moved to meddiff.data.splits: same seed, same volumes per split
    assert split_by_volume(names, 0.2, 0.2, seed=0, subject_regex=r"^(sub-\d+)") == {
        "train": [0, 1, 2, 3, 6, 7, 10, 11, 12, 13], "val": [8, 9], "test": [4, 5]}
    assert split_by_volume(names, 0.1, 0.3, seed=0) == {
        "train": [1, 6, 7, 8, 9, 10, 11, 12, 13], "val": [4], "test": [0, 2, 3, 5]}
    assert split_by_volume(names, 0.2, 0.2, seed=5) == split_groups(names, 0.2, 0.2, seed=5)
    with pytest.raises(ConfigError, match="val_fraction"):
        HDF5PatchDataModule("unused.h5", val_fraction=0.6, test_fraction=0.5)  # checked once, at construction


def test_datamodule_is_a_split_datamodule_and_noisy_dataset_matches_its_splits(multi_h5):
    from meddiff.data.base import SplitDataModule

    dm = HDF5PatchDataModule(multi_h5, noise_std=0.1, val_fraction=0.2, test_fraction=0.2, seed=3, batch_size=64)
    assert isinstance(dm, SplitDataModule)
    for split in ("train", "val", "test"):
        ds, same = dm.dataset(split), dm.noisy_dataset(split)
        assert ds.volumes == same.volumes == dm.splits[split]
        np.testing.assert_array_equal(same.coords, dm.info.coords[same.rows])
        assert set(same.coords[:, 0].tolist()) == set(dm.splits[split])
        if split != "train":  # val/test noise: the same per patch, whichever way the dataset was made
            assert torch.equal(ds[3]["cond"], same[3]["cond"])
            louder = dm.noisy_dataset(split, noise_std=0.3)  # another level: the same noise draw, scaled
            torch.testing.assert_close(louder[3]["cond"] - louder[3]["image"], 3 * (same[3]["cond"] - same[3]["image"]))
    assert dm.split_names()["test"] == [dm.info.names[v] for v in dm.splits["test"]]
