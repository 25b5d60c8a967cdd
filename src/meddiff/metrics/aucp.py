"""AUCp (Brainomaly): label-free checkpoint selection for anomaly detection.

AUCp is the ROC AUC of a scorer that must tell known-healthy images (label 0) from an unlabelled pool
(label 1) that mixes healthy and anomalous images. If a share ``rho`` of the pool is healthy, and healthy pool
images are scored like the known-healthy ones, then ``AUCp = rho * 0.5 + (1 - rho) * AUC``, so the true AUC is
estimated by ``debiased_auc(aucp, rho) = (AUCp - 0.5 rho) / (1 - rho)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.detection import to_numpy_1d


def aucp(scores_known_healthy: Any, scores_unlabelled: Any) -> float:
    """ROC AUC with known-healthy scores labelled 0 and unlabelled-pool scores labelled 1.

    Args:
        scores_known_healthy: ``[N0]`` finite scores of known-healthy images (larger = more anomalous).
        scores_unlabelled: ``[N1]`` finite scores of the unlabelled (mixed) images.

    Returns:
        AUCp in ``[0, 1]`` (0.5 = the pool looks like the healthy set).
    """
    h = to_numpy_1d(scores_known_healthy, "scores_known_healthy").astype(np.float64)
    u = to_numpy_1d(scores_unlabelled, "scores_unlabelled").astype(np.float64)
    if h.size == 0 or u.size == 0:
        raise DataError(
            f"AUCp needs both sets non-empty; got {h.size} known-healthy and {u.size} unlabelled scores."
        )
    if not (np.isfinite(h).all() and np.isfinite(u).all()):
        raise DataError("AUCp scores contain NaN/inf; drop those images first.")
    y = np.r_[np.zeros(h.size), np.ones(u.size)]
    return float(roc_auc_score(y, np.r_[h, u]))


def debiased_auc(aucp_value: float, rho: float) -> float:
    """Estimate the true AUC from AUCp: ``(aucp - 0.5 * rho) / (1 - rho)``.

    Args:
        aucp_value: AUCp in ``[0, 1]``.
        rho: share of healthy images in the unlabelled pool, in ``[0, 1)`` (``rho = 0`` returns ``aucp``).

    Returns:
        The estimate (not clipped: values outside ``[0, 1]`` signal that the assumptions do not hold).
    """
    if not 0.0 <= float(aucp_value) <= 1.0:
        raise ConfigError(f"aucp={aucp_value} must be in [0, 1].")
    if not 0.0 <= float(rho) < 1.0:
        raise ConfigError(
            f"rho={rho} must be in [0, 1): the share of healthy images in the unlabelled pool "
            "(rho = 1 means the pool has no anomalies and the AUC cannot be estimated)."
        )
    return (float(aucp_value) - 0.5 * float(rho)) / (1.0 - float(rho))
