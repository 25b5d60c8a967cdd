"""Anomaly kinds that no choice ever saw, pasted into healthy images (pure torch, deterministic, seeded per item).

The generalisation check (:mod:`.generalisation`) scores them with the settings chosen on validation. Each kind
changes a region of a healthy image ``[C, H, W]`` in ``[-1, 1]`` and returns the exact mask of the pixels it changed
(``mask == (out != image)`` per pixel, over any channel). Sizes scale with the image (a 28 px digit and a 64 px CT
slice get lesions of the same relative size); centres are drawn among the foreground pixels (above the image's
minimum) inside the region (``brain_mask``) when one is given, so the change lands on tissue, not on air.

- ``dark_holes``: one or two discs set to the image's minimum (the background / air value): hypointense holes,
  the opposite of the bright lesions the tasks train and select on.
- ``texture_patch``: a square whose pixels become a 1-pixel checkerboard around the patch's own mean (amplitude
  0.5): a high-frequency texture with an unchanged mean intensity.
- ``intensity_ramp``: a larger square gets a linear ramp from -0.6 to +0.6 along a random direction (a smooth
  shading change: half darker, half brighter, no edge of its own).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from meddiff.errors import ConfigError

__all__ = ["DESCRIPTIONS", "KINDS", "make_unseen"]

#: the kinds, in report order
KINDS = ("dark_holes", "texture_patch", "intensity_ramp")
#: kind -> one sentence for the report
DESCRIPTIONS = {
    "dark_holes": "one or two discs (radius ~H/8) on tissue set to the image's minimum: hypointense holes",
    "texture_patch": "a square (side ~H/4) turned into a 1-pixel checkerboard of amplitude 0.5 around its own mean: "
                     "high-frequency texture, mean intensity unchanged",
    "intensity_ramp": "a square (side ~H/3) with a linear ramp -0.6..+0.6 added along a random direction: a smooth "
                      "shading change, half darker, half brighter",
}
_SEED_STRIDE = 1_000_003  # separates the per-item streams of different seeds


def _centre(img: torch.Tensor, region: torch.Tensor | None, g: torch.Generator) -> tuple[int, int]:
    """A pixel drawn among the foreground (above the minimum by 5% of the range) inside ``region``."""
    fg = img.amax(0) > img.min() + 0.05 * (img.max() - img.min()).clamp_min(1e-6)
    if region is not None:
        inside = region.reshape(img.shape[-2:]).bool()
        fg = fg & inside if (fg & inside).any() else inside
    if not fg.any():
        fg = torch.ones_like(fg)
    idx = fg.flatten().nonzero().squeeze(1)
    k = int(idx[torch.randint(len(idx), (1,), generator=g)])
    return divmod(k, img.shape[-1])


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")


def _one(img: torch.Tensor, kind: str, region: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
    """The changed image ``[C, H, W]`` (float32, in [-1, 1])."""
    c, h, w = img.shape
    yy, xx = _grid(h, w)
    size = min(h, w)
    out = img.clone()
    if kind == "dark_holes":
        sel = torch.zeros(h, w, dtype=torch.bool)
        for _ in range(1 + int(torch.randint(2, (1,), generator=g))):
            cy, cx = _centre(img, region, g)
            r = size / 8 * (0.8 + 0.4 * float(torch.rand(1, generator=g)))
            sel |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        fill = img.min()
    elif kind == "texture_patch":
        cy, cx = _centre(img, region, g)
        half = max(1, round(size / 8))
        sel = ((yy - cy).abs() <= half) & ((xx - cx).abs() <= half)
        checker = ((yy + xx) % 2) * 2 - 1  # +1 / -1 alternating
        mean = img[:, sel].mean()
        fill = (mean + 0.5 * checker).clamp(-1, 1)
    elif kind == "intensity_ramp":
        cy, cx = _centre(img, region, g)
        half = max(2, round(size / 6))
        sel = ((yy - cy).abs() <= half) & ((xx - cx).abs() <= half)
        angle = 2 * math.pi * float(torch.rand(1, generator=g))
        along = ((yy - cy) * math.sin(angle) + (xx - cx) * math.cos(angle)) / (half * math.sqrt(2))
        fill = (img + 0.6 * along.clamp(-1, 1)).clamp(-1, 1)
    else:
        raise ConfigError(f"unknown unseen anomaly kind {kind!r}; choose from {list(KINDS)}.")
    if region is not None:
        sel &= region.reshape(h, w).bool()
    return torch.where(sel.expand(c, h, w), fill.expand(c, h, w) if torch.is_tensor(fill) else fill, img)


def make_unseen(images: torch.Tensor, kind: str, seed: int, item_ids: Sequence[int],
                region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``kind`` pasted into each healthy image.

    Args:
        images: ``[N, C, H, W]`` in ``[-1, 1]``; kind: one of :data:`KINDS`.
        seed: the check's seed; item_ids: ``N`` ints naming the items (item ``i``'s change depends on
            ``(seed, kind, item_ids[i])`` only, not on the batch it is in).
        region: optional ``[N, 1, H, W]`` (e.g. the brain mask): changes stay inside it.

    Returns:
        ``(changed [N, C, H, W] float32 in [-1, 1], mask [N, 1, H, W] bool)``, the mask exactly the pixels whose
        value changed in some channel (a pixel whose old value equals the pasted one is not in it).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown unseen anomaly kind {kind!r}; choose from {list(KINDS)}.")
    imgs = images.detach().float().cpu()
    k = KINDS.index(kind)
    out = torch.empty_like(imgs)
    for i, item in enumerate(item_ids):
        g = torch.Generator().manual_seed(int(seed) * _SEED_STRIDE + 7919 * k + int(item))
        reg = None if region is None else region[i].detach().cpu()
        out[i] = _one(imgs[i], kind, reg, g)
    mask = (out != imgs).any(dim=1, keepdim=True)
    return out, mask
