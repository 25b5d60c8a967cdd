"""Data faults of the HDF5 patch path (issue 9): overwritten patches, constant volumes, truncated NIfTI files,
temporary files of killed conversions. Each test breaks one thing the way it breaks in the field."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from meddiff.data.formats.patch_hdf5 import FORMAT_VERSION, inspect_hdf5
from meddiff.data.modules.hdf5_patches import PatchDataset
from meddiff.data.preprocess.nifti_patches import SkippedVolumeWarning, save_as_hdf5
from meddiff.data.synthetic.mr_heads import write_synthetic_volumes
from meddiff.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::meddiff.data.formats.nifti.FrameWarning")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE4D = Path(os.path.dirname(nib.__file__)) / "tests" / "data" / "example4d.nii.gz"
P = 32  # patch size of every file written here (small: fast)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """One small brain phantom ``[48, 48, 6]`` (a volume that converts fine)."""
    return write_synthetic_volumes(tmp_path_factory.mktemp("good"), n=1, shape=(48, 48, 6), seed=3)[0]


def _convert(inputs, out: Path, **kw) -> Path:
    return save_as_hdf5(inputs, "f", out, image_size=P, stride=P, progress=False, **kw)


def _truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------------------------
# 1. overwritten patch values never reach the model
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_file_stores_the_value_range_of_its_patches(good, tmp_path, dtype):
    out = _convert(good, tmp_path, dtype=dtype)
    with h5py.File(out, "r") as f:
        patches = f["patches"][()]
        assert int(f.attrs["format_version"]) == FORMAT_VERSION == 2
        stored = tuple(f.attrs["value_range"])
    assert stored == (float(patches.min()), float(patches.max()))
    assert -1.0 <= stored[0] < stored[1] <= 1.0
    assert inspect_hdf5(out).value_range == stored


@pytest.mark.parametrize("bad_value", [7500.0, np.nan, -1.5])
def test_overwritten_patch_is_a_data_error_naming_file_and_patch(good, tmp_path, bad_value):
    out = _convert(good, tmp_path)
    ds = PatchDataset(out, noise_std=0.1)
    row = len(ds) // 2
    with h5py.File(out, "r+") as f:
        f["patches"][row, 0, 3, 4] = bad_value
    with pytest.raises(DataError, match=rf"patch {row} of '.*{out.name}'.*outside the range"):
        ds[row]
    # through a DataLoader, as in training: the batch never forms
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), shuffle=False)
    with pytest.raises(DataError, match=rf"patch {row} of"):
        next(iter(loader))
    # every other patch still reads
    for i in range(len(ds)):
        if i != row:
            assert ds[i]["image"].abs().max() <= 1.0


def test_format_version_1_file_without_value_range_loads_and_is_checked_against_unit_range(good, tmp_path):
    out = _convert(good, tmp_path)
    with h5py.File(out, "r+") as f:  # what issue-8 files look like
        del f.attrs["value_range"]
        f.attrs["format_version"] = 1
    info = inspect_hdf5(out)
    assert info.format_version == 1 and info.value_range == (-1.0, 1.0)
    ds = PatchDataset(out, noise_std=0.1)
    assert all(ds[i]["image"].abs().max() <= 1.0 for i in range(len(ds)))
    ds.close()  # the reader's handle blocks writing
    with h5py.File(out, "r+") as f:
        f["patches"][0, 0, 0, 0] = 7500.0
    with pytest.raises(DataError, match=rf"patch 0 of '.*{out.name}'"):
        ds[0]


def test_missing_or_tampered_value_range_of_a_version_2_file_is_a_data_error(good, tmp_path):
    out = _convert(good, tmp_path)
    with h5py.File(out, "r+") as f:
        f.attrs["value_range"] = np.array([-1.0, 7500.0])
    with pytest.raises(DataError, match="value_range"):
        inspect_hdf5(out)
    with h5py.File(out, "r+") as f:
        del f.attrs["value_range"]
    with pytest.raises(DataError, match="lacks the attribute 'value_range'"):
        inspect_hdf5(out)


# ----------------------------------------------------------------------------------------------------------
# 2. constant volumes warn and are skipped
# ----------------------------------------------------------------------------------------------------------
def _save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    return path


@pytest.mark.parametrize(
    "kind,reason",
    [("constant", "constant volume"), ("binary", "maps every voxel to -1")],
)
def test_constant_volume_is_skipped_listed_and_logged(good, tmp_path, caplog, kind, reason):
    data = np.full((48, 48, 6), 100.0)
    if kind == "binary":  # a mask saved as an image: the robust window of its foreground is one value
        data[:24] = 0.0
    bad = _save(tmp_path / "in" / f"{kind}.nii.gz", data)
    with caplog.at_level(logging.WARNING, logger="meddiff.data.preprocess.nifti_patches"):
        with pytest.warns(SkippedVolumeWarning, match=rf"{kind}\.nii\.gz: .*{reason}"):
            out = _convert([bad, good], tmp_path / "out")
    info = inspect_hdf5(out)
    assert info.names == [good.name]
    assert [s["file"] for s in info.skipped] == [f"{kind}.nii.gz"] and reason in info.skipped[0]["reason"]
    assert any(f"skipping {kind}.nii.gz: " in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    # alone: nothing to convert is an error naming the file, not a file of -1 patches
    with pytest.raises(DataError, match=rf"{kind}\.nii\.gz: .*{reason}"):
        _convert(bad, tmp_path / "alone")
    assert not (tmp_path / "alone" / "f_p32_s32.h5").exists()


def test_volume_outside_a_fixed_window_is_skipped(good, tmp_path):
    cold = _save(tmp_path / "in" / "cold.nii.gz", np.random.default_rng(0).uniform(-3000, -2000, (48, 48, 6)))
    with pytest.warns(SkippedVolumeWarning, match=r"cold\.nii\.gz: intensity=\(-1000\.0, 1000\.0\) maps"):
        out = _convert([cold, good], tmp_path / "out", intensity=(-1000, 1000))
    assert inspect_hdf5(out).names == [good.name]


# ----------------------------------------------------------------------------------------------------------
# 3. truncated volumes of any dimensionality: skipped under skip_bad, else a DataError naming the file
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("trunc")
    img = nib.load(str(EXAMPLE4D))
    data = np.asarray(img.dataobj)
    full3d = d / "src" / "epi3d.nii.gz"
    full3d.parent.mkdir()
    nib.save(nib.Nifti1Image(data[..., 0], img.affine), str(full3d))
    raw3d = d / "src" / "epi3d.nii"
    nib.save(nib.Nifti1Image(data[..., 0], np.eye(4)), str(raw3d))  # canonical affine: read in get_fdata
    return {
        "4d_gz": _truncate(EXAMPLE4D, d / "cut" / "epi4d_cut.nii.gz"),
        "3d_gz": _truncate(full3d, d / "cut" / "epi3d_cut.nii.gz"),
        "3d_raw": _truncate(raw3d, d / "cut" / "epi3d_cut.nii"),
    }


@pytest.mark.parametrize("which", ["4d_gz", "3d_gz", "3d_raw"])
def test_truncated_volume_is_skipped_under_skip_bad_naming_the_file(good, truncated, tmp_path, caplog, which):
    cut = truncated[which]
    with caplog.at_level(logging.WARNING, logger="meddiff.data.preprocess.nifti_patches"):
        with pytest.warns(SkippedVolumeWarning, match=rf"{cut.name}: .*truncated"):
            out = _convert([cut, good], tmp_path / "out", skip_bad=True)
    info = inspect_hdf5(out)
    assert info.names == [good.name] and info.n_patches > 0
    assert [s["file"] for s in info.skipped] == [cut.name]
    assert any(f"skipping {cut.name}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("which", ["4d_gz", "3d_gz", "3d_raw"])
def test_truncated_volume_without_skip_bad_is_a_data_error_naming_the_file(good, truncated, tmp_path, which):
    cut = truncated[which]
    with pytest.raises(DataError, match=rf"(?s){cut.name}.*truncated"):
        _convert([good, cut], tmp_path / "out", skip_bad=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither output nor temporary file


def test_prepare_hdf5_cli_skips_or_stops_on_a_truncated_4d_file(good, truncated, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import prepare_hdf5
    finally:
        sys.path.pop(0)
    cut = truncated["4d_gz"]
    common = [f"input={good},{cut}", "name=cli", f"targetdir={tmp_path}", "image_size=32", "stride=32",
              "progress=false"]
    with pytest.warns(SkippedVolumeWarning):
        assert prepare_hdf5.main(common + ["skip_bad=true"]) == 0
    out = capsys.readouterr().out
    assert f"{cut.name}: " in out and "skipped 1" in out
    (tmp_path / "cli_p32_s32.h5").unlink()
    assert prepare_hdf5.main(common + ["skip_bad=false"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and cut.name in err and "truncated" in err
    assert not (tmp_path / "cli_p32_s32.h5").exists()


# ----------------------------------------------------------------------------------------------------------
# 4. temporary files of killed conversions are removed when the next conversion starts there
# ----------------------------------------------------------------------------------------------------------
def test_stale_temp_of_a_dead_conversion_is_removed_and_a_live_ones_kept(good, tmp_path, caplog):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dead = out_dir / f".f_p32_s32.h5.{_dead_pid()}.k3x9q2ab.tmp"
    live = out_dir / f".other_p32_s32.h5.{os.getpid()}.z8y7w6vu.tmp"
    unrelated = out_dir / ".keep.tmp"  # not an atomic_write name: never touched
    for p in (dead, live, unrelated):
        p.write_bytes(b"\0" * 1024)
    with caplog.at_level(logging.WARNING, logger="meddiff.data.preprocess.nifti_patches"):
        _convert(good, out_dir)
    assert not dead.exists()
    assert live.exists() and unrelated.exists()
    assert any(dead.name in r.getMessage() and "removed" in r.getMessage() for r in caplog.records)


_HANG = """
import sys, time
from pathlib import Path
import meddiff.data.preprocess.nifti_patches as hp
real = hp._extract
def slow(*a, **k):
    Path(sys.argv[3]).touch()  # the temporary file is open and being written: tell the test
    time.sleep(600)
hp._extract = slow
hp.save_as_hdf5(sys.argv[1], "f", sys.argv[2], image_size=32, stride=32, progress=False)
"""


def test_kill_9_mid_conversion_leaves_a_temp_the_next_conversion_removes(good, tmp_path):
    out_dir, ready = tmp_path / "out", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _HANG, str(good), str(out_dir), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "the conversion subprocess died before writing"
            assert time.monotonic() < deadline, "the conversion subprocess never started writing"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    left = list(out_dir.glob(".*.tmp"))
    assert [p.name.split(".")[3] for p in left] == [str(proc.pid)]  # the fault: a hidden temp, forever
    _convert(good, out_dir)
    assert list(out_dir.glob(".*.tmp")) == []
    assert [p.name for p in out_dir.iterdir()] == ["f_p32_s32.h5"]
