"""HDF5 patch writer / stitcher / reader on nibabel's real EPI brain (example4d) and T1 crop (anatomical)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

import meddiff.data.preprocess.nifti_patches as hp
from meddiff.data.formats.nifti import FrameWarning, load_volume, robust_normalise
from meddiff.data.formats.patch_hdf5 import inspect_hdf5
from meddiff.data.preprocess.nifti_patches import SkippedVolumeWarning, save_as_hdf5
from meddiff.errors import ConfigError, DataError
from meddiff.patches import patch_grid, patch_starts, stitch, stitch_volumes

pytestmark = pytest.mark.filterwarnings("ignore::meddiff.data.formats.nifti.FrameWarning")

NIB_DATA = Path(os.path.dirname(nib.__file__)) / "tests" / "data"
EXAMPLE4D = NIB_DATA / "example4d.nii.gz"
ANATOMICAL = NIB_DATA / "anatomical.nii"


def _expected_slices(path: Path = EXAMPLE4D) -> np.ndarray:
    """Independent path: canonical volume -> robust normalisation, the slices along axis 2."""
    vol, _ = load_volume(path)
    return robust_normalise(vol)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["patches"][()], f["coords"][()], f["slice_shape"][()]


def test_patch_starts_cover_borders():
    np.testing.assert_array_equal(patch_starts(128, 64, 32), [0, 32, 64])
    np.testing.assert_array_equal(patch_starts(128, 40, 32), [0, 32, 64, 88])  # last aligned to the edge
    np.testing.assert_array_equal(patch_starts(96, 40, 32), [0, 32, 56])
    np.testing.assert_array_equal(patch_starts(64, 64, 32), [0])
    assert patch_starts(33, 64, 32).size == 0
    g = patch_grid((96, 70), 40, 40)
    assert {tuple(r) for r in g} == {(y, x) for y in (0, 40, 56) for x in (0, 30)}


@pytest.mark.parametrize("size,stride", [(64, 32), (40, 32), (48, 48), (48, 16)])
def test_round_trip_stitching_reproduces_original_slices_exactly(tmp_path, size, stride):
    out = save_as_hdf5(EXAMPLE4D, "epi", tmp_path, image_size=size, stride=stride, progress=False)
    assert out == tmp_path / f"epi_p{size}_s{stride}.h5"
    patches, coords, slice_shape = _read(out)
    assert patches.dtype == np.float32 and patches.shape[1:] == (1, size, size)
    assert coords.shape == (len(patches), 4)
    np.testing.assert_array_equal(slice_shape, [[128, 96]])
    expected = _expected_slices()
    slices = stitch(patches, coords, slice_shape)
    assert sorted(slices) == [(0, s) for s in range(24)]
    for (_, s), img in slices.items():
        assert img.dtype == np.float32
        np.testing.assert_array_equal(img, expected[:, :, s])  # bit-exact
    # and each stored patch is exactly the crop it claims to be
    for p, (_v, s, y, x) in zip(patches[::17], coords[::17]):
        np.testing.assert_array_equal(p[0], expected[y : y + size, x : x + size, s])


@pytest.mark.parametrize("size,stride", [(64, 32), (40, 32), (40, 40)])
def test_coords_cover_every_pixel(tmp_path, size, stride):
    out = save_as_hdf5(EXAMPLE4D, "epi", tmp_path, image_size=size, stride=stride, progress=False)
    _, coords, _ = _read(out)
    cover = np.zeros((24, 128, 96), dtype=np.int32)
    for v, s, y, x in coords:
        assert v == 0 and 0 <= y <= 128 - size and 0 <= x <= 96 - size
        cover[s, y : y + size, x : x + size] += 1
    assert cover.min() >= 1, "some pixels are not covered by any patch"
    n_expected = len(patch_starts(128, size, stride)) * len(patch_starts(96, size, stride)) * 24
    assert len(coords) == n_expected


def test_canonical_orientation_is_applied_before_patching(tmp_path):
    out = save_as_hdf5(EXAMPLE4D, "epi", tmp_path, progress=False)
    patches, coords, shape = _read(out)
    slices = stitch(patches, coords, shape)
    raw = np.asarray(nib.load(str(EXAMPLE4D)).dataobj)[..., 0].astype(np.float32)  # LAS on disk
    ras = robust_normalise(raw[::-1])
    las = robust_normalise(raw)
    np.testing.assert_array_equal(slices[(0, 10)], ras[:, :, 10])
    assert not np.array_equal(slices[(0, 10)], las[:, :, 10])
    with h5py.File(out) as f:
        assert nib.aff2axcodes(f["affines"][0]) == ("R", "A", "S")
    out2 = save_as_hdf5(EXAMPLE4D, "epi_raw", tmp_path, canonical=False, progress=False)
    p2, c2, s2 = _read(out2)
    np.testing.assert_array_equal(stitch(p2, c2, s2)[(0, 10)], las[:, :, 10])


def test_file_contents_settings_volumes_table_and_chunks(tmp_path):
    out = save_as_hdf5(EXAMPLE4D, "epi", tmp_path, image_size=64, stride=32, dtype="float16", progress=False)
    import hashlib

    with h5py.File(out) as f:
        assert f["patches"].dtype == np.float16
        assert f["patches"].chunks == (1, 1, 64, 64)  # one patch per chunk
        settings = json.loads(f.attrs["settings"])
        assert settings["image_size"] == 64 and settings["stride"] == 32 and settings["axis"] == 2
        assert settings["dtype"] == "float16" and settings["intensity"] == "robust"
        vols = f["volumes"][()]
        assert vols["name"][0].decode() == "example4d.nii.gz"
        assert vols["sha256"][0].decode() == hashlib.sha256(EXAMPLE4D.read_bytes()).hexdigest()
        np.testing.assert_array_equal(vols["shape"][0], [128, 96, 24])
        assert int(vols["n_patches"][0]) == len(f["coords"]) == f.attrs["n_patches"] == 144
        lo, hi = f["intensity_range"][0]
        assert 0 <= lo < hi
    info = inspect_hdf5(out)
    assert info.n_patches == 144 and info.names == ["example4d.nii.gz"]
    assert "144 patches" in info.summary()


def test_stitch_volumes_rebuilds_whole_volume_and_averages_overlaps(tmp_path):
    out = save_as_hdf5(EXAMPLE4D, "epi", tmp_path, image_size=40, stride=24, progress=False)
    patches, coords, _ = _read(out)
    vols = stitch_volumes(patches, coords, [[128, 96, 24]], axis=2)
    np.testing.assert_array_equal(vols[0], _expected_slices())
    # overlaps are averaged: shift one patch's values by +1, the covered pixels move by 1/count
    mod = patches.copy()
    mod[0] += 1.0
    cover = np.zeros((128, 96))
    for _v, s, y, x in coords:
        if s == coords[0, 1]:
            cover[y : y + 40, x : x + 40] += 1
    moved = (
        stitch(mod, coords, (128, 96))[(0, int(coords[0, 1]))]
        - stitch(patches, coords, (128, 96))[(0, int(coords[0, 1]))]
    )
    np.testing.assert_allclose(moved[:40, :40], 1.0 / cover[:40, :40], atol=1e-6)
    assert np.all(moved[40:, :] == 0)


def test_background_filter_keeps_only_foreground_patches(tmp_path):
    all_p = save_as_hdf5(EXAMPLE4D, "all", tmp_path, image_size=32, stride=32, progress=False)
    fg_p = save_as_hdf5(
        EXAMPLE4D, "fg", tmp_path, image_size=32, stride=32, min_foreground=0.5, progress=False
    )
    pa, ca, _ = _read(all_p)
    pf, cf, sf = _read(fg_p)
    assert 0 < len(pf) < len(pa)
    frac = (pf > -0.95).mean(axis=(1, 2, 3))
    assert frac.min() >= 0.5
    frac_all = (pa > -0.95).mean(axis=(1, 2, 3))
    assert (frac_all >= 0.5).sum() == len(pf)
    # uncovered pixels get the fill value when stitching
    sl = stitch(pf, cf, sf, fill=-7.0)
    assert any((img == -7.0).any() for img in sl.values())


def test_small_volume_is_skipped_and_reported_in_a_batch(tmp_path):
    with pytest.warns(SkippedVolumeWarning, match=r"anatomical\.nii.*smaller than image_size=64"):
        out = save_as_hdf5([ANATOMICAL, EXAMPLE4D], "mix", tmp_path, progress=False)
    info = inspect_hdf5(out)
    assert info.names == ["example4d.nii.gz"]
    assert len(info.skipped) == 1 and info.skipped[0]["file"] == "anatomical.nii"
    assert "smaller" in info.skipped[0]["reason"]
    # a folder input works the same way (recursive search)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(ANATOMICAL, folder / "anatomical.nii")
    shutil.copy(EXAMPLE4D, folder / "sub" / "example4d.nii.gz")
    with pytest.warns(SkippedVolumeWarning):
        out2 = save_as_hdf5(folder, "folder", tmp_path, progress=False)
    assert inspect_hdf5(out2).names == ["sub/example4d.nii.gz"]


def test_small_volume_alone_is_an_error_and_leaves_no_file(tmp_path):
    with pytest.raises(DataError, match=r"anatomical\.nii.*smaller than image_size=64"):
        save_as_hdf5(ANATOMICAL, "t1", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither output nor temporary file
    out = save_as_hdf5(ANATOMICAL, "t1", tmp_path, image_size=32, stride=16, progress=False)
    assert inspect_hdf5(out).n_patches > 0


def test_nan_volume_skipped_in_batch_and_error_alone(tmp_path):
    data = np.asarray(nib.load(str(EXAMPLE4D)).dataobj)[..., 0].astype(np.float32)
    data[5, 5, 5] = np.nan
    bad = tmp_path / "in" / "nan_vol.nii.gz"
    bad.parent.mkdir()
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(bad))
    with pytest.raises(DataError, match=r"nan_vol\.nii\.gz.*1 NaN"):
        save_as_hdf5(bad, "nan", tmp_path / "out", progress=False)
    with pytest.warns(SkippedVolumeWarning, match="nan_vol"):
        out = save_as_hdf5([bad, EXAMPLE4D], "nan", tmp_path / "out", progress=False)
    assert inspect_hdf5(out).names == ["example4d.nii.gz"]
    out0 = save_as_hdf5(bad, "nan0", tmp_path / "out", nan_policy="zero", progress=False)
    assert inspect_hdf5(out0).n_patches == 144


def test_write_is_atomic_failure_keeps_previous_file(tmp_path, monkeypatch):
    out = save_as_hdf5(EXAMPLE4D, "epi", tmp_path, progress=False)
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hp, "_extract", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_as_hdf5(EXAMPLE4D, "epi", tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left behind
    assert out.read_bytes() == before


def test_invalid_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="stride=80"):
        save_as_hdf5(EXAMPLE4D, "x", tmp_path, image_size=64, stride=80)
    with pytest.raises(ConfigError, match="axis=3"):
        save_as_hdf5(EXAMPLE4D, "x", tmp_path, axis=3)
    with pytest.raises(ConfigError, match="intensity"):
        save_as_hdf5(EXAMPLE4D, "x", tmp_path, intensity="zscore")
    with pytest.raises(DataError, match="does not exist"):
        save_as_hdf5(tmp_path / "missing.nii.gz", "x", tmp_path)


def test_fixed_window_intensity_and_other_axis(tmp_path):
    out = save_as_hdf5(
        EXAMPLE4D, "win", tmp_path, image_size=24, stride=12, axis=0, intensity=(0, 1000), progress=False
    )
    patches, coords, shape = _read(out)
    np.testing.assert_array_equal(shape, [[96, 24]])
    vol, _ = load_volume(EXAMPLE4D)
    exp = (np.clip(vol.astype(np.float64), 0, 1000) / 1000 * 2 - 1).astype(np.float32)
    sl = stitch(patches, coords, shape)
    assert len(sl) == 128
    np.testing.assert_array_equal(sl[(0, 70)], exp[70])


def test_frame_warning_is_emitted_during_conversion(tmp_path):
    with pytest.warns(FrameWarning):
        save_as_hdf5(EXAMPLE4D, "epi", tmp_path, progress=False)
