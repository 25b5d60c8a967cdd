"""ADNI loading under data faults (issue 9): truncated volumes of any dimensionality, constant volumes, replaced
files and the slice cache. Damaged files are real cut copies of nibabel's own data."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiff.data.formats.adni_json import read_dataset_json
from meddiff.data.formats.nifti import FrameWarning
from meddiff.data.modules.adni.datamodule import ADNISliceDataModule
from meddiff.data.modules.adni.dataset import ADNISliceDataset
from meddiff.data.preprocess.mri_slices import SliceSettings, VolumeSliceCache, volume_slices
from meddiff.data.synthetic.mri import generate_volume, write_synthetic_adni
from meddiff.errors import DataError

NIB_DATA = Path(os.path.dirname(nib.__file__)) / "tests" / "data"
EXAMPLE4D = NIB_DATA / "example4d.nii.gz"  # 128x96x24x2 EPI
ANATOMICAL = NIB_DATA / "anatomical.nii"  # 33x41x25 T1


def _task(tmp_path: Path) -> Path:
    """A 2-per-class synthetic task dir plus four extra entries: a truncated 4D ``.nii.gz`` (half of
    ``example4d.nii.gz``), a truncated 3D ``.nii.gz`` (``anatomical.nii`` gzipped, cut in half), an all-constant
    volume and a volume whose foreground has one value (a binary mask)."""
    task = write_synthetic_adni(tmp_path, n_per_class=2, shape=(20, 20, 20), seed=1)
    ex4d = EXAMPLE4D.read_bytes()
    (task / "ad" / "cut4d.nii.gz").write_bytes(ex4d[: len(ex4d) // 2])
    gz3d = gzip.compress(ANATOMICAL.read_bytes(), mtime=0)
    (task / "mci" / "cut3d.nii.gz").write_bytes(gz3d[: len(gz3d) // 2])
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), 7, np.int16), np.eye(4)), str(task / "cn" / "flat.nii.gz"))
    binary = np.zeros((20, 20, 20), np.int16)
    binary[4:16, 4:16, 4:16] = 1
    nib.save(nib.Nifti1Image(binary, np.eye(4)), str(task / "cn" / "mask.nii.gz"))
    records = json.loads((task / "dataset.json").read_text())
    records += [
        {"image": "ad/cut4d.nii.gz", "slice_label": 5},
        {"image": "mci/cut3d.nii.gz", "slice_label": 3},
        {"image": "cn/flat.nii.gz", "slice_label": 1},
        {"image": "cn/mask.nii.gz", "slice_label": 1},
    ]
    (task / "dataset.json").write_text(json.dumps(records))
    return task


BAD = {
    "ad/cut4d.nii.gz": "truncated or corrupt",
    "mci/cut3d.nii.gz": "truncated or corrupt",
    "cn/flat.nii.gz": "constant volume",
    "cn/mask.nii.gz": "no intensity range",
}


@pytest.mark.parametrize("cached", [False, True])
def test_truncated_and_constant_volumes_are_skipped_and_listed(tmp_path: Path, cached: bool) -> None:
    task = _task(tmp_path)
    entries = read_dataset_json(task / "dataset.json")
    cache = tmp_path / "cache" if cached else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrameWarning)
        with pytest.warns(UserWarning, match="skipped 4 of 14 volumes") as rec:
            ds = ADNISliceDataset(entries, image_size=16, cache_dir=cache, skip_bad=True)
    assert [img for img, _ in ds.skipped] == list(BAD)
    for (img, why), expected in zip(ds.skipped, BAD.values()):
        assert str(task / img) in why and expected in why, why  # the file and the reason
    message = " ".join(str(w.message) for w in rec)
    assert all(img in message for img in BAD)  # one warning lists every skipped volume
    assert len(ds.volumes) == 10 and all(e.image not in BAD for e in ds.volumes)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert images.amin(dim=(1, 2, 3)).lt(images.amax(dim=(1, 2, 3))).any()  # real slices were kept
    if cached:
        assert not [p for p in (tmp_path / "cache").rglob("*.npy") if "cut" in p.name or "flat" in p.name]


def test_skip_bad_false_names_the_truncated_file(tmp_path: Path) -> None:
    task = _task(tmp_path)
    entries = {e.image: e for e in read_dataset_json(task / "dataset.json")}
    for img, expected in BAD.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FrameWarning)
            with pytest.raises(DataError, match=rf"image '{img}'.*{expected}"):
                ADNISliceDataset([entries[img]], image_size=16, skip_bad=False)


def test_datamodule_volumes_list_skipped_files_with_reasons(tmp_path: Path) -> None:
    _task(tmp_path)
    dm = ADNISliceDataModule(root=str(tmp_path), image_size=16, val_fraction=0.0, test_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vols = dm.volumes("train")
    assert sorted(s["volume"] for s in vols.skipped) == sorted(BAD)
    assert all(BAD[s["volume"]] in s["reason"] for s in vols.skipped)
    assert len(vols.sources) == 10 and sorted(img for img, _ in dm.skipped) == sorted(BAD)


def test_volume_slices_never_returns_an_all_background_volume(tmp_path: Path) -> None:
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), str(flat))
    with pytest.raises(DataError, match=r"flat\.nii\.gz.*constant volume \(every voxel is 0\)"):
        volume_slices(flat, SliceSettings(image_size=16))


# ------------------------------------------------------------------------------------ cache and replaced files
def _write(path: Path, seed: int, compressed: bool = True) -> None:
    vol = generate_volume(1, (20, 20, 20), seed, bias_field=False)
    nib.save(nib.Nifti1Image(np.rint(vol).astype(np.int16), np.eye(4)), str(path))


def _slices(entries, cache: Path) -> torch.Tensor:  # noqa: ANN001
    ds = ADNISliceDataset(entries, image_size=16, cache_dir=cache)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


@pytest.mark.parametrize("same", ["mtime", "size", "size and mtime"])
def test_a_replaced_volume_is_sliced_again(tmp_path: Path, same: str) -> None:
    """The cache key holds the file's size, mtime_ns and a hash of its end blocks: a replacement is re-sliced.

    ``same="mtime"``: a ``.nii.gz`` of another size put back with the old mtime. ``same="size"``: an uncompressed
    ``.nii`` of the same shape and dtype (same size, new content), with a new mtime. ``same="size and mtime"``: that
    ``.nii`` with the old mtime kept (``cp -p``, ``rsync -t``; issue 20)."""
    suffix = ".nii.gz" if same == "mtime" else ".nii"
    task = tmp_path / "task"
    (task / "cn").mkdir(parents=True)
    path = task / "cn" / f"cn0{suffix}"
    _write(path, seed=1)
    (task / "dataset.json").write_text(json.dumps([{"image": f"cn/cn0{suffix}", "slice_label": 1}]))
    entries = read_dataset_json(task / "dataset.json")
    cache = tmp_path / "cache"
    first = _slices(entries, cache)
    old = path.stat()

    _write(path, seed=2)  # the same file name, other voxels
    new = path.stat()
    if same == "mtime":
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
        assert path.stat().st_mtime_ns == old.st_mtime_ns and new.st_size != old.st_size
    elif same == "size":
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
        assert path.stat().st_size == old.st_size and path.stat().st_mtime_ns != old.st_mtime_ns
    else:
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    again = _slices(entries, cache)
    fresh = torch.from_numpy(volume_slices(entries[0], SliceSettings(image_size=16)).images)
    assert not torch.equal(again, first)  # not the stale slices
    assert torch.equal(again, fresh)  # the new file's slices
    assert len({VolumeSliceCache.stem(entries[0])} | {p.name.split(".")[0] for p in cache.rglob("*.img.npy")}) == 2


def test_a_cached_volume_whose_file_is_deleted_is_skipped(tmp_path: Path) -> None:
    task = write_synthetic_adni(tmp_path, n_per_class=1, shape=(20, 20, 20), seed=3)
    entries = read_dataset_json(task / "dataset.json")
    ADNISliceDataset(entries, image_size=16, cache_dir=tmp_path / "cache")
    shutil.move(str(task / "ad" / "ad0.nii.gz"), str(tmp_path / "elsewhere.nii.gz"))
    with pytest.warns(UserWarning, match=r"skipped 1 of 5 volumes: ad/ad0.nii.gz: .*not found"):
        ds = ADNISliceDataset(entries, image_size=16, cache_dir=tmp_path / "cache")
    assert [e.volume_id for e in ds.volumes] == ["cn/cn0", "emci/emci0", "mci/mci0", "lmci/lmci0"]
