"""Synthetic ADNI phantoms: class-dependent atrophy, the seed's task-dir layout, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddiff.data.synthetic.mri import CLASS_DIRS, generate_volume, write_synthetic_adni
from meddiff.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
VENTRICLE, GREY = 4, 2


def test_ventricles_grow_and_cortex_thins_with_class_severity() -> None:
    vent: dict[int, float] = {}
    grey: dict[int, float] = {}
    for c in range(1, 6):
        v, g = [], []
        for i in range(5):
            _, lab = generate_volume(c, (40, 40, 40), np.random.default_rng([7, c, i]), return_labels=True)
            v.append(int((lab == VENTRICLE).sum()))
            g.append(int((lab == GREY).sum()))
        vent[c], grey[c] = float(np.mean(v)), float(np.mean(g))
    assert vent[5] > 2.0 * vent[1], vent  # AD ventricles clearly larger than CN
    assert all(vent[c] < vent[c + 1] for c in range(1, 5)), vent  # CN < EMCI < MCI < LMCI < AD
    assert grey[5] < 0.8 * grey[1], grey  # thinner cortex, wider sulci


def _central_csf_voxels(path: Path) -> int:
    """Dark (CSF-like) voxels in the central box of a written volume, measured from the image alone."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    vol = np.asarray(img.get_fdata(dtype=np.float32))
    wm = np.percentile(vol[vol > 0], 90)
    X, Y, Z = vol.shape
    box = vol[int(0.3 * X) : int(0.7 * X), int(0.25 * Y) : int(0.75 * Y), int(0.35 * Z) : int(0.75 * Z)]
    return int(((box > 0) & (box < 0.35 * wm)).sum())


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_adni(tmp_path_factory.mktemp("adni"), n_per_class=4, shape=(40, 40, 40), seed=3)


def test_written_ad_volumes_have_larger_ventricles_than_cn(task_dir: Path) -> None:
    cn = [_central_csf_voxels(task_dir / "cn" / f"cn{i}.nii.gz") for i in range(4)]
    ad = [_central_csf_voxels(task_dir / "ad" / f"ad{i}.nii.gz") for i in range(4)]
    assert np.mean(ad) > 1.5 * np.mean(cn), (cn, ad)


def test_task_dir_layout_and_dataset_json_match_the_seed(task_dir: Path) -> None:
    assert task_dir.name == "2d_cfg_anom_det"
    assert sorted(p.name for p in task_dir.iterdir() if p.is_dir()) == ["ad", "cn", "emci", "lmci", "mci"]
    records = json.loads((task_dir / "dataset.json").read_text())
    assert records[0] == {"image": "cn/cn0.nii.gz", "slice_label": 1}
    assert {"image": "ad/ad3.nii.gz", "slice_label": 5} in records
    assert len(records) == 20 and all(set(r) == {"image", "slice_label"} for r in records)
    for r in records:
        assert r["image"].startswith(CLASS_DIRS[r["slice_label"]] + "/")
        assert (task_dir / r["image"]).is_file()
    img = nib.load(str(task_dir / "mci" / "mci2.nii.gz"))
    assert img.shape == (40, 40, 40) and img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    data = np.asarray(img.dataobj)
    assert (data == 0).mean() > 0.3 and data.max() > 500  # skull-stripped: zero background, bright brain


def test_same_seed_same_voxels_other_seed_differs(tmp_path: Path) -> None:
    a = write_synthetic_adni(tmp_path / "a", 1, (20, 20, 20), seed=5)
    b = write_synthetic_adni(tmp_path / "b", 1, (20, 20, 20), seed=5)
    c = write_synthetic_adni(tmp_path / "c", 1, (20, 20, 20), seed=6)

    def arr(d: Path) -> np.ndarray:
        return np.asarray(nib.load(str(d / "lmci" / "lmci0.nii.gz")).dataobj)

    np.testing.assert_array_equal(arr(a), arr(b))
    assert not np.array_equal(arr(a), arr(c))
    with pytest.raises(ConfigError, match="already exists"):
        write_synthetic_adni(tmp_path / "a", 1, (20, 20, 20), seed=5)
    with pytest.raises(ConfigError, match="slice_label"):
        generate_volume(6, (20, 20, 20), 0)
    with pytest.raises(ConfigError, match="shape"):
        write_synthetic_adni(tmp_path / "d", 1, (20, 20), seed=5)


def test_cli_writes_task_dir(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "make_synthetic_adni.py"),
        "--root",
        str(tmp_path),
        "--n-per-class",
        "1",
        "--shape",
        "20",
        "24",
        "16",
        "--seed",
        "1",
        "--no-bias-field",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    records = json.loads((tmp_path / "2d_cfg_anom_det" / "dataset.json").read_text())
    assert [x["slice_label"] for x in records] == [1, 2, 3, 4, 5]
    assert nib.load(str(tmp_path / "2d_cfg_anom_det" / "ad" / "ad0.nii.gz")).shape == (20, 24, 16)
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r2.returncode == 2 and "already exists" in r2.stderr
