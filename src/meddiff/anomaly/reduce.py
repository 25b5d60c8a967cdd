"""One anomaly score per image: its anomaly map reduced inside a region.

``reduce_map(maps [B, C, H, W], mask=None, reduction="mean"|"max"|"percentile"|"top_k", q=99, k=5) -> [B]``.
Percentiles use linear interpolation between order statistics (numpy's default ``method="linear"``). ``top_k`` is the
mean of the ``k`` largest values in the region (all of them when it has fewer than ``k`` pixels): between ``max``
(``k=1``) and a high percentile, it keeps a small anomaly's few strong pixels without trusting a single one.
An image whose mask is empty has no pixel to score: it gets ``empty_value`` (0.0 by default: no evidence of an
anomaly; pass ``float("nan")`` to spot and drop such images instead).
"""

from __future__ import annotations

import torch

from meddiff.anomaly.postprocess import as_bool, check_4d, check_mask_for
from meddiff.errors import ConfigError

MAP_REDUCTIONS = ("mean", "max", "percentile", "top_k")


def reduce_map(
    maps: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    q: float = 99.0,
    empty_value: float = 0.0,
    k: int = 5,
) -> torch.Tensor:
    """Reduce anomaly maps to one score per image, over the pixels inside ``mask`` only.

    Args:
        maps: ``[B, C, H, W]`` float anomaly maps (``C`` is usually 1; all channels' pixels are pooled).
        mask: optional bool ``[B, 1, H, W]`` or ``[B, C, H, W]`` region (e.g. the eroded brain mask).
        reduction: ``"mean"`` | ``"max"`` | ``"percentile"`` | ``"top_k"``.
        q: percentile in ``[0, 100]`` for ``reduction="percentile"``.
        empty_value: score of an image whose mask has no pixel.
        k: number of largest values averaged for ``reduction="top_k"`` (an integer >= 1).

    Returns:
        ``[B]`` float scores (the maps' dtype, float32 for integer maps), on the maps' device.

    Raises:
        ConfigError: unknown ``reduction``, ``q`` outside ``[0, 100]`` or ``k`` not an integer >= 1.
        DataError: maps not 4D or mask shape not matching.
    """
    if reduction not in MAP_REDUCTIONS:
        raise ConfigError(f"unknown score reduction {reduction!r}; choose one of {list(MAP_REDUCTIONS)}.")
    if not 0.0 <= float(q) <= 100.0:
        raise ConfigError(f"percentile q={q} must be in [0, 100] (e.g. 99).")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"top_k k={k!r} must be an integer >= 1 (the number of largest map values averaged, e.g. 5).")
    check_4d(maps, "maps")
    x = maps if maps.is_floating_point() else maps.float()
    B = x.shape[0]
    if mask is None:
        m = torch.ones_like(x, dtype=torch.bool)
    else:
        check_mask_for(x, mask)
        m = as_bool(mask).to(x.device).expand_as(x)
    x = x.reshape(B, -1)
    m = m.reshape(B, -1)
    count = m.sum(dim=1)
    empty = count == 0

    if reduction == "mean":
        s = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1) / count.clamp_min(1)
    elif reduction == "max":
        s = torch.where(m, x, torch.full((), -torch.inf, dtype=x.dtype, device=x.device)).amax(dim=1)
    elif reduction == "top_k":
        # masked-out pixels sort last (-inf); only the first min(k, count) values of each row are the region's
        kk = min(k, x.shape[1])
        top = torch.where(m, x, torch.full((), -torch.inf, dtype=x.dtype, device=x.device)).topk(kk, dim=1).values
        n = count.clamp(max=kk)
        keep = torch.arange(kk, device=x.device)[None, :] < n[:, None]
        s = torch.where(keep, top, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1) / n.clamp_min(1)
    else:
        # Masked-out pixels sort to the end (+inf); the first `count` sorted values are the region's.
        srt = torch.where(m, x, torch.full((), torch.inf, dtype=x.dtype, device=x.device)).sort(dim=1).values
        pos = (count - 1).clamp_min(0).to(torch.float64) * (float(q) / 100.0)
        lo = pos.floor().long()
        hi = pos.ceil().long()
        frac = (pos - lo.to(torch.float64)).to(x.dtype)
        v_lo = srt.gather(1, lo[:, None])[:, 0]
        v_hi = srt.gather(1, hi[:, None])[:, 0]
        s = v_lo + (v_hi - v_lo) * frac
        s = torch.where(hi == lo, v_lo, s)  # avoids inf - inf when lo == hi
    return torch.where(empty, torch.full((), float(empty_value), dtype=x.dtype, device=x.device), s)
