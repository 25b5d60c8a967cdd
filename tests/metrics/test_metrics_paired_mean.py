"""Paired bootstrap CI of a mean per-item difference (e.g. PSNR of two denoisers on the same slices)."""

import numpy as np
import pytest

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.paired import margin_over_best, paired_mean_difference


def test_clearly_better_excludes_zero_and_same_includes_it():
    rng = np.random.default_rng(0)
    base = rng.normal(30, 2, size=200)  # per-slice PSNR varies a lot between slices ...
    model = base + 0.5 + rng.normal(0, 0.3, size=200)  # ... but the model is 0.5 dB better on each
    r = paired_mean_difference(model, base, n_boot=500)
    assert r["diff"] == pytest.approx(np.mean(model - base))
    assert 0 < r["diff_ci"][0] < r["diff"] < r["diff_ci"][1] and r["ci_excludes_0"]
    # pairing matters: an unpaired view (per-slice spread 2 dB) could not resolve 0.5 dB this tightly
    assert r["diff_ci"][1] - r["diff_ci"][0] < 0.2
    same = paired_mean_difference(base, base.copy(), n_boot=200)
    assert same["diff_ci"] == (0.0, 0.0) and not same["ci_excludes_0"]
    noise = paired_mean_difference(base + rng.normal(0, 1, 200), base + rng.normal(0, 1, 200), n_boot=500)
    assert noise["diff_ci"][0] < 0 < noise["diff_ci"][1]


def test_cluster_resampling_is_wider_with_volume_effects():
    rng = np.random.default_rng(1)
    vol = np.repeat(np.arange(10), 30)
    effect = rng.normal(0, 1.0, size=10)[vol]  # the margin differs by volume, slices of a volume agree
    a = 30 + effect + rng.normal(0, 0.05, size=300)
    b = np.full(300, 30.0)
    items = paired_mean_difference(a, b, n_boot=500)
    clus = paired_mean_difference(a, b, subjects=vol, n_boot=500)
    assert clus["resampled"] == "subjects" and clus["n_subjects"] == 10
    assert clus["diff_ci"][1] - clus["diff_ci"][0] > 3 * (items["diff_ci"][1] - items["diff_ci"][0])


def test_margin_over_best():
    rng = np.random.default_rng(2)
    model = rng.normal(32, 1, 100)
    nlm, bm3d = model - 1.0, model - 0.3
    r = margin_over_best(model, {"nlm": nlm, "bm3d": bm3d}, n_boot=200)
    assert r["baseline"] == "bm3d" and r["baseline_chosen_on"] == "test" and r["diff"] == pytest.approx(0.3)
    r = margin_over_best(model, {"nlm": nlm, "bm3d": bm3d}, val_means={"nlm": 31.0, "bm3d": 30.0}, n_boot=200)
    assert r["baseline"] == "nlm" and r["baseline_chosen_on"] == "validation"
    # lower is better (MAE): the margin is baseline - model, positive when the model is better
    r = margin_over_best(np.full(50, 0.02), {"nlm": np.full(50, 0.05)}, higher_is_better=False, n_boot=50)
    assert r["diff"] == pytest.approx(0.03)


def test_bad_inputs():
    with pytest.raises(DataError, match="one length"):
        paired_mean_difference([1.0, 2.0], [1.0])
    with pytest.raises(DataError, match="NaN/inf"):
        paired_mean_difference([1.0, float("inf")], [1.0, 2.0])
    with pytest.raises(ConfigError, match="n_boot"):
        paired_mean_difference([1.0], [1.0], n_boot=0)
    with pytest.raises(DataError, match="one id per item"):
        paired_mean_difference([1.0, 2.0], [1.0, 2.0], subjects=["a"])
