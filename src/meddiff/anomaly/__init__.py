"""Anomaly maps, post-processing and image scores (pure torch/scipy, no Lightning).

``reconstruction`` (healthy estimates from a diffusion model) and ``patches`` live here too; import them from
their modules (``meddiff.anomaly.reconstruction``) so this package stays importable without the diffusion core.
"""

from meddiff.anomaly.maps import MAP_KINDS, anomaly_map, local_ssim
from meddiff.anomaly.postprocess import (
    PostProcess,
    apply_mask,
    erode_mask,
    median_filter,
    remove_small_components,
)
from meddiff.anomaly.scores import REDUCTIONS, image_scores

__all__ = [
    "MAP_KINDS",
    "REDUCTIONS",
    "PostProcess",
    "anomaly_map",
    "apply_mask",
    "erode_mask",
    "image_scores",
    "local_ssim",
    "median_filter",
    "remove_small_components",
]
