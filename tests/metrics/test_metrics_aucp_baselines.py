"""AUCp, the debiased AUC, and the trivial baselines."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from meddiff.errors import ConfigError, DataError
from meddiff.metrics import aucp, debiased_auc, intensity_map, mean_intensity_score


def test_aucp_known_values():
    assert aucp([0.0, 0.1, 0.2], [1.0, 2.0]) == 1.0
    assert aucp([1.0, 2.0], [0.0, 0.1]) == 0.0
    assert aucp([0.0, 1.0], [0.0, 1.0]) == 0.5
    assert aucp(torch.tensor([0.0, 2.0]), np.array([1.0])) == 0.5


def test_debiased_known_values():
    assert debiased_auc(0.75, 0.5) == pytest.approx(1.0)
    assert debiased_auc(0.5, 0.5) == pytest.approx(0.5)
    assert debiased_auc(0.8, 0.0) == pytest.approx(0.8)
    assert debiased_auc(0.6, 0.2) == pytest.approx((0.6 - 0.1) / 0.8)


def test_debiased_recovers_true_auc_when_pool_healthy_look_like_known_healthy():
    # The estimator is exact when the pool's healthy images are scored like the known-healthy ones:
    # make them a copy, so their AUC against the known healthy is exactly 0.5.
    rng = np.random.default_rng(0)
    healthy = rng.normal(size=300)
    anomalous = rng.normal(loc=1.0, size=200)
    pool = np.r_[healthy, anomalous]
    rho = healthy.size / pool.size
    a = aucp(healthy, pool)
    assert 0.5 < a < roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[healthy, anomalous])
    true_auc = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[healthy, anomalous])
    assert debiased_auc(a, rho) == pytest.approx(true_auc, abs=1e-12)


@pytest.mark.parametrize("rho", [1.0, -0.1, 1.5])
def test_debiased_bad_rho(rho):
    with pytest.raises(ConfigError, match="rho"):
        debiased_auc(0.7, rho)


def test_aucp_bad_inputs():
    with pytest.raises(DataError):
        aucp([], [1.0])
    with pytest.raises(DataError, match="NaN"):
        aucp([0.0, float("nan")], [1.0])
    with pytest.raises(ConfigError):
        debiased_auc(1.2, 0.3)


def test_mean_intensity_score_inside_mask():
    img = -torch.ones(2, 3, 8, 8)
    img[:, :, :4] = 0.5
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    assert torch.allclose(mean_intensity_score(img, mask), torch.full((2,), 0.5))
    assert torch.allclose(mean_intensity_score(img), torch.full((2,), -0.25))
    mask[1] = False
    assert mean_intensity_score(img, mask)[1] == -1.0
    assert torch.isnan(mean_intensity_score(img, mask, empty_value=float("nan"))[1])
    assert mean_intensity_score(img, mask)[0] == 0.5
    with pytest.raises(DataError, match="mask"):
        mean_intensity_score(img, torch.ones(2, 1, 8, 7, dtype=torch.bool))


def test_intensity_map_range():
    img = torch.stack([-torch.ones(1, 4, 4), torch.ones(1, 4, 4)])
    img[0, 0, 0, 0] = 0.0
    m = intensity_map(img)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0, 0, 0] == 0.5 and m[0, 0, 1, 1] == 0.0 and (m[1] == 1.0).all()
    with pytest.raises(DataError):
        intensity_map(torch.zeros(4, 4))
