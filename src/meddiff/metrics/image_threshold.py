"""An image-level decision threshold chosen on validation, and what it gives on another split.

The threshold maximises F1 of "anomalous" (label 1) on validation scores: the operating point a user of
``meddiff-predict`` gets in its ``anomalous`` column. It is a choice like any other, so it comes from validation and
is only *applied* to test (sensitivity, specificity, F1 there), never fitted on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .detection import check_scores_labels

__all__ = ["at_threshold", "f1_max_threshold"]


def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """``(threshold, F1)``: the score threshold (predict anomalous when ``score >= threshold``) with the highest F1
    over the distinct scores; ties keep the higher threshold (fewer false alarms). Scores ``[N]``, labels ``[N]`` in
    {0, 1} with both classes present."""
    s, y = check_scores_labels(scores, labels)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order].astype(np.float64)
    tp = np.cumsum(y_sorted)
    k = np.arange(1, s.size + 1, dtype=np.float64)
    # a threshold at s_sorted[i] flags every item with a score >= it: the last index of each run of equal scores
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, k, thr = tp[last], k[last], s_sorted[last]
    f1 = 2.0 * tp / (k + y.sum())
    i = int(np.argmax(f1))  # the first maximum: the highest threshold
    return float(thr[i]), float(f1[i])


def at_threshold(scores: Any, labels: Any, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, precision and F1 of ``score >= threshold`` (scores ``[N]``, labels ``[N]`` in
    {0, 1}; a class absent gives NaN for its rate)."""
    s, y = check_scores_labels(scores, labels, need_both=False)
    pred = s >= threshold
    pos, neg = y == 1, y == 0
    tp, fp, fn, tn = (pred & pos).sum(), (pred & neg).sum(), (~pred & pos).sum(), (~pred & neg).sum()

    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else float("nan")

    return {"threshold": float(threshold), "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn)}
