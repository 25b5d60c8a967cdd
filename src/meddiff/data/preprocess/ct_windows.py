"""CT intensity windows, brain masks from HU, cropping to the brain and resizing.

Conventions: ``hu`` is a float ``[H, W]`` array in Hounsfield units; a window ``(center, width)`` maps
``[center - width/2, center + width/2]`` linearly to ``[0, 1]`` (clipped outside); model inputs stack one
channel per window and map ``[0, 1] -> [-1, 1]``.

Presets (center / width, HU): brain 40/80, subdural 80/200, bone 600/2800, soft 40/380. Window tags stored in
the DICOM files are ignored on purpose (RSNA has multi-valued, inconsistent ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from meddiff.errors import ConfigError, DataError

__all__ = [
    "WINDOW_PRESETS",
    "resolve_windows",
    "window",
    "window_stack",
    "fill_holes",
    "brain_mask_from_hu",
    "brain_fraction",
    "is_near_empty",
    "square_bbox",
    "crop_resize",
    "preprocess_hu",
]

#: name -> (center, width) in HU
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "bone": (600.0, 2800.0),
    "soft": (40.0, 380.0),
}

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
WindowSpec = str | Sequence[float] | Mapping[str, Any]


def resolve_windows(windows: WindowSpec | Sequence[WindowSpec]) -> list[tuple[str, float, float]]:
    """Normalise a window list to ``[(name, center, width), ...]``.

    Accepts a preset name (``"brain"``), a list of names, ``[center, width]`` pairs or mappings
    ``{name?, center, width}``. Raises :class:`ConfigError` on an unknown name or a width <= 0.
    """
    if isinstance(windows, str | Mapping) or (
        isinstance(windows, Sequence) and len(windows) == 2 and all(isinstance(v, int | float) for v in windows)
    ):
        windows = [windows]  # a single window
    out: list[tuple[str, float, float]] = []
    for w in windows:  # type: ignore[union-attr]
        if isinstance(w, str):
            if w not in WINDOW_PRESETS:
                raise ConfigError(f"unknown CT window {w!r}; use one of {sorted(WINDOW_PRESETS)} or [center, width].")
            c, wd = WINDOW_PRESETS[w]
            name = w
        elif isinstance(w, Mapping):
            try:
                c, wd = float(w["center"]), float(w["width"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"window {dict(w)!r} needs numeric 'center' and 'width' keys.") from e
            name = str(w.get("name", f"c{c:g}w{wd:g}"))
        else:
            try:
                c, wd = (float(v) for v in w)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"window {w!r} must be a preset name or a [center, width] pair.") from e
            name = f"c{c:g}w{wd:g}"
        if wd <= 0:
            raise ConfigError(f"window {name!r} has width {wd}; it must be > 0.")
        out.append((name, c, wd))
    if not out:
        raise ConfigError("windows is empty; give at least one window, e.g. ['brain'].")
    return out


def window(hu: ArrayT, center: float, width: float) -> ArrayT:
    """Linear window: HU ``[center - width/2, center + width/2]`` -> ``[0, 1]``, clipped. Same type/shape as ``hu``."""
    lo = center - width / 2.0
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - lo) / width).clamp_(0.0, 1.0)
    return np.clip((np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width), 0.0, 1.0)


def window_stack(hu: np.ndarray, windows: WindowSpec | Sequence[WindowSpec]) -> np.ndarray:
    """Stack windows as channels in ``[-1, 1]``: float32 ``[C, H, W]`` from HU ``[H, W]``."""
    specs = resolve_windows(windows)
    out = np.empty((len(specs), *np.shape(hu)), dtype=np.float32)
    for i, (_, c, w) in enumerate(specs):
        out[i] = window(hu, c, w) * 2.0 - 1.0
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a 2D bool mask (background regions not connected to the border).

    Same result as ``scipy.ndimage.binary_fill_holes`` with its default 4-connected background, but one
    labelling pass instead of an iterative propagation (about 10x faster on 512 x 512 slices).
    """
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndi.label(~mask)  # 4-connected background components
    if n == 0:
        return mask.copy()
    touches = np.zeros(n + 1, dtype=bool)
    touches[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    touches[0] = False  # label 0 = the mask itself
    return ~touches[labels]


def brain_mask_from_hu(
    hu: np.ndarray,
    bone_threshold: float = 300.0,
    tissue_range: tuple[float, float] = (-100.0, 300.0),
    close_radius: int | None = None,
) -> np.ndarray:
    """Intracranial (brain) mask from a HU slice: bool ``[H, W]``.

    Steps: bone = ``hu > bone_threshold``, closed with a small square (bridges thin gaps in the skull ring);
    inside skull = holes of the bone filled, minus bone; keep tissue-range HU (brain, CSF, blood); largest
    connected component; its own holes filled (calcifications, dense blood stay in). Slices without a closed
    skull ring (vertex, skull base, craniotomy) give an empty or small mask; callers treat them as near-empty.

    Args:
        hu: ``[H, W]`` HU.
        bone_threshold: HU above which a pixel is bone (~300).
        tissue_range: HU range of intracranial soft tissue kept inside the skull.
        close_radius: closing radius in px for the bone ring; default ``max(1, round(min(H, W) / 170))``.
    """
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise DataError(f"brain_mask_from_hu expects a 2D [H, W] HU slice, got shape {hu.shape}.")
    radius = max(1, round(min(hu.shape) / 170)) if close_radius is None else int(close_radius)
    bone = hu > bone_threshold
    if radius > 0:  # square closing via separable max/min filters: fast, and bridges gaps like a disk
        size = 2 * radius + 1
        grown = ndi.maximum_filter(bone.view(np.uint8), size=size, mode="constant", cval=0)
        bone = ndi.minimum_filter(grown, size=size, mode="constant", cval=1).astype(bool) | bone
    inside = fill_holes(bone) & ~bone
    inside &= (hu >= tissue_range[0]) & (hu <= tissue_range[1])
    labels, n = ndi.label(inside)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    return fill_holes(largest)


def brain_fraction(brain_mask: np.ndarray) -> float:
    """Share of the slice's pixels inside the brain mask, in ``[0, 1]``."""
    return float(np.asarray(brain_mask, dtype=bool).mean()) if np.size(brain_mask) else 0.0


def is_near_empty(brain_mask: np.ndarray, min_brain_fraction: float) -> bool:
    """True when the brain covers less than ``min_brain_fraction`` of the slice (vertex, skull base, air)."""
    return brain_fraction(brain_mask) < float(min_brain_fraction)


def square_bbox(mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int]:
    """Square box around the mask's bounding box: ``(row0, col0, side)``, may extend past the image.

    The box is centred on the mask's bbox, its side is the longer bbox side plus ``margin`` of it on each side.
    An empty mask gives the square around the whole image.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        r0, r1, c0, c1 = 0, h, 0, w
    else:
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(r1 - r0, c1 - c0)
    side = max(1, int(round(side * (1.0 + 2.0 * margin))))
    rc, cc = (r0 + r1) / 2.0, (c0 + c1) / 2.0
    return int(round(rc - side / 2.0)), int(round(cc - side / 2.0)), side


def _crop_pad(arr: np.ndarray, row0: int, col0: int, side: int, fill: float) -> np.ndarray:
    """``arr [C, H, W]`` -> ``[C, side, side]`` window starting at (row0, col0), padded with ``fill``."""
    c, h, w = arr.shape
    out = np.full((c, side, side), fill, dtype=arr.dtype)
    sr0, sr1 = max(row0, 0), min(row0 + side, h)
    sc0, sc1 = max(col0, 0), min(col0 + side, w)
    if sr1 > sr0 and sc1 > sc0:
        out[:, sr0 - row0 : sr1 - row0, sc0 - col0 : sc1 - col0] = arr[:, sr0:sr1, sc0:sc1]
    return out


def crop_resize(
    arr: np.ndarray, box: tuple[int, int, int] | None, size: int, fill: float, binary: bool = False
) -> np.ndarray:
    """Crop ``arr [C, H, W]`` to a square ``box`` (or pad the whole image to a square when ``box`` is None),
    then resize to ``[C, size, size]`` (bilinear with antialiasing; a ``binary`` input is thresholded at 0.5).

    Returns float32 (or bool when ``binary``) ``[C, size, size]``.
    """
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise DataError(f"crop_resize expects [C, H, W], got shape {arr.shape}.")
    if box is None:
        h, w = arr.shape[1:]
        side = max(h, w)
        box = ((h - side) // 2, (w - side) // 2, side)
    src = arr.astype(np.float32)
    cropped = _crop_pad(src, *box, fill=float(fill))
    if cropped.shape[-1] != size:
        t = torch.from_numpy(cropped)[None]
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        cropped = t[0].numpy()
    return cropped > 0.5 if binary else cropped


def preprocess_hu(
    hu: np.ndarray,
    windows: WindowSpec | Sequence[WindowSpec],
    image_size: int,
    crop_to_brain: bool = True,
    lesion_mask: np.ndarray | None = None,
    bone_threshold: float = 300.0,
    margin: float = 0.05,
) -> dict[str, Any]:
    """HU slice -> model-ready arrays (no filtering; see ``brain_fraction`` in the result).

    Args:
        hu: float ``[H, W]`` HU, any size (non-512 and non-square handled).
        windows: window spec(s), see :func:`resolve_windows`.
        image_size: output side ``S``.
        crop_to_brain: crop to a square around the brain mask (else pad the whole slice to a square).
        lesion_mask: optional ``[H, W]`` ground-truth lesion mask (any dtype, > 0 = lesion).

    Returns:
        dict with ``image`` float32 ``[C, S, S]`` in ``[-1, 1]``, ``brain_mask`` bool ``[1, S, S]``,
        ``mask`` bool ``[1, S, S]`` (only when ``lesion_mask`` is given) and ``brain_fraction`` (float, of the
        original slice).
    """
    hu = np.asarray(hu, dtype=np.float32)
    if lesion_mask is not None and np.shape(lesion_mask) != hu.shape:
        raise DataError(f"lesion mask shape {np.shape(lesion_mask)} does not match the image shape {hu.shape}.")
    brain = brain_mask_from_hu(hu, bone_threshold=bone_threshold)
    box = square_bbox(brain, margin) if crop_to_brain and brain.any() else None
    image = crop_resize(window_stack(hu, windows), box, image_size, fill=-1.0)
    out: dict[str, Any] = {
        "image": np.clip(image, -1.0, 1.0),
        "brain_mask": crop_resize(brain[None], box, image_size, fill=0.0, binary=True),
        "brain_fraction": brain_fraction(brain),
    }
    if lesion_mask is not None:
        out["mask"] = crop_resize((np.asarray(lesion_mask) > 0)[None], box, image_size, fill=0.0, binary=True)
    return out
