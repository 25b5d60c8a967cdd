"""Numbers from scores: detection (image level, bootstrap CIs), pixel segmentation (binned, bounded memory),
image quality, AUCp and trivial baselines."""

from meddiff.metrics.aucp import aucp, debiased_auc
from meddiff.metrics.baselines import (
    MeanHealthy,
    NearestHealthy,
    intensity_map,
    mean_intensity_score,
    reference_subset,
)
from meddiff.metrics.detection import (
    aggregate_by_subject,
    detection_ci,
    image_level,
    margin_over_best_baseline,
    paired_difference,
    pr_curve_points,
    roc_curve_points,
    weighted_auroc_ap,
)
from meddiff.metrics.image_quality import MS_SSIM_BETAS, image_scores, ms_ssim, ms_ssim_scales
from meddiff.metrics.pixel import PixelAccumulator, choose_threshold, dice_score

__all__ = [
    "MS_SSIM_BETAS",
    "MeanHealthy",
    "NearestHealthy",
    "PixelAccumulator",
    "aggregate_by_subject",
    "aucp",
    "choose_threshold",
    "debiased_auc",
    "detection_ci",
    "dice_score",
    "image_level",
    "image_scores",
    "intensity_map",
    "margin_over_best_baseline",
    "mean_intensity_score",
    "ms_ssim",
    "ms_ssim_scales",
    "paired_difference",
    "pr_curve_points",
    "reference_subset",
    "roc_curve_points",
    "weighted_auroc_ap",
]
