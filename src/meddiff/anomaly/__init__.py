"""Anomaly maps, post-processing and scores (pure torch/scipy, no Lightning, no diffusion).

``maps`` (residual maps), ``postprocess`` (median filter, erosion, small components), ``reduce`` (a map -> one score
per image) and ``scoring`` (``ScoringConfig`` + ``score_batch``: the one scorer every model's healthy estimate goes
through). Healthy estimates themselves come from the models (partial diffusion: ``meddiff.diffusion.partial``).
"""

from meddiff.anomaly.maps import MAP_KINDS, MAP_SIGNS, anomaly_map, local_ssim
from meddiff.anomaly.postprocess import (
    PostProcess,
    apply_mask,
    erode_mask,
    median_filter,
    remove_small_components,
)
from meddiff.anomaly.reduce import MAP_REDUCTIONS, reduce_map

__all__ = [
    "MAP_KINDS",
    "MAP_REDUCTIONS",
    "MAP_SIGNS",
    "PostProcess",
    "anomaly_map",
    "apply_mask",
    "erode_mask",
    "local_ssim",
    "median_filter",
    "reduce_map",
    "remove_small_components",
]
