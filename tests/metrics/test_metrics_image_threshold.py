"""The image-level threshold: F1-max on the scores given (checked by brute force), applied elsewhere unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.metrics.image_threshold import at_threshold, f1_max_threshold


def _f1(s: np.ndarray, y: np.ndarray, t: float) -> float:
    p = s >= t
    tp, fp, fn = (p & y).sum(), (p & ~y).sum(), (~p & y).sum()
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_threshold_equals_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.3
    s = np.round(rng.normal(size=200) + 1.2 * y, 1)  # rounded: many tied scores
    thr, f1 = f1_max_threshold(s, y.astype(int))
    best = max(_f1(s, y, t) for t in np.unique(s))
    assert f1 == pytest.approx(best)
    assert _f1(s, y, thr) == pytest.approx(best)
    assert thr == max(t for t in np.unique(s) if _f1(s, y, t) == pytest.approx(best))  # ties: the highest


def test_at_threshold_counts():
    r = at_threshold([0.1, 0.5, 0.9, 0.4], [0, 1, 1, 0], 0.45)
    assert r == {"threshold": 0.45, "sensitivity": 1.0, "specificity": 1.0, "precision": 1.0, "f1": 1.0}
    r = at_threshold([0.1, 0.5, 0.9, 0.4], [0, 1, 1, 0], 0.7)
    assert (r["sensitivity"], r["specificity"], r["precision"]) == (0.5, 1.0, 1.0)
