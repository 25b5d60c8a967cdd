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
    r3 = subprocess.run(
        [*cmd[:4], "--task", "m", "--atrophy", "matched", "--n-per-class", "1", "0", "0", "0", "2", *cmd[6:-1]],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r3.returncode == 0, r3.stderr
    assert "wrote 3 volumes" in r3.stdout
    assert json.loads((tmp_path / "m" / "synthetic.json").read_text())["atrophy"] == "matched"


# ------------------------------------------------------------------------- default pinned, the matched task
def test_default_phantoms_are_pinned() -> None:
    """``atrophy="global"`` (the default) writes what it wrote before the option existed: stored demo caches and
    test numbers rely on it (values from the generator before the ``atrophy`` option)."""
    v = generate_volume(5, (20, 20, 20), np.random.default_rng([0, 5, 0]))
    assert v.sum(dtype=np.float64) == pytest.approx(946172.2723617554, rel=1e-6)
    assert (float(v[10, 10, 10]), float(v.max())) == pytest.approx((271.19708251953125, 1037.0469970703125), rel=1e-6)
    w = generate_volume(1, (24, 20, 16), np.random.default_rng([3, 1, 2]), bias_field=False, atrophy="global")
    assert w.sum(dtype=np.float64) == pytest.approx(2046572.8044891357, rel=1e-6)


def _normalised_slice_means(
    label: int, n: int, atrophy: str, shape=(24, 24, 24)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per volume: the mean and the maximum over its default slices of the slices' mean normalised intensity in
    the brain (what the mean-intensity baseline sees, with two of its slice reductions), and its ventricle voxel
    count."""
    from meddiff.data.formats.nifti import robust_normalise
    from meddiff.data.preprocess.mri_slices import extract_slices

    means, maxes, vent = [], [], []
    for i in range(n):
        vol, lab = generate_volume(label, shape, np.random.default_rng([11, label, i]), atrophy=atrophy,
                                   return_labels=True)
        fg = vol > vol.min()
        img, _ = extract_slices(robust_normalise(vol, fg), size=shape[0])
        mask, _ = extract_slices(fg.astype(np.float32), size=shape[0], pad_value=0.0)
        m = mask > 0.5
        per_slice = (img * m).sum((1, 2, 3)) / np.maximum(m.sum((1, 2, 3)), 1)
        means.append(float(per_slice.mean()))
        maxes.append(float(per_slice.max()))
        vent.append(int((lab == VENTRICLE).sum()))
    return np.array(means), np.array(maxes), np.array(vent, float)


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg) (+ half the ties): the AUROC of 'larger = positive'."""
    d = pos[:, None] - neg[None, :]
    return float((d > 0).mean() + 0.5 * (d == 0).mean())


def test_matched_atrophy_hides_the_class_from_the_mean_intensity_but_not_from_the_anatomy() -> None:
    cn_m, cn_max, cn_v = _normalised_slice_means(1, 12, "matched", (32, 32, 32))
    ad_m, ad_max, ad_v = _normalised_slice_means(5, 12, "matched", (32, 32, 32))
    assert 0.3 <= _auroc(cn_m, ad_m) <= 0.7, (cn_m, ad_m)  # the mean intensity does not tell AD from CN
    assert abs(ad_m.mean() - cn_m.mean()) < 0.01
    # nor does its brightest slice (one global CSF gap kept the mean but brightened AD's slices away from the
    # ventricles: AUROC 0.88 here; the gap fitted slice by slice keeps it near chance)
    assert 0.25 <= _auroc(cn_max, ad_max) <= 0.75, (cn_max, ad_max)
    assert _auroc(cn_v, ad_v) >= 0.85, (cn_v, ad_v)  # the atrophy is there: larger ventricles
    g_cn, _, _ = _normalised_slice_means(1, 4, "global")
    g_ad, _, _ = _normalised_slice_means(5, 4, "global")
    assert _auroc(g_cn, g_ad) in (0.0, 1.0)  # the default task: the mean intensity alone separates them


def test_per_class_counts_and_the_options_record(tmp_path: Path) -> None:
    task = write_synthetic_adni(tmp_path, n_per_class=[2, 0, 1, 0, 3], shape=(20, 20, 20), seed=4,
                                atrophy="matched")
    records = json.loads((task / "dataset.json").read_text())
    assert [r["slice_label"] for r in records] == [1, 1, 3, 5, 5, 5]
    assert sorted(p.name for p in task.iterdir() if p.is_dir()) == ["ad", "cn", "mci"]
    options = json.loads((task / "synthetic.json").read_text())
    assert options["atrophy"] == "matched" and options["n_per_class"] == [2, 0, 1, 0, 3]
    # counts do not change the voxels: volume i of a class depends on (seed, class, i) only
    one = write_synthetic_adni(tmp_path / "one", 1, (20, 20, 20), seed=4, atrophy="matched")
    np.testing.assert_array_equal(
        np.asarray(nib.load(str(one / "ad" / "ad0.nii.gz")).dataobj),
        np.asarray(nib.load(str(task / "ad" / "ad0.nii.gz")).dataobj),
    )
    for bad in (0, [1, 2], [0, 0, 0, 0, 0], [1, -1, 0, 0, 0]):
        with pytest.raises(ConfigError, match="n_per_class"):
            write_synthetic_adni(tmp_path / "bad", bad, (20, 20, 20))
    with pytest.raises(ConfigError, match="atrophy='focal'"):
        write_synthetic_adni(tmp_path / "bad", 1, (20, 20, 20), atrophy="focal")


def test_datamodule_refuses_a_synthetic_task_dir_written_with_other_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import meddiff.data.synthetic.mri as mri
    from meddiff.data.modules.adni.datamodule import ADNISliceDataModule

    kw = dict(root=str(tmp_path), task="t", image_size=16, synthetic=True, synthetic_shape=(20, 20, 20))
    dm = ADNISliceDataModule(**kw, synthetic_n_per_class=[2, 0, 0, 0, 2], synthetic_atrophy="matched")
    dm.prepare_data()
    assert len(dm.split_entries()["train"]) + len(dm.split_entries()["test"]) + len(dm.split_entries()["val"]) == 4
    ADNISliceDataModule(**kw, synthetic_n_per_class=[2, 0, 0, 0, 2], synthetic_atrophy="matched").prepare_data()
    with pytest.raises(ConfigError, match=r"written with other options \(atrophy: 'matched' there, 'global' asked"):
        ADNISliceDataModule(**kw, synthetic_n_per_class=[2, 0, 0, 0, 2]).prepare_data()
    with pytest.raises(ConfigError, match="n_per_class"):
        ADNISliceDataModule(**kw, synthetic_n_per_class=[2, 2], synthetic_atrophy="matched")
    # the matched generator's parameters are part of the record: retuned parameters make the dir stale
    monkeypatch.setitem(mri.MATCHED, "ventricle_growth", (0.9, 0.0))
    with pytest.raises(ConfigError, match="matched: "):
        ADNISliceDataModule(**kw, synthetic_n_per_class=[2, 0, 0, 0, 2], synthetic_atrophy="matched").prepare_data()


def test_mean_level_sets_the_normalised_mean_and_keeps_order_and_range() -> None:
    from meddiff.data.synthetic.mri import _set_mean_level, _slice_weight

    vol = generate_volume(5, (24, 24, 24), np.random.default_rng(0))  # a global phantom: mean level not set
    fg = vol > 0
    p1, p99 = np.percentile(vol[fg], [1, 99])
    weight = _slice_weight(vol.shape, (0.35, 0.75))[fg]

    def level(v: np.ndarray) -> float:
        u = np.clip((v[fg] - p1) / (p99 - p1), 0, 1)
        return float((weight * u).sum() / weight.sum())

    for target in (0.45, 0.6, 0.7):
        out = _set_mean_level(vol, fg, target)
        assert level(out) == pytest.approx(target, abs=1e-3)
        # the range stays (up to the percentile interpolation between neighbouring voxels)
        np.testing.assert_allclose(np.percentile(out[fg], [1, 99]), (p1, p99), atol=5e-3 * (p99 - p1))
        order = np.argsort(vol[fg], kind="stable")
        assert (np.diff(out[fg][order]) >= -1e-3).all()  # monotone: the anatomy's rank order is kept
        assert (out[~fg] == 0).all()
    assert abs(level(vol) - 0.6) > 0.01  # so the 0.6 case above did change something
