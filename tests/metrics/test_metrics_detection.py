"""Image-level AUROC/AUPRC with stratified bootstrap CIs."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from meddiff.errors import ConfigError, DataError
from meddiff.metrics import aggregate_by_subject, image_level, pr_curve_points, roc_curve_points
from meddiff.metrics.detection import weighted_auroc_ap


def test_perfect_separation_auroc_one_ci_one():
    scores = np.r_[np.linspace(0, 1, 30), np.linspace(2, 3, 10)]
    labels = np.r_[np.zeros(30), np.ones(10)]
    r = image_level(scores, labels, n_boot=200)
    assert r["auroc"] == 1.0 and r["auroc_ci"] == (1.0, 1.0)
    assert r["auprc"] == 1.0 and r["auprc_ci"] == (1.0, 1.0)
    assert r["n"] == 40 and r["n_pos"] == 10


def test_reversed_gives_zero():
    scores = np.r_[np.linspace(2, 3, 30), np.linspace(0, 1, 10)]
    labels = np.r_[np.zeros(30), np.ones(10)]
    r = image_level(torch.tensor(scores), torch.tensor(labels, dtype=torch.long), n_boot=100)
    assert r["auroc"] == 0.0 and r["auroc_ci"] == (0.0, 0.0)


def test_point_estimates_match_sklearn_and_ci_brackets_them():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = rng.normal(size=300) + 1.0 * labels
    r = image_level(scores, labels.astype(int), n_boot=500, seed=1)
    assert r["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert r["auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    lo, hi = r["auroc_ci"]
    assert lo < r["auroc"] < hi and 0.03 < hi - lo < 0.25
    lo, hi = r["auprc_ci"]
    assert lo < r["auprc"] < hi
    # deterministic per seed, different across seeds
    assert image_level(scores, labels, n_boot=500, seed=1)["auroc_ci"] == r["auroc_ci"]
    assert image_level(scores, labels, n_boot=500, seed=2)["auroc_ci"] != r["auroc_ci"]


def test_wider_ci_level_is_wider():
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(60), np.ones(40)]
    scores = rng.normal(size=100) + labels
    a = image_level(scores, labels, n_boot=400, ci=0.5)["auroc_ci"]
    b = image_level(scores, labels, n_boot=400, ci=0.99)["auroc_ci"]
    assert b[0] < a[0] and b[1] > a[1]


def test_vectorised_weighted_metrics_equal_sklearn_with_ties():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 6, size=50).astype(float)  # many ties
    labels = rng.random(50) < 0.4
    w = rng.integers(0, 4, size=(7, 50)).astype(float)
    w[:, np.flatnonzero(labels)[0]] += 1  # every row has both classes
    w[:, np.flatnonzero(~labels)[0]] += 1
    au, ap = weighted_auroc_ap(scores, labels, w)
    for i in range(7):
        assert au[i] == pytest.approx(roc_auc_score(labels, scores, sample_weight=w[i]), abs=1e-12)
        assert ap[i] == pytest.approx(average_precision_score(labels, scores, sample_weight=w[i]), abs=1e-12)


def test_bootstrap_is_stratified():
    # one positive: a non-stratified bootstrap would often draw no positive at all; ours always keeps it
    scores = np.r_[np.zeros(20), 1.0]
    labels = np.r_[np.zeros(20), 1]
    r = image_level(scores, labels, n_boot=300)
    assert r["auroc_ci"] == (1.0, 1.0)


def test_no_bootstrap():
    r = image_level([0.1, 0.9], [0, 1], n_boot=0)
    assert r["auroc"] == 1.0 and all(np.isnan(r["auroc_ci"]))


def test_curves():
    roc = roc_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and len(roc["fpr"]) == len(roc["thresholds"])
    pr = pr_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert pr["recall"][0] == 1 and pr["precision"][-1] == 1


def test_subject_aggregation():
    ids, s, y = aggregate_by_subject([1.0, 3.0, 0.0, 5.0, 2.0], [0, 1, 0, 0, 0], ["b", "b", "a", "c", "a"])
    assert ids == ["a", "b", "c"]
    np.testing.assert_allclose(s, [1.0, 2.0, 5.0])
    np.testing.assert_array_equal(y, [0, 1, 0])
    _, s, _ = aggregate_by_subject([1.0, 3.0], [0, 1], ["x", "x"], reduction="max")
    assert s.tolist() == [3.0]


@pytest.mark.parametrize(
    "scores,labels,match",
    [
        ([0.1, 0.2, 0.3], [0, 0, 0], "only one class"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "only one class"),
        ([0.1, 0.2], [0, 1, 1], "same length"),
        ([0.1, float("nan")], [0, 1], "NaN"),
        ([0.1, 0.2], [0, 2], "0 .healthy. or 1"),
    ],
)
def test_bad_inputs(scores, labels, match):
    with pytest.raises(DataError, match=match):
        image_level(scores, labels, n_boot=10)


def test_bad_config():
    with pytest.raises(ConfigError, match="n_boot"):
        image_level([0, 1], [0, 1], n_boot=-1)
    with pytest.raises(ConfigError, match="ci"):
        image_level([0, 1], [0, 1], ci=95)
