"""Cluster (subject) bootstrap CIs and paired bootstrap CIs of "model - baseline"."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.detection import (
    _cluster_weight_blocks,
    detection_ci,
    image_level,
    margin_over_best_baseline,
    margin_verdict,
    paired_difference,
)


def _clustered(n_sub=24, per=25, subject_sd=1.0, item_sd=0.05, seed=0):
    """Each subject's items share one random offset: items of a subject are nearly copies of each other."""
    rng = np.random.default_rng(seed)
    sub_label = np.arange(n_sub) % 2
    offset = rng.normal(size=n_sub) * subject_sd + 0.8 * sub_label
    subjects = np.repeat([f"s{i:02d}" for i in range(n_sub)], per)
    labels = np.repeat(sub_label, per)
    scores = np.repeat(offset, per) + rng.normal(size=n_sub * per) * item_sd
    return scores, labels, subjects


def width(ci):
    return ci[1] - ci[0]


def test_cluster_ci_is_wider_than_item_ci_on_clustered_data():
    s, y, subj = _clustered()
    item = detection_ci(s, y, n_boot=500, seed=1)
    clus = detection_ci(s, y, subjects=subj, n_boot=500, seed=1)
    assert item["resampled"] == "items" and clus["resampled"] == "subjects" and clus["n_subjects"] == 24
    assert clus["auroc"] == item["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert clus["auprc"] == pytest.approx(average_precision_score(y, s))
    # 600 items but only 24 independent subjects: the honest interval is several times wider
    assert width(clus["auroc_ci"]) > 2.5 * width(item["auroc_ci"])
    assert width(clus["auprc_ci"]) > 2.0 * width(item["auprc_ci"])
    assert clus["auroc_ci"][0] < clus["auroc"] < clus["auroc_ci"][1]


def test_cluster_ci_with_one_item_per_subject_is_like_the_item_ci():
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(150), np.ones(100)].astype(int)
    s = rng.normal(size=250) + y
    item = detection_ci(s, y, n_boot=800, seed=0)
    clus = detection_ci(s, y, subjects=[f"p{i}" for i in range(250)], n_boot=800, seed=0)
    assert width(clus["auroc_ci"]) == pytest.approx(width(item["auroc_ci"]), rel=0.2)
    # without subjects, detection_ci is image_level exactly
    ref = image_level(s, y, n_boot=800, seed=0)
    assert item["auroc_ci"] == ref["auroc_ci"] and item["auprc_ci"] == ref["auprc_ci"]


def test_cluster_replicates_always_hold_both_classes_and_whole_subjects():
    # one anomalous subject among many: every replicate must contain it (stratified by composition)
    y = np.r_[np.zeros(40), np.ones(3), np.zeros(2)]
    subj = np.r_[np.repeat(np.arange(8), 5), [99] * 5].astype(str)
    for w in _cluster_weight_blocks(y.astype(bool), subj, 200, seed=0):
        assert (w[:, y == 1].sum(1) > 0).all() and (w[:, y == 0].sum(1) > 0).all()
        for sid in np.unique(subj):  # all items of a subject share its multiplicity
            ws = w[:, subj == sid]
            assert (ws == ws[:, :1]).all()
    r = detection_ci(np.r_[np.zeros(40), np.ones(5)], y, subjects=subj, n_boot=100)
    assert np.isfinite(r["auroc_ci"]).all()


def test_paired_ci_excludes_zero_when_the_model_is_clearly_better():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200), np.ones(200)].astype(int)
    model = y * 2.0 + rng.normal(size=400)
    base = y * 0.5 + rng.normal(size=400)
    r = paired_difference(model, base, y, n_boot=500, seed=0)
    assert r["auroc_diff"] == pytest.approx(roc_auc_score(y, model) - roc_auc_score(y, base))
    lo, hi = r["auroc_diff_ci"]
    assert 0 < lo < r["auroc_diff"] < hi and r["ci_excludes_0"] and r["frac_diff_le_0"] == 0.0
    assert r["auprc_diff_ci"][0] > 0
    # and the reverse comparison is clearly negative
    rev = paired_difference(base, model, y, n_boot=500, seed=0)
    assert rev["auroc_diff_ci"][1] < 0 and rev["ci_excludes_0"]


def test_paired_ci_is_zero_for_identical_rankings():
    # the same resampled indices for both: a monotone transform of the scores gives a difference of exactly 0 in
    # every replicate (independent resampling of the two would give a non-zero spread)
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.4).astype(int)
    s = rng.normal(size=300) + y
    for subjects in (None, np.arange(300) // 3):
        r = paired_difference(s, 3 * s + 1, y, subjects=subjects, n_boot=300, seed=0)
        assert r["auroc_diff"] == 0 and r["auroc_diff_ci"] == (0.0, 0.0) and not r["ci_excludes_0"]
        assert r["frac_diff_le_0"] == 1.0


def test_paired_ci_includes_zero_for_equally_good_scores():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(150), np.ones(150)].astype(int)
    a = y + rng.normal(size=300)
    b = y + rng.normal(size=300)
    r = paired_difference(a, b, y, n_boot=500, seed=0)
    lo, hi = r["auroc_diff_ci"]
    assert lo < 0 < hi and not r["ci_excludes_0"]


def test_paired_ci_pairing_makes_it_narrower_than_unpaired():
    # baseline = model + small noise: strongly correlated, so the paired CI of the difference is much narrower than
    # what the two separate CIs suggest
    rng = np.random.default_rng(4)
    y = np.r_[np.zeros(200), np.ones(200)].astype(int)
    model = y + rng.normal(size=400)
    base = model + 0.3 * rng.normal(size=400)
    r = paired_difference(model, base, y, n_boot=500, seed=0)
    separate = width(image_level(model, y, n_boot=500)["auroc_ci"]) + width(image_level(base, y, n_boot=500)["auroc_ci"])
    assert width(r["auroc_diff_ci"]) < 0.5 * separate


def test_paired_cluster_ci_is_wider_on_clustered_data():
    s, y, subj = _clustered(seed=5)
    rng = np.random.default_rng(6)
    base = np.repeat(rng.normal(size=24), 25) + 0.3 * y + rng.normal(size=600) * 0.05
    items = paired_difference(s, base, y, n_boot=400, seed=0)
    clus = paired_difference(s, base, y, subjects=subj, n_boot=400, seed=0)
    assert clus["resampled"] == "subjects" and clus["n_subjects"] == 24
    assert width(clus["auroc_diff_ci"]) > 2.0 * width(items["auroc_diff_ci"])


def test_margin_over_best_baseline_choice():
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(100), np.ones(100)].astype(int)
    model = 2 * y + rng.normal(size=200)
    weak, strong = 0.2 * y + rng.normal(size=200), 1.0 * y + rng.normal(size=200)
    r = margin_over_best_baseline(model, {"weak": weak, "strong": strong}, y, n_boot=200)
    assert r["baseline"] == "strong" and r["baseline_chosen_on"] == "test"
    r = margin_over_best_baseline(model, {"weak": weak, "strong": strong}, y, n_boot=200,
                                  val_auroc={"weak": 0.9, "strong": 0.6})
    assert r["baseline"] == "weak" and r["baseline_chosen_on"] == "validation"
    assert r["auroc_baseline"] == pytest.approx(roc_auc_score(y, weak))
    with pytest.raises(ConfigError, match="val_auroc lacks"):
        margin_over_best_baseline(model, {"weak": weak}, y, val_auroc={})


def test_margin_verdict_says_beats_only_when_the_ci_excludes_0_from_above():
    rng = np.random.default_rng(8)
    y = np.r_[np.zeros(60), np.ones(60)].astype(int)
    model, base = 3 * y + rng.normal(size=120), 0.3 * y + rng.normal(size=120)
    beats = margin_over_best_baseline(model, {"b": base}, y, val_auroc={"b": 0.6}, n_boot=200)
    assert beats["auroc_diff_ci"][0] > 0
    assert margin_verdict(beats, label="nearest healthy image") == (
        f"The model beats the best baseline (nearest healthy image, chosen on validation): image AUROC margin "
        f"{beats['auroc_diff']:+.3f} [{beats['auroc_diff_ci'][0]:+.3f}, {beats['auroc_diff_ci'][1]:+.3f}] "
        "(paired 95% CI) excludes 0."
    )
    same = margin_over_best_baseline(base + 0.01 * rng.normal(size=120), {"b": base}, y, n_boot=200)
    assert same["auroc_diff_ci"][0] <= 0 <= same["auroc_diff_ci"][1]
    text = margin_verdict(same, what="AD vs CN volume AUROC margin")
    assert text.startswith("The model does NOT beat the best baseline (b, the best on test): AD vs CN volume AUROC")
    assert text.endswith("includes 0.")
    worse = margin_over_best_baseline(base, {"b": model}, y, n_boot=200)
    assert margin_verdict(worse).startswith("The model is WORSE than the best baseline (b, the best on test)")
    no_ci = {k: v for k, v in beats.items() if k != "auroc_diff_ci"}
    assert margin_verdict(no_ci).endswith("no CI (eval.n_boot=0), so no verdict.")


def test_bad_inputs():
    with pytest.raises(DataError, match="same length"):
        paired_difference([0.1, 0.2, 0.3], [0.1, 0.2], [0, 1, 1])
    with pytest.raises(DataError, match="one id per score"):
        detection_ci([0.1, 0.9], [0, 1], subjects=["a"], n_boot=10)
    with pytest.raises(ConfigError, match="n_boot"):
        paired_difference([0.1, 0.9], [0.2, 0.8], [0, 1], n_boot=-1)
    point = paired_difference([0.1, 0.9, 0.4], [0.2, 0.8, 0.9], [0, 1, 0], n_boot=0)  # point differences, no CI
    assert point["auroc_diff"] == pytest.approx(1.0 - 0.5) and "auroc_diff_ci" not in point
    assert "no verdict" in margin_verdict({"baseline": "b", **point})
    with pytest.raises(DataError, match="only one class"):
        paired_difference([0.1, 0.9], [0.2, 0.8], [1, 1])
