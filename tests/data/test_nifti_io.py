"""NIfTI loading (orientation, 4D frames, bad files), robust normalisation and phantoms, on nibabel's real data."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddiff.data.formats.nifti import (
    ConstantVolumeWarning,
    FrameWarning,
    constant_reason,
    load_volume,
    robust_normalise,
)
from meddiff.data.synthetic.mr_heads import write_synthetic_volumes
from meddiff.errors import DataError

NIB_DATA = Path(os.path.dirname(nib.__file__)) / "tests" / "data"
EXAMPLE4D = NIB_DATA / "example4d.nii.gz"  # real EPI brain 128x96x24x2, LAS
ANATOMICAL = NIB_DATA / "anatomical.nii"  # real T1 crop 33x41x25, LAS


def _raw(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).astype(np.float32)


def test_example4d_is_reoriented_to_ras_and_takes_frame0_with_a_note():
    assert nib.aff2axcodes(nib.load(str(EXAMPLE4D)).affine) == ("L", "A", "S")  # the file itself is LAS
    with pytest.warns(FrameWarning, match="frame 0"):
        vol, affine = load_volume(EXAMPLE4D)
    assert vol.dtype == np.float32 and vol.shape == (128, 96, 24)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    raw = _raw(EXAMPLE4D)[..., 0]
    np.testing.assert_array_equal(vol, raw[::-1])  # L->R flip of the first axis
    assert not np.array_equal(vol, raw)
    # the affine still maps each voxel to the same world point
    i, j, k = 10, 20, 5
    world_canon = affine @ np.array([i, j, k, 1.0])
    world_raw = nib.load(str(EXAMPLE4D)).affine @ np.array([127 - i, j, k, 1.0])
    np.testing.assert_allclose(world_canon, world_raw, atol=1e-4)


def test_canonical_false_keeps_file_orientation():
    with pytest.warns(FrameWarning):
        vol, affine = load_volume(EXAMPLE4D, canonical=False)
    np.testing.assert_array_equal(vol, _raw(EXAMPLE4D)[..., 0])
    assert nib.aff2axcodes(affine) == ("L", "A", "S")


def test_frame_choice_and_out_of_range_frame():
    with pytest.warns(FrameWarning, match="frame 1"):
        vol1, _ = load_volume(EXAMPLE4D, frame=1)
    np.testing.assert_array_equal(vol1, _raw(EXAMPLE4D)[::-1, :, :, 1])
    with pytest.raises(DataError, match=r"example4d.*frame=5"):
        load_volume(EXAMPLE4D, frame=5)


def test_anatomical_loads_as_3d_without_frame_note(recwarn):
    vol, affine = load_volume(ANATOMICAL)
    assert vol.shape == (33, 41, 25)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert not [w for w in recwarn if issubclass(w.category, FrameWarning)]


def test_2d_file_is_rejected_naming_the_file(tmp_path):
    p = tmp_path / "slice2d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), str(p))
    with pytest.raises(DataError, match=r"slice2d\.nii\.gz.*2D"):
        load_volume(p)
    p1 = tmp_path / "thin.nii.gz"  # a 2D image stored with a singleton third axis
    nib.save(nib.Nifti1Image(np.ones((16, 16, 1), np.float32), np.eye(4)), str(p1))
    with pytest.raises(DataError, match=r"thin\.nii\.gz.*2D"):
        load_volume(p1)


def test_nan_voxels_raise_with_count_or_are_zeroed(tmp_path):
    data = np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    data[1, 2, 3] = np.nan
    data[4, 4, 0] = np.nan
    data[5, 5, 1] = np.inf
    p = tmp_path / "has_nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(p))
    with pytest.raises(DataError, match=r"has_nan\.nii\.gz.* 3 NaN"):
        load_volume(p)
    vol, _ = load_volume(p, nan_policy="zero")
    assert np.isfinite(vol).all()
    assert vol[1, 2, 3] == 0 and vol[5, 5, 1] == 0 and vol[1, 2, 2] == data[1, 2, 2]


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_volume(tmp_path / "nope.nii.gz")
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"this is not a nifti file" * 10)
    with pytest.raises(DataError, match="garbage"):
        load_volume(bad)


def test_robust_normalise_maps_foreground_percentiles_to_minus1_plus1():
    with pytest.warns(FrameWarning):
        vol, _ = load_volume(EXAMPLE4D)
    out = robust_normalise(vol)
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert out.min() == -1.0 and out.max() == 1.0
    fg = vol[vol > vol.min()]
    lo, hi = np.percentile(fg.astype(np.float64), [1, 99])
    # the 99th percentile and above saturate, values between map linearly
    assert np.all(out[vol >= hi] == 1.0) and np.all(out[vol <= lo] == -1.0)
    mid = (vol > lo) & (vol < hi)
    expected = (vol[mid].astype(np.float64) - lo) / (hi - lo) * 2 - 1
    np.testing.assert_allclose(out[mid], expected, atol=1e-6)
    # about 1% of foreground voxels saturate at the top
    assert 0.002 < np.mean(out[vol > vol.min()] == 1.0) < 0.02


def test_robust_normalise_with_mask_and_constant_volume():
    vol = np.zeros((10, 10, 10), np.float32)
    vol[2:8, 2:8, 2:8] = np.linspace(100, 200, 216).reshape(6, 6, 6)
    vol[0, 0, 0] = 10_000  # an outlier outside the mask must not set the scale
    mask = np.zeros_like(vol, bool)
    mask[2:8, 2:8, 2:8] = True
    out = robust_normalise(vol, mask=mask, lower=0, upper=100)
    assert out[2, 2, 2] == -1.0 and out[7, 7, 7] == 1.0
    assert out[0, 0, 0] == 1.0 and out[9, 9, 9] == -1.0
    with pytest.warns(ConstantVolumeWarning, match=r"constant volume \(every voxel is 3\)"):
        flat = robust_normalise(np.full((4, 4, 4), 3.0))
    np.testing.assert_array_equal(flat, -np.ones((4, 4, 4), np.float32))
    binary = (mask * 5.0).astype(np.float32)  # one value in the foreground: no range to scale, never a 0 division
    assert constant_reason(binary) is not None and "percentiles are both 5" in constant_reason(binary)
    with pytest.warns(ConstantVolumeWarning, match="no intensity range"):
        assert (robust_normalise(binary) == -1.0).all()
    assert constant_reason(vol, mask) is None


def test_synthetic_volumes_are_deterministic_brain_like_and_readable(tmp_path):
    a = write_synthetic_volumes(tmp_path / "a", n=2, shape=(48, 48, 12), seed=3)
    b = write_synthetic_volumes(tmp_path / "b", n=2, shape=(48, 48, 12), seed=3)
    assert [p.name for p in a] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    v0, aff = load_volume(a[0])
    v0b, _ = load_volume(b[0])
    v1, _ = load_volume(a[1])
    np.testing.assert_array_equal(v0, v0b)
    assert not np.array_equal(v0, v1)
    assert v0.shape == (48, 48, 12) and nib.aff2axcodes(aff) == ("R", "A", "S")
    mid = v0[:, :, 6]
    assert mid[0, 0] == 0 and mid[24, 24] > 300  # background outside, tissue inside the head
    head = mid > 0
    assert 0.3 < head.mean() < 0.85
    # several tissue classes: intensity histogram inside the head has distinct modes
    hist, _ = np.histogram(mid[head], bins=[0, 200, 600, 850, 2000])
    assert (hist > 10).sum() >= 3


# ------------------------------------------------------------------------------- truncated and corrupt files
def damaged_copies(tmp_path: Path) -> dict[str, Path]:
    """Real damaged copies of nibabel's data: 4D ``example4d.nii.gz`` cut in half and cut after frame 0's data
    (90 %), a 3D ``.nii.gz`` (``anatomical.nii`` gzipped) cut in half and with one flipped byte, a 3D ``.nii``
    cut in half."""
    import gzip

    ex4d = EXAMPLE4D.read_bytes()
    anat = ANATOMICAL.read_bytes()
    gz3d = gzip.compress(anat, mtime=0)
    mid = len(gz3d) // 2
    blobs = {
        "4d_half.nii.gz": ex4d[: len(ex4d) // 2],
        "4d_after_frame0.nii.gz": ex4d[: int(0.9 * len(ex4d))],
        "3d_half.nii.gz": gz3d[:mid],
        "3d_flipped_byte.nii.gz": gz3d[:mid] + bytes([gz3d[mid] ^ 0xFF]) + gz3d[mid + 1 :],
        "3d_half.nii": anat[: len(anat) // 2],
    }
    out = {}
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
        out[name] = tmp_path / name
    return out


def test_truncated_or_corrupt_files_raise_a_data_error_naming_the_file(tmp_path):
    import warnings

    for name, path in damaged_copies(tmp_path).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FrameWarning)
            with pytest.raises(DataError, match=rf"{name}.*(truncated|corrupt)"):
                load_volume(path)
    # the intact originals still load (the completeness check passes on complete files)
    with pytest.warns(FrameWarning):
        assert load_volume(EXAMPLE4D)[0].shape == (128, 96, 24)
    assert load_volume(ANATOMICAL)[0].shape == (33, 41, 25)
