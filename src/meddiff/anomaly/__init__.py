"""Anomaly maps, post-processing and image scores (pure torch/scipy, no Lightning).

``reconstruction`` (healthy estimates from a diffusion model) lives here too; import it from its module
(``meddiff.anomaly.reconstruction``) so this package stays importable without the diffusion core. The evaluation
protocol that uses all of this is ``meddiff.protocols.anomaly``.
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
