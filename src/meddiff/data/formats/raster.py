"""2D image files (PNG, TIFF, JPEG, BMP, or NIfTI slices): size from the header and pixels as ``[H, W, C]``.

No scaling (that is :func:`meddiff.data.preprocess.intensity.scale_intensity`), no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddiff.errors import DataError

__all__ = ["read_image", "read_size"]


def read_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image from its header (no pixel decoding where the format allows)."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            shape = nib.load(str(path)).shape
            return int(shape[0]), int(shape[1])
        if name.endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(str(path)) as tf:
                shape = tf.pages[0].shape
            return int(shape[0]), int(shape[1])
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception as exc:  # corrupt or not what its extension says
        raise DataError(f"cannot read {path}: {exc}. Replace or remove the file.") from exc


def read_image(path: Path) -> np.ndarray:
    """Pixels as ``[H, W, C]`` (C = 1, 3 or 4) in the file's dtype (uint8, uint16, float32, ...)."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            arr = np.asanyarray(nib.load(str(path)).dataobj)
            arr = arr.reshape(arr.shape[:2] + tuple(s for s in arr.shape[2:] if s != 1))
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(str(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode in ("P", "LA", "PA", "CMYK", "YCbCr", "1"):
                    im = im.convert("RGBA" if "A" in im.mode else ("L" if im.mode in ("LA", "1") else "RGB"))
                arr = np.asarray(im)
    except Exception as exc:
        raise DataError(f"cannot read {path}: {exc}. Replace or remove the file.") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise DataError(f"{path} has pixel array shape {arr.shape}; expected a 2D grayscale or RGB(A) image slice.")
    if arr.shape[2] == 2:  # gray + alpha
        arr = arr[:, :, :1]
    return arr
