"""Slice range, slice extraction on real NIfTI files nibabel ships, and dataset.json errors (seed 004)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddiff.data.formats.adni_json import entry_from_dict, read_dataset_json
from meddiff.data.formats.nifti import FrameWarning
from meddiff.data.modules.adni.dataset import ADNISliceDataset
from meddiff.data.preprocess.mri_slices import SliceSettings, extract_slices, slice_range, volume_slices
from meddiff.errors import ConfigError, DataError

NIB_DATA = Path(os.path.dirname(nib.__file__)) / "tests" / "data"


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def _blob(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Ellipsoid 'brain' of random positive intensities on a zero background."""
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(x**2 for x in g) < 0.7
    rng = np.random.default_rng(seed)
    return np.where(inside, 100.0 + 900.0 * rng.random(shape), 0.0).astype(np.float32)


def _counts(meta: np.ndarray) -> tuple[int, int, int]:
    return tuple(int((meta[:, 0] == a).sum()) for a in range(3))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ slice_range
def test_slice_range_matches_seed_text_for_128() -> None:
    # Seed: "This results in 52 slices for each dimension starting from 44th slice to 95th slice" (n = 128)
    expected = list(range(44, 95 + 1))
    assert len(expected) == 52
    assert slice_range(128) == expected
    assert slice_range(128, 0.35, 0.75) == expected


def test_156_slices_per_seed_sized_volume() -> None:
    # Seed: "For each scan, 156 slices were extracted" (128^3 volumes, 3 axes x 52)
    vol = np.zeros((128, 128, 128), np.float32)
    slices, meta = extract_slices(vol, size=128)
    assert slices.shape == (156, 1, 128, 128)
    assert [m for m in meta if m[0] == 2] == [(2, i) for i in range(44, 96)]
    assert [a for a, _ in meta] == [0] * 52 + [1] * 52 + [2] * 52


def test_slice_range_rounding_and_validation() -> None:
    assert slice_range(100) == list(range(35, 75))  # floor(35.0) .. floor(75.0) exclusive
    assert slice_range(100, 0.29, 0.5) == list(
        range(29, 50)
    )  # 0.29*100 = 28.999..: no slice lost to float error
    assert slice_range(33) == list(range(11, 24))  # floor(11.55)=11 .. floor(24.75)=24 exclusive
    assert slice_range(2) == [0]  # never empty
    assert slice_range(10, 0.0, 1.0) == list(range(10))
    for lo, hi in [(0.75, 0.35), (-0.1, 0.5), (0.2, 1.2), (0.5, 0.5)]:
        with pytest.raises(ConfigError, match="lo="):
            slice_range(128, lo, hi)
    with pytest.raises(ConfigError):
        slice_range(0)


# --------------------------------------------------------------------------------- real nibabel files
def test_anatomical_nii_slice_counts_per_axis() -> None:
    path = NIB_DATA / "anatomical.nii"
    assert path.is_file(), "nibabel's test data should ship anatomical.nii"
    vs = volume_slices(path, SliceSettings(image_size=48))
    assert vs.shape == (33, 41, 25)
    # floor(.35n)..floor(.75n)-1: 33 -> 11..23 (13), 41 -> 14..29 (16), 25 -> 8..17 (10)
    assert _counts(vs.meta) == (13, 16, 10)
    assert vs.images.shape == (39, 1, 48, 48) and vs.images.dtype == np.float32
    assert vs.masks.shape == (39, 1, 48, 48) and vs.masks.dtype == bool
    assert list(vs.meta[:13, 1]) == list(range(11, 24))
    assert list(vs.meta[-10:, 1]) == list(range(8, 18))
    assert vs.images.min() >= -1.0 and vs.images.max() <= 1.0
    assert vs.images.max() > 0.9 and vs.images.min() == -1.0  # uses the whole range
    outside = vs.images[~vs.masks]  # padding + background (+ interpolated edge pixels of the resize)
    assert outside.size > 0 and (outside <= -0.5).mean() > 0.97


def test_example4d_uses_frame_0() -> None:
    path = NIB_DATA / "example4d.nii.gz"
    assert path.is_file()
    img = nib.load(str(path))
    assert img.shape == (128, 96, 24, 2)
    with pytest.warns(FrameWarning):
        vs0 = volume_slices(path, SliceSettings(image_size=32))
    # 128 -> 44..95 (52), 96 -> floor(33.6)=33 .. floor(72)=72 excl (39), 24 -> floor(8.4)=8 .. 18 excl (10)
    assert vs0.shape == (128, 96, 24)
    assert _counts(vs0.meta) == (52, 39, 10)
    assert vs0.images.shape == (101, 1, 32, 32)
    # frame 0 of the 4D file gives exactly what a 3D file holding that frame gives
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p3 = _save(Path(d) / "f0.nii.gz", np.asarray(img.dataobj)[..., 0], img.affine)
        ref = volume_slices(p3, SliceSettings(image_size=32))
    np.testing.assert_array_equal(vs0.images, ref.images)
    with pytest.warns(FrameWarning):
        vs1 = volume_slices(path, SliceSettings(image_size=32, frame=1))
    assert not np.array_equal(vs0.images, vs1.images)
    with pytest.raises(DataError, match="frame"):
        volume_slices(path, SliceSettings(image_size=32, frame=5))


# ------------------------------------------------------------------------------- pixels and geometry
def test_normalisation_maps_foreground_percentiles_to_unit_range(tmp_path: Path) -> None:
    vol = _blob((32, 32, 32))
    vs = volume_slices(_save(tmp_path / "v.nii.gz", vol), SliceSettings(image_size=32))
    fg = vol > 0
    assert vs.images.min() == -1.0 and vs.images.max() == 1.0
    # the slice (0, 16) at native size: mask is exactly the foreground (rotated for display)
    k = [tuple(m) for m in vs.meta].index((0, 16))
    np.testing.assert_array_equal(vs.masks[k, 0], np.rot90(fg[16]))
    assert np.all(vs.images[k, 0][~vs.masks[k, 0]] == -1.0)
    # a foreground voxel at the median maps near 0 (linear 1..99 percentile scaling)
    med = np.median(vol[fg])
    near = np.abs(np.rot90(vol[16]) - med) < 5
    assert near.any() and np.all(np.abs(vs.images[k, 0][near]) < 0.05)


def test_non_square_slices_are_padded_not_stretched() -> None:
    vol = 10.0 + np.random.default_rng(0).random((40, 20, 30)).astype(np.float32)  # all foreground-ish
    vol[0, 0, 0] = 0.0  # the minimum: background defined as voxels at the minimum
    slices, meta = extract_slices(vol, axes=(0,), size=60, pad_value=-1.0)
    # axis-0 slice is Y x Z = 20 x 30 -> rot90 -> 30 rows x 20 cols -> pad to 30x30 -> 60x60: 40 content cols
    assert slices.shape == (len(slice_range(40)), 1, 60, 60)
    content = slices[3, 0] > 4.5  # halfway between padding (-1) and content (10..11)
    content_cols, content_rows = content.any(axis=0), content.any(axis=1)
    assert abs(int(content_cols.sum()) - 40) <= 1
    assert int(content_rows.sum()) == 60
    assert np.all(slices[3, 0][:, :9] == -1.0) and np.all(slices[3, 0][:, -9:] == -1.0)  # centred padding


def test_canonical_orientation_and_display_rotation(tmp_path: Path) -> None:
    vol = _blob((24, 28, 32), seed=1)
    vol[14:18, 20:24, 12:20] = 5000.0  # marker: right of centre, anterior, mid-height
    ras = _save(tmp_path / "ras.nii.gz", vol, np.diag([2.0, 2.0, 2.0, 1.0]))
    las_aff = np.diag([-2.0, 2.0, 2.0, 1.0])
    las_aff[0, 3] = 2.0 * 23
    las = _save(tmp_path / "las.nii.gz", vol[::-1].copy(), las_aff)
    assert nib.aff2axcodes(nib.load(str(las)).affine) == ("L", "A", "S")
    s = SliceSettings(image_size=32, pct_hi=99.9)
    a, b = volume_slices(ras, s), volume_slices(las, s)
    np.testing.assert_array_equal(a.images, b.images)
    # axial slice through the marker (axis 2, index 16): anterior is at the top, right is on the right
    k = [tuple(m) for m in a.meta].index((2, 16))
    ys, xs = np.nonzero(a.images[k, 0] > 0.999)
    assert ys.size and ys.mean() < 16 and xs.mean() > 16


# ---------------------------------------------------------------------------------- dataset.json
def _task(tmp_path: Path, records: list[dict]) -> Path:
    tdir = tmp_path / "2d_cfg_anom_det"
    _save(tdir / "cn" / "cn0.nii.gz", _blob((20, 20, 20)))
    _save(tdir / "ad" / "ad0.nii.gz", _blob((20, 20, 20), seed=2))
    (tdir / "dataset.json").write_text(json.dumps(records))
    return tdir / "dataset.json"


def test_dataset_json_parses_seed_format_and_alias(tmp_path: Path) -> None:
    p = _task(
        tmp_path, [{"image": "cn/cn0.nii.gz", "slice_label": 1}, {"image": "ad/ad0.nii.gz", "label": 5}]
    )
    e = read_dataset_json(p)
    assert [(x.volume_id, x.slice_label, x.class_label, x.label) for x in e] == [
        ("cn/cn0", 1, 0, 0),
        ("ad/ad0", 5, 4, 1),
    ]
    assert e[1].path == p.parent / "ad" / "ad0.nii.gz" and e[1].subject == "ad/ad0"
    assert entry_from_dict({"image": "ad/ad0.nii.gz", "slice_label": "AD"}, p.parent).slice_label == 5
    with pytest.raises(DataError, match="disagree"):
        entry_from_dict({"image": "ad/ad0.nii.gz", "slice_label": 5, "label": 4}, p.parent)


def test_dataset_json_missing_file_names_entry(tmp_path: Path) -> None:
    p = _task(
        tmp_path, [{"image": "cn/cn0.nii.gz", "slice_label": 1}, {"image": "ad/ad7.nii.gz", "slice_label": 5}]
    )
    with pytest.raises(DataError, match=r"entry #1 \(image 'ad/ad7.nii.gz'\).*not found"):
        read_dataset_json(p)
    assert len(read_dataset_json(p, check_files=False)) == 2  # deferred to loading, which can skip it


@pytest.mark.parametrize("bad", [6, 0, -1, "7", "XYZ", 2.5, True])
def test_dataset_json_label_outside_range_names_entry(tmp_path: Path, bad: object) -> None:
    p = _task(
        tmp_path,
        [{"image": "cn/cn0.nii.gz", "slice_label": 1}, {"image": "ad/ad0.nii.gz", "slice_label": bad}],
    )
    with pytest.raises(DataError, match=r"entry #1 \(image 'ad/ad0.nii.gz'\).*slice_label"):
        read_dataset_json(p)


def test_dataset_json_structure_errors(tmp_path: Path) -> None:
    p = _task(tmp_path, [])
    p.write_text('[{"image": "cn/cn0.nii.gz", "slice_label": 1} {"image": "ad/ad0.nii.gz"}]')
    with pytest.raises(DataError, match="not valid JSON"):
        read_dataset_json(p)
    p.write_text(json.dumps([{"image": "cn/cn0.nii.gz"}]))
    with pytest.raises(DataError, match=r"entry #0.*no 'slice_label'"):
        read_dataset_json(p)
    p.write_text(
        json.dumps([{"image": "cn/cn0.nii.gz", "slice_label": 1}, {"image": "./cn/cn0.nii.gz", "label": 1}])
    )
    with pytest.raises(DataError, match="repeats"):
        read_dataset_json(p)
    with pytest.raises(DataError, match="not found"):
        read_dataset_json(tmp_path / "nope" / "dataset.json")


@pytest.mark.parametrize("shape", [(20, 20), (20, 20, 1)])
def test_2d_file_names_entry(tmp_path: Path, shape: tuple[int, ...]) -> None:
    p = _task(
        tmp_path,
        [{"image": "cn/cn0.nii.gz", "slice_label": 1}, {"image": "mci/flat.nii.gz", "slice_label": 3}],
    )
    _save(p.parent / "mci" / "flat.nii.gz", np.ones(shape, np.float32))
    entries = read_dataset_json(p)
    with pytest.raises(DataError, match=r"entry #1 \(image 'mci/flat.nii.gz'.*2D"):
        volume_slices(entries[1])
    for cache in (None, tmp_path / "cache"):
        with pytest.raises(DataError, match=r"entry #1 \(image 'mci/flat.nii.gz'.*2D"):
            ADNISliceDataset(entries, image_size=16, cache_dir=cache, skip_bad=False)


def test_batch_conversion_skips_broken_volumes_and_lists_them(tmp_path: Path) -> None:
    p = _task(
        tmp_path,
        [
            {"image": "cn/cn0.nii.gz", "slice_label": 1},
            {"image": "mci/flat.nii.gz", "slice_label": 3},
            {"image": "ad/ad0.nii.gz", "slice_label": 5},
            {"image": "ad/truncated.nii.gz", "slice_label": 5},
            {"image": "ad/gone.nii.gz", "slice_label": 5},
        ],
    )
    _save(p.parent / "mci" / "flat.nii.gz", np.ones((20, 20), np.float32))
    good = (p.parent / "ad" / "ad0.nii.gz").read_bytes()
    (p.parent / "ad" / "truncated.nii.gz").write_bytes(gzip.compress(gzip.decompress(good)[:600]))
    entries = read_dataset_json(p, check_files=False)
    for cache in (None, tmp_path / "cache"):
        with pytest.warns(UserWarning, match="skipped 3 of 5 volumes") as rec:
            ds = ADNISliceDataset(entries, image_size=16, cache_dir=cache)
        assert [img for img, _ in ds.skipped] == ["mci/flat.nii.gz", "ad/truncated.nii.gz", "ad/gone.nii.gz"]
        assert all("entry #" in why for _, why in ds.skipped)
        assert "ad/gone.nii.gz" in str([w.message for w in rec])
        assert [e.volume_id for e in ds.volumes] == ["cn/cn0", "ad/ad0"]
        assert len(ds) == 2 * 3 * len(slice_range(20))
        assert ds[len(ds) - 1]["id"].startswith("ad/ad0:2:")
    with (
        pytest.raises(DataError, match="none of the 1 volumes"),
        pytest.warns(UserWarning, match="skipped 1"),
    ):
        ADNISliceDataset(entries[1:2], image_size=16)
