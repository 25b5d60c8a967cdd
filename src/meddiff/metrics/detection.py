"""Image-level detection metrics: AUROC and AUPRC with stratified bootstrap confidence intervals.

Scores: larger = more anomalous. Labels: 0 healthy / 1 anomalous. Point estimates come from scikit-learn
(``roc_auc_score``, ``average_precision_score``). The bootstrap resamples positives and negatives separately
(each replicate keeps ``n_pos`` positives and ``n - n_pos`` negatives, so both classes are always present) and
is vectorised: a replicate is a vector of multiplicities over the original samples, and AUROC (trapezoid, ties
count one half) and average precision (step rule, as scikit-learn) are computed for a whole block of
replicates at once from weighted cumulative sums over the samples sorted once. Memory per block is bounded
(``~4e6`` numbers). The CI is the percentile interval of the replicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from meddiff.errors import ConfigError, DataError

_BLOCK_ELEMENTS = 4_000_000


def to_numpy_1d(x: Any, name: str) -> np.ndarray:
    """A 1D numpy copy of a tensor / array / sequence (``DataError`` if it is not 1D after squeezing)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        arr = arr.squeeze()
        if arr.ndim == 0:
            arr = arr.reshape(1)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1D (one value per image); got shape {np.asarray(x).shape}.")
    return arr


def check_scores_labels(scores: Any, labels: Any, need_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``scores [N]`` (finite floats) and ``labels [N]`` (0/1) to numpy.

    Returns:
        ``(scores float64 [N], labels bool [N])``.

    Raises:
        DataError: mismatched lengths, non-finite scores, labels other than 0/1, or (``need_both``) a single
            class.
    """
    s = to_numpy_1d(scores, "scores").astype(np.float64)
    y_raw = to_numpy_1d(labels, "labels")
    if s.shape != y_raw.shape:
        raise DataError(
            f"scores and labels must have the same length; got {s.shape[0]} and {y_raw.shape[0]}."
        )
    if s.size == 0:
        raise DataError("scores are empty; at least one healthy and one anomalous image are needed.")
    bad = ~np.isfinite(s)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} scores are NaN/inf (first at index {int(np.argmax(bad))}); drop those images "
            "(e.g. empty brain masks scored with empty_value=nan) before computing metrics."
        )
    uniq = np.unique(y_raw)
    if not np.isin(uniq, [0, 1]).all():
        raise DataError(f"labels must be 0 (healthy) or 1 (anomalous); found values {uniq.tolist()[:10]}.")
    y = y_raw.astype(bool)
    if need_both:
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            only = "anomalous (1)" if n_pos else "healthy (0)"
            raise DataError(
                f"only one class present: all {y.size} labels are {only}; AUROC/AUPRC need both healthy and "
                "anomalous images in the evaluated set."
            )
    return s, y


def weighted_auroc_ap(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for many sample weightings at once.

    Args:
        scores: ``[N]`` float; labels: ``[N]`` bool; weights: ``[R, N]`` non-negative (e.g. bootstrap counts),
            each row with positive total weight on both classes.

    Returns:
        ``(auroc [R], ap [R])``, equal to scikit-learn's ``roc_auc_score`` / ``average_precision_score`` with
        ``sample_weight=weights[r]``.
    """
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = labels[order]
    w = np.asarray(weights, dtype=np.float64)[:, order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each distinct score (descending)
    tp = np.cumsum(w * y, axis=1)[:, ends]
    fp = np.cumsum(w * ~y, axis=1)[:, ends]
    tpr = tp / tp[:, -1:]
    fpr = fp / fp[:, -1:]
    zeros = np.zeros((w.shape[0], 1))
    tpr0 = np.concatenate([zeros, tpr], axis=1)
    fpr0 = np.concatenate([zeros, fpr], axis=1)
    auroc = np.sum(np.diff(fpr0, axis=1) * (tpr0[:, 1:] + tpr0[:, :-1]) * 0.5, axis=1)
    pred_pos = tp + fp
    precision = np.divide(tp, pred_pos, out=np.zeros_like(tp), where=pred_pos > 0)
    ap = np.sum(np.diff(tpr0, axis=1) * precision, axis=1)
    return auroc, ap


def _bootstrap(s: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(y)
    neg = np.flatnonzero(~y)
    n = s.size
    block = max(1, _BLOCK_ELEMENTS // n)
    aurocs, aps = [], []
    for start in range(0, n_boot, block):
        r = min(block, n_boot - start)
        offsets = (np.arange(r) * n)[:, None]
        draws = np.concatenate(
            [idx[rng.integers(0, idx.size, size=(r, idx.size))] for idx in (pos, neg)], axis=1
        )
        w = np.bincount((draws + offsets).ravel(), minlength=r * n).reshape(r, n).astype(np.float64)
        a, p = weighted_auroc_ap(s, y, w)
        aurocs.append(a)
        aps.append(p)
    return np.concatenate(aurocs), np.concatenate(aps)


def image_level(
    scores: Any, labels: Any, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict[str, Any]:
    """Image-level AUROC / AUPRC with stratified-bootstrap percentile confidence intervals.

    Args:
        scores: ``[N]`` finite anomaly scores (tensor, array or sequence), larger = more anomalous.
        labels: ``[N]`` 0 healthy / 1 anomalous; both classes must be present.
        n_boot: bootstrap replicates (0 = no CI: the intervals are ``(nan, nan)``).
        seed: RNG seed; the same inputs and seed give the same intervals.
        ci: interval level in ``(0, 1)``.

    Returns:
        ``{"auroc": float, "auroc_ci": (lo, hi), "auprc": float, "auprc_ci": (lo, hi), "n": int,
        "n_pos": int}``; AUROC in ``[0, 1]``, AUPRC in ``(0, 1]`` (chance level = ``n_pos / n``).
    """
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 0:
        raise ConfigError(f"n_boot={n_boot!r} must be an integer >= 0 (e.g. 1000; 0 disables the CI).")
    if not 0.0 < float(ci) < 1.0:
        raise ConfigError(f"ci={ci} must be in (0, 1), e.g. 0.95.")
    s, y = check_scores_labels(scores, labels)
    auroc = float(roc_auc_score(y, s))
    auprc = float(average_precision_score(y, s))
    if n_boot > 0:
        boot_auroc, boot_ap = _bootstrap(s, y, n_boot, seed)
        alpha = (1.0 - float(ci)) / 2.0
        qs = [alpha, 1.0 - alpha]
        auroc_ci = tuple(float(v) for v in np.quantile(boot_auroc, qs))
        auprc_ci = tuple(float(v) for v in np.quantile(boot_ap, qs))
    else:
        auroc_ci = auprc_ci = (float("nan"), float("nan"))
    return {
        "auroc": auroc,
        "auroc_ci": auroc_ci,
        "auprc": auprc,
        "auprc_ci": auprc_ci,
        "n": int(y.size),
        "n_pos": int(y.sum()),
    }


def roc_curve_points(scores: Any, labels: Any) -> dict[str, np.ndarray]:
    """ROC curve for plotting: ``{"fpr": [K], "tpr": [K], "thresholds": [K]}`` (scikit-learn ``roc_curve``)."""
    s, y = check_scores_labels(scores, labels)
    fpr, tpr, thr = roc_curve(y, s)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr}


def pr_curve_points(scores: Any, labels: Any) -> dict[str, np.ndarray]:
    """Precision-recall curve for plotting: ``{"precision": [K+1], "recall": [K+1], "thresholds": [K]}``."""
    s, y = check_scores_labels(scores, labels)
    precision, recall, thr = precision_recall_curve(y, s)
    return {"precision": precision, "recall": recall, "thresholds": thr}


def aggregate_by_subject(
    scores: Any, labels: Any, subjects: Sequence[str], reduction: str = "mean"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Slice scores to subject scores (subject label = 1 if any of its slices is anomalous).

    Args:
        scores: ``[N]`` slice scores; labels: ``[N]`` 0/1; subjects: ``N`` subject ids.
        reduction: ``"mean"`` or ``"max"`` over a subject's slices.

    Returns:
        ``(subject_ids sorted, scores [S] float64, labels [S] int64)``.
    """
    if reduction not in ("mean", "max"):
        raise ConfigError(f"unknown subject reduction {reduction!r}; choose one of ['mean', 'max'].")
    s, y = check_scores_labels(scores, labels, need_both=False)
    subj = np.asarray([str(v) for v in subjects])
    if subj.shape != s.shape:
        raise DataError(
            f"subjects must have one id per score; got {subj.shape[0]} ids for {s.shape[0]} scores."
        )
    ids, inv = np.unique(subj, return_inverse=True)
    counts = np.bincount(inv, minlength=ids.size)
    if reduction == "mean":
        out = np.bincount(inv, weights=s, minlength=ids.size) / counts
    else:
        out = np.full(ids.size, -np.inf)
        np.maximum.at(out, inv, s)
    lab = np.zeros(ids.size, dtype=np.int64)
    np.maximum.at(lab, inv, y.astype(np.int64))
    return ids.tolist(), out, lab
