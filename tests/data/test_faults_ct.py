"""Data faults of the RSNA CT pipeline (issue 9): each gets a clear error or a skip-and-report line.

- a DICOM without RescaleIntercept is refused and listed in the cache's skip list (never decoded as HU + 1024);
- a changed (repaired) DICOM is decoded again: the cache's stamps cover each file's size, mtime and a hash of its
  first and last few kB (so a same-size replacement with its mtime kept is caught too), only the chunk holding it is
  rebuilt, and it leaves the skip list;
- temporary files of a killed cache builder are removed when the next build starts;
- a given-but-missing data.root is a DataError naming it; phantoms go only where the config says.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

import meddiff.data.preprocess.rsna_slices as rsna_slices
from meddiff.data.formats.dicom import MissingRescaleError, read_dicom
from meddiff.data.modules.rsna_ct import RSNACTDataModule
from meddiff.data.preprocess.cache import source_stamp
from meddiff.data.synthetic.ct import write_synthetic_rsna
from meddiff.errors import ConfigError, DataError

CT_SMALL = get_testdata_file("CT_small.dcm")
S = 32


def _dm(root: Path | None, cache_dir: Path, **kw) -> RSNACTDataModule:
    args = dict(image_size=S, windows=["brain"], batch_size=4, val_fraction=0.25, test_fraction=0.25, seed=0,
                cache_workers=0, chunk_size=4, progress=False, synthetic_patients=4, synthetic_slices_per_patient=3,
                synthetic_image_size=64, min_brain_fraction=0.05)
    args.update(kw)
    return RSNACTDataModule(root, cache_dir=cache_dir, **args)


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """12 synthetic slices (4 patients x 3) in the RSNA layout; one truncated file, one near-empty slice."""
    root = tmp_path_factory.mktemp("faults_ct") / "rsna"
    table = write_synthetic_rsna(root, n_patients=4, slices_per_patient=3, image_size=64, seed=0)
    return root, table


def _victim(table: pd.DataFrame) -> str:
    """A healthy, usable slice with intercept -1024 (decoding it with intercept 0 would read HU + 1024)."""
    ok = table[(table["variant"] == "signed16") & ~table["truncated"] & ~table["near_empty"]]
    return str(ok["id"].iloc[1])


# ---------------------------------------------------------------------------------------------- RescaleIntercept
def test_dicom_without_rescale_intercept_is_refused(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    del ds.RescaleIntercept
    path = tmp_path / "no_intercept.dcm"
    ds.save_as(path)
    with pytest.raises(MissingRescaleError, match=r"no_intercept\.dcm.*RescaleIntercept \(0028,1052\)"):
        read_dicom(path)
    assert issubclass(MissingRescaleError, DataError)  # loops that skip DataErrors skip it too
    ds.RescaleIntercept = ""  # present but empty: just as ambiguous
    ds.save_as(path)
    with pytest.raises(MissingRescaleError):
        read_dicom(path)
    # without RescaleSlope the identity slope 1 applies (every RSNA file stores 1)
    ds = pydicom.dcmread(CT_SMALL)
    del ds.RescaleSlope
    ds.save_as(path)
    np.testing.assert_array_equal(read_dicom(path).hu, read_dicom(CT_SMALL).hu)


def test_missing_intercept_is_skipped_and_listed_then_the_repaired_file_is_decoded_again(
    syn, tmp_path, monkeypatch, caplog
):
    src, table = syn
    root = tmp_path / "rsna"
    subprocess.run(["cp", "-a", str(src), str(root)], check=True)  # -a keeps mtimes: same stamps as src
    victim = _victim(table)
    path = root / "stage_2_train" / f"{victim}.dcm"
    ds = pydicom.dcmread(path)
    intercept = ds.RescaleIntercept
    del ds.RescaleIntercept
    ds.save_as(path)

    m = _dm(root, tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        m.setup("fit")
    skipped = m.cache.skipped.set_index("id")
    assert victim in skipped.index and victim not in set(m.index["id"])
    row = skipped.loc[victim]
    assert row["kind"] == "missing_rescale_intercept"
    assert f"{victim}.dcm" in row["reason"] and "RescaleIntercept" in row["reason"]
    listed = pd.read_csv(m.cache.path / "skipped.csv", dtype=str)
    assert victim in set(listed["id"])
    assert any("missing_rescale_intercept: 1" in r.getMessage() for r in caplog.records)  # the summary line

    # repair the file: only the chunk holding it is decoded again, and it leaves the skip list
    ds.RescaleIntercept = intercept
    ds.save_as(path)
    decoded: list[str] = []
    real = rsna_slices.read_dicom
    monkeypatch.setattr(rsna_slices, "read_dicom", lambda p: decoded.append(Path(p).stem) or real(p))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = _dm(root, tmp_path / "cache")
        again.setup("fit")
    assert again.cache.path == m.cache.path  # same folder: refreshed in place, no orphan cache
    chunk = int(m.cache.index.set_index("id").loc[victim, "chunk"])
    ids = again.cache.index["id"].tolist()
    assert decoded == ids[chunk * 4 : (chunk + 1) * 4] and victim in decoded
    assert victim in set(again.index["id"]) and victim not in set(again.cache.skipped["id"])
    assert victim not in set(pd.read_csv(again.cache.path / "skipped.csv", dtype=str)["id"])
    assert any("1 source file(s) changed" in r.getMessage() and victim in r.getMessage() for r in caplog.records)
    # its cached image equals a fresh decode of the repaired file
    r = int(again.cache.index.set_index("id").loc[victim, "row"])
    fresh = again.preprocessor()(next(rec for rec in again.records() if rec["id"] == victim))
    np.testing.assert_array_equal(again.cache.get("image", r), fresh.arrays["image"])
    # nothing changed: the next open decodes nothing
    decoded.clear()
    _dm(root, tmp_path / "cache").setup("fit")
    assert decoded == []


def test_a_deleted_or_added_source_file_changes_its_stamp(tmp_path):
    f = tmp_path / "a.dcm"
    assert source_stamp(f) == "missing"
    f.write_bytes(b"abc")
    st = f.stat()
    tag = hashlib.sha256(b"abc").hexdigest()[:16]
    assert source_stamp(f, None) == f"3:{st.st_mtime_ns}:{tag}"
    assert source_stamp(f, tmp_path / "mask.png") == f"3:{st.st_mtime_ns}:{tag};missing"


def test_a_same_size_replacement_with_its_mtime_kept_is_decoded_again(syn, tmp_path, monkeypatch):
    """Issue 20: other pixels of the same byte size copied over a DICOM with its mtime kept (``cp -p``, ``rsync -t``,
    archive extraction) must be decoded again; size + mtime alone never noticed."""
    src, table = syn
    root = tmp_path / "rsna"
    subprocess.run(["cp", "-a", str(src), str(root)], check=True)
    victim = _victim(table)
    path = root / "stage_2_train" / f"{victim}.dcm"
    m = _dm(root, tmp_path / "cache")
    m.setup("fit")
    row = int(m.cache.index.set_index("id").loc[victim, "row"])
    before_img = m.cache.get("image", row)

    ds = pydicom.dcmread(path)
    st = path.stat()
    pixels = ds.pixel_array
    ds.PixelData = (pixels.max() + pixels.min() - pixels).astype(pixels.dtype).tobytes()  # same size, other image
    ds.save_as(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime kept, as cp -p would
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns

    decoded: list[str] = []
    real = rsna_slices.read_dicom
    monkeypatch.setattr(rsna_slices, "read_dicom", lambda p: decoded.append(Path(p).stem) or real(p))
    again = _dm(root, tmp_path / "cache")
    again.setup("fit")
    assert victim in decoded and again.cache.path == m.cache.path
    r = int(again.cache.index.set_index("id").loc[victim, "row"])
    fresh = again.preprocessor()(next(rec for rec in again.records() if rec["id"] == victim))
    np.testing.assert_array_equal(again.cache.get("image", r), fresh.arrays["image"])
    assert not np.array_equal(again.cache.get("image", r), before_img)  # the new pixels, not the stale ones


def test_a_killed_builders_temporary_files_are_removed_at_the_next_build(syn, tmp_path):
    src, _ = syn
    m = _dm(src, tmp_path / "cache")
    folder = m.cache_folder()
    (folder / "chunks").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a builder that died mid-write left this behind
    stale = folder / "chunks" / f".c00001.image.npy.{proc.pid}.k9x_2abc.tmp"
    stale.write_bytes(b"\0" * 4096)
    m.prepare_data()
    assert not stale.exists() and (folder / "complete").is_file()


# ---------------------------------------------------------------------------------------------- data.root
def test_a_given_missing_root_is_an_error_and_nothing_is_written(tmp_path):
    missing, syn_root = tmp_path / "nonexistent", tmp_path / "synthetic_demo"
    m = _dm(missing, tmp_path / "cache", synthetic_root=syn_root)
    with pytest.raises(DataError, match=r"nonexistent' does not exist.*drop the data\.root override.*synthetic_demo"):
        m.prepare_data()
    with pytest.raises(DataError, match="nonexistent' does not exist"):
        _dm(missing, tmp_path / "cache").setup("fit")
    assert not missing.exists() and not syn_root.exists() and not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match="data.root is not set"):
        _dm(None, tmp_path / "cache")


def test_phantoms_go_only_where_the_config_says(tmp_path):
    syn_root = tmp_path / "synthetic_demo"
    m = _dm(None, tmp_path / "cache", synthetic_root=syn_root)  # root: null -> the demo's phantoms
    assert m.root == syn_root and not syn_root.exists()  # instantiating writes nothing
    m.prepare_data()
    assert (syn_root / "stage_2_train.csv").is_file() and len(m.cache) > 0
    # root given equal to synthetic_root: the same place
    assert _dm(syn_root, tmp_path / "cache", synthetic_root=syn_root).may_write_synthetic
    # an explicit synthetic=true writes into the given root (what `data.synthetic=true data.root=...` asks for)
    explicit = tmp_path / "explicit"
    _dm(explicit, tmp_path / "cache2", synthetic=True, synthetic_root=syn_root).prepare_data()
    assert (explicit / "stage_2_train.csv").is_file()


def test_demo_ct_with_a_missing_data_root_fails_naming_it(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from meddiff.train import CONFIG_DIR

    missing = tmp_path / "nonexistent"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train.yaml", overrides=[
            "experiment=demo_ct", f"data.root={missing}", f"paths.data_dir={tmp_path}/data",
            "data.cache_workers=0", "data.progress=false", "data.synthetic_patients=2",
            "data.synthetic_slices_per_patient=2", "data.synthetic_image_size=32",
        ])
    dm = instantiate(cfg.data)
    with pytest.raises(DataError, match=r"nonexistent' does not exist.*drop the data\.root override"):
        dm.prepare_data()
    assert not missing.exists() and not (tmp_path / "data").exists()
