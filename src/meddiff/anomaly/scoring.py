"""One scorer for every model: (input, healthy reconstruction) -> anomaly map -> post-processing -> image score."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from meddiff.anomaly.maps import anomaly_map
from meddiff.anomaly.postprocess import PostProcess
from meddiff.anomaly.reduce import reduce_map


@dataclass(frozen=True)
class ScoringConfig:
    """How maps and image scores are made; chosen on validation data and written into the report.

    map: ``l1`` | ``l2`` | ``ssim`` residual; sign: ``abs`` | ``positive`` (input brighter than the reconstruction:
    hyperintense) | ``negative`` (hypointense), see :func:`~meddiff.anomaly.maps.anomaly_map`; median_size: 2D median filter size (1 = off);
    erode_iterations: erosion of the brain mask before masking (0 = off); reduction: ``mean`` | ``max`` |
    ``percentile`` (``q``) | ``top_k`` (mean of the ``k`` largest values) of the map inside the (eroded) mask.
    """

    map: str = "l1"
    median_size: int = 1
    erode_iterations: int = 0
    reduction: str = "mean"
    q: float = 99.0
    k: int = 5
    sign: str = "abs"

    def with_(self, **changes) -> ScoringConfig:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


def score_batch(
    x: torch.Tensor, recon: torch.Tensor, region: torch.Tensor | None, cfg: ScoringConfig
) -> dict[str, torch.Tensor]:
    """Maps and scores for one batch.

    Args:
        x, recon: ``[B, C, H, W] in [-1, 1]``; region: optional bool ``[B, 1, H, W]`` (e.g. brain mask).
    Returns:
        ``map [B, 1, H, W] >= 0`` (post-processed, zero outside the eroded region), ``region`` (the eroded region
        or None) and ``score [B]``.
    """
    post = PostProcess(median_size=cfg.median_size, erode_iterations=cfg.erode_iterations)
    eroded = post.region(region)
    maps = post(anomaly_map(x, recon, kind=cfg.map, sign=cfg.sign), region)
    scores = reduce_map(maps, eroded, reduction=cfg.reduction, q=cfg.q, k=cfg.k)
    return {"map": maps, "region": eroded, "score": scores}
