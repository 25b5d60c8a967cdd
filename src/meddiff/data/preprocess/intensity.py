"""Image intensities -> ``[-1, 1]`` (per image or by dtype range), for 2D image files read by
:mod:`meddiff.data.formats.raster`."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from meddiff.errors import ConfigError

__all__ = ["scale_intensity"]


def scale_intensity(arr: np.ndarray, mode: str = "auto", percentiles: Iterable[float] = (1.0, 99.0)) -> np.ndarray:
    """Pixels -> float32 in ``[-1, 1]``.

    ``dtype``: integer range of the dtype (uint8 /255, uint16 /65535); ``minmax``: per image; ``percentile``: per
    image between the given percentiles (clipped); ``auto``: ``dtype`` for uint8, ``minmax`` otherwise.
    """
    if mode == "auto":
        mode = "dtype" if arr.dtype == np.uint8 else "minmax"
    x = arr.astype(np.float32)
    if mode == "dtype":
        if not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"data.intensity=dtype needs integer pixels, got {arr.dtype}; use minmax or percentile.")
        info = np.iinfo(arr.dtype)
        lo, hi = float(max(info.min, 0)), float(info.max)
    elif mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, list(percentiles)))
    else:
        raise ConfigError(f"data.intensity={mode!r} is unknown; choose auto, dtype, minmax or percentile.")
    if hi <= lo:
        return np.full_like(x, -1.0)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
