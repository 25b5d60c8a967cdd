"""DICOM reading (HU, 12-bit intercept fix, failures) and CT transforms (windows, brain mask, crop/resize)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from meddiff.data.formats.dicom import needs_intercept_fix, read_dicom, read_dicom_header, rescale_to_hu
from meddiff.data.preprocess.ct_windows import (
    WINDOW_PRESETS,
    brain_fraction,
    brain_mask_from_hu,
    is_near_empty,
    preprocess_hu,
    resolve_windows,
    square_bbox,
    window,
    window_stack,
)
from meddiff.errors import ConfigError, DataError

CT_SMALL = get_testdata_file("CT_small.dcm")


# ---------------------------------------------------------------------------------------------- real CT file
def test_ct_small_hu_matches_header_rescale():
    ds = pydicom.dcmread(CT_SMALL)
    # decode the raw bytes ourselves (signed 16-bit little endian), independent of pydicom's pixel handlers
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns).astype(np.float64)
    expected = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    sl = read_dicom(CT_SMALL)
    assert sl.hu.dtype == np.float32 and sl.hu.shape == (128, 128)
    np.testing.assert_array_equal(sl.hu, expected.astype(np.float32))
    assert float(ds.RescaleIntercept) == -1024.0 and sl.intercept == -1024.0 and not sl.intercept_fixed
    assert sl.hu.min() == raw.min() - 1024  # a real CT: air/fat below 0 HU, bone well above
    assert sl.hu.max() > 1000 and sl.hu.min() < -800
    assert sl.patient_id == "1CT1" and sl.subject == "1CT1"
    assert sl.study_uid == ds.StudyInstanceUID and sl.series_uid == ds.SeriesInstanceUID
    assert sl.z == pytest.approx(float(ds.ImagePositionPatient[2]))
    hdr = read_dicom_header(CT_SMALL)
    assert hdr["rows"] == 128 and hdr["patient_id"] == "1CT1" and hdr["z"] == pytest.approx(sl.z)


def test_ct_small_windowing_range_and_values():
    hu = read_dicom(CT_SMALL).hu
    for name, (c, w) in WINDOW_PRESETS.items():
        x = window(hu, c, w)
        assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0, name
        inside = (hu > c - w / 2) & (hu < c + w / 2)
        np.testing.assert_allclose(x[inside], (hu[inside] - (c - w / 2)) / w, rtol=1e-5, atol=1e-6)
        assert np.all(x[hu <= c - w / 2] == 0.0) and np.all(x[hu >= c + w / 2] == 1.0)
    b = window(hu, 40, 80)
    assert b.min() == 0.0 and b.max() == 1.0  # this slice spans the brain window on both sides
    stack = window_stack(hu, ["brain", "subdural", "bone"])
    assert stack.shape == (3, 128, 128) and stack.min() >= -1 and stack.max() <= 1
    np.testing.assert_allclose(stack[2], window(hu, 600, 2800) * 2 - 1, atol=1e-6)


def test_window_known_values_numpy_and_torch():
    hu = np.array([-1000.0, 0.0, 20.0, 40.0, 60.0, 80.0, 1000.0], dtype=np.float32)
    expected = [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    np.testing.assert_allclose(window(hu, 40, 80), expected, atol=1e-6)
    np.testing.assert_allclose(window(torch.from_numpy(hu), 40, 80).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(window_stack(hu[None], "brain")[0, 0], np.array(expected) * 2 - 1, atol=1e-6)


def test_resolve_windows():
    assert resolve_windows("brain") == [("brain", 40.0, 80.0)]
    assert resolve_windows(["subdural", [50, 100]]) == [("subdural", 80.0, 200.0), ("c50w100", 50.0, 100.0)]
    assert resolve_windows([300, 1500])[0][1:] == (300.0, 1500.0)
    assert resolve_windows({"center": 1, "width": 2, "name": "x"}) == [("x", 1.0, 2.0)]
    with pytest.raises(ConfigError, match="unknown CT window 'lung'"):
        resolve_windows(["lung"])
    with pytest.raises(ConfigError, match="width"):
        resolve_windows([[40, 0]])


# ---------------------------------------------------------------------------------------------- 12-bit fix
def test_intercept_fix_on_synthetic_header():
    # stored values of a quirk file are HU mod 4096: air -1000 -> 3096, water 0, brain 40, bone 1000, -1 HU -> 4095
    px = np.array([[3096, 0, 40], [1000, 4095, 2000]], dtype=np.uint16)
    for intercept in (0.0, 1.0, -99.0):
        hu, used, fixed = rescale_to_hu(px, 1.0, intercept, bits_stored=12, pixel_representation=0)
        assert fixed and used == -1000.0
        np.testing.assert_array_equal(hu, [[-1000, 0, 40], [1000, -1, 2000]])
    assert px[0, 0] == 3096  # input untouched
    # the fix must not fire outside its exact condition
    for bits, rep, intercept in [(12, 0, -1024.0), (12, 0, -100.0), (12, 1, 0.0), (16, 0, 0.0)]:
        assert not needs_intercept_fix(bits, rep, intercept)
        hu, used, fixed = rescale_to_hu(px, 1.0, intercept, bits, rep)
        assert not fixed and used == intercept
        np.testing.assert_array_equal(hu, px.astype(np.float32) + intercept)
    # slope applies after the fix; large 16-bit values do not overflow
    hu, _, _ = rescale_to_hu(px, 2.0, 0.0, 12, 0)
    np.testing.assert_array_equal(hu[0], [-2000 + 1000, 2000 - 1000, 2080 - 1000])
    big = np.array([[65535]], dtype=np.uint16)
    assert rescale_to_hu(big, 1.0, -1024.0, 16, 0)[0][0, 0] == 65535 - 1024


# ---------------------------------------------------------------------------------------------- failures
def test_unreadable_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_dicom(tmp_path / "nope.dcm")
    text = tmp_path / "notes.dcm"
    text.write_text("not a dicom at all")
    with pytest.raises(DataError, match="not a DICOM"):
        read_dicom(text)
    data = open(CT_SMALL, "rb").read()
    cut = tmp_path / "cut_pixels.dcm"
    cut.write_bytes(data[: len(data) - 5000])  # pixel data truncated
    with pytest.raises(DataError, match="cut_pixels"):
        read_dicom(cut)
    cut_header = tmp_path / "cut_header.dcm"
    cut_header.write_bytes(data[:700])  # truncated inside the header
    with pytest.raises(DataError):
        read_dicom(cut_header)
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    nopix = tmp_path / "nopix.dcm"
    ds.save_as(nopix)
    with pytest.raises(DataError, match="no PixelData"):
        read_dicom(nopix)


# ---------------------------------------------------------------------------------------------- brain mask / crop
def _ring_phantom(h: int = 100, w: int = 100, gap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.sqrt(((yy - h / 2) / 38.0) ** 2 + ((xx - w / 2) / 30.0) ** 2)
    hu = np.full((h, w), -1000.0, dtype=np.float32)
    hu[r < 1.0] = 1200.0  # skull
    inside = r < 0.88
    hu[inside] = 30.0  # brain
    hu[(np.abs(yy - h / 2) < 4) & (np.abs(xx - w / 2) < 4)] = 75.0  # a hemorrhage: part of the brain mask
    if gap:  # a 1-px break in the skull ring (suture / thin bone)
        hu[int(h / 2) - 36 : int(h / 2) - 33, int(w / 2)] = 30.0
    return hu, inside


@pytest.mark.parametrize("gap", [False, True])
def test_brain_mask_inside_skull(gap):
    hu, inside = _ring_phantom(gap=gap)
    m = brain_mask_from_hu(hu)
    assert m.dtype == bool
    iou = (m & inside).sum() / (m | inside).sum()
    assert iou > 0.95
    assert not (m & (hu > 300)).any()  # bone excluded
    assert not m[0, 0] and m[50, 50]  # outside excluded, hemorrhage centre included


def test_near_empty_detection_and_bbox():
    air = np.full((64, 64), -1000.0, dtype=np.float32)
    assert not brain_mask_from_hu(air).any()
    assert is_near_empty(brain_mask_from_hu(air), 0.05)
    hu, inside = _ring_phantom()
    m = brain_mask_from_hu(hu)
    assert brain_fraction(m) == pytest.approx(inside.mean(), rel=0.05)
    assert not is_near_empty(m, 0.05) and is_near_empty(m, 0.5)
    r0, c0, side = square_bbox(m, margin=0.0)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    assert side == max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    assert r0 <= rows[0] and r0 + side >= rows[-1] + 1 and c0 <= cols[0] and c0 + side >= cols[-1] + 1


def test_preprocess_non_square_crops_to_brain():
    hu, inside = _ring_phantom(h=122, w=160)  # like a 490 x 638 RSNA slice, scaled
    lesion = np.zeros_like(inside)
    lesion[55:66, 75:86] = True
    out = preprocess_hu(hu, ["brain", "subdural", "bone"], 64, crop_to_brain=True, lesion_mask=lesion)
    img, bm, les = out["image"], out["brain_mask"], out["mask"]
    assert img.shape == (3, 64, 64) and img.dtype == np.float32 and img.min() >= -1 and img.max() <= 1
    assert bm.shape == (1, 64, 64) and bm.dtype == bool and les.shape == (1, 64, 64) and les.dtype == bool
    assert bm.mean() > 2.5 * brain_fraction(brain_mask_from_hu(hu))  # the crop zooms in on the brain
    assert 0 < les.sum() < bm.sum() and not (les & ~bm).any()
    brain_ch = img[0][bm[0] & ~les[0]]  # brain tissue: 30 HU in the brain window (0..80) -> 0.375 -> -0.25
    assert abs(float(np.median(brain_ch)) - (-0.25)) < 0.02
    uncropped = preprocess_hu(hu, "brain", 64, crop_to_brain=False)
    assert uncropped["image"].shape == (1, 64, 64) and uncropped["brain_mask"].mean() < bm.mean()
    with pytest.raises(DataError, match="does not match"):
        preprocess_hu(hu, "brain", 64, lesion_mask=lesion[:10])
