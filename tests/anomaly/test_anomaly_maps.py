"""anomaly_map / local_ssim: known answers, agreement with torchmetrics and skimage, bad inputs."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torchmetrics.functional.image import structural_similarity_index_measure

from meddiff.anomaly import anomaly_map, local_ssim
from meddiff.errors import ConfigError, DataError


def _pair(b=2, c=3, h=32, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g) * 2 - 1
    r = (x + 0.3 * torch.randn(b, c, h, w, generator=g)).clamp(-1, 1)
    return x, r


@pytest.mark.parametrize("kind", ["l1", "l2", "ssim"])
def test_shape_and_identical_inputs_give_zero(kind):
    x, _ = _pair()
    m = anomaly_map(x, x.clone(), kind=kind)
    assert m.shape == (2, 1, 32, 40)
    assert torch.allclose(m, torch.zeros_like(m), atol=1e-5)


def test_l1_l2_known_values_channel_mean():
    x = torch.zeros(1, 2, 4, 4)
    r = torch.zeros(1, 2, 4, 4)
    r[:, 0] = 0.5  # channel 0 off by 0.5, channel 1 exact
    assert torch.allclose(anomaly_map(x, r, "l1"), torch.full((1, 1, 4, 4), 0.25))
    assert torch.allclose(anomaly_map(x, r, "l2"), torch.full((1, 1, 4, 4), 0.125))
    # extremes of the [-1, 1] range
    assert anomaly_map(-torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3), "l1").max() == 2.0
    assert anomaly_map(-torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3), "l2").max() == 4.0


def test_ssim_map_equals_torchmetrics_full_image():
    x, r = _pair()
    ours = local_ssim(r, x, data_range=2.0)  # defaults: gaussian, 11 px, sigma 1.5
    _, ref = structural_similarity_index_measure(
        r, x, data_range=2.0, reduction="none", return_full_image=True
    )
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5)
    m = anomaly_map(x, r, "ssim")
    assert torch.allclose(m, 1 - ref.mean(dim=1, keepdim=True), atol=1e-5)
    assert (m >= -1e-6).all() and (m <= 2 + 1e-6).all()


def test_uniform_ssim_matches_skimage_interior():
    x, r = _pair(b=1, c=1, h=30, w=30, seed=3)
    a, b = x[0, 0].double().numpy(), r[0, 0].double().numpy()
    _, ref = structural_similarity(
        a, b, data_range=2.0, win_size=7, use_sample_covariance=False, gaussian_weights=False, full=True
    )
    ours = local_ssim(x.double(), r.double(), data_range=2.0, window=7, kernel="uniform")[0, 0].numpy()
    # padding differs at the border (skimage: symmetric, ours: reflect); the interior must agree
    np.testing.assert_allclose(ours[3:-3, 3:-3], ref[3:-3, 3:-3], atol=1e-8)


def test_ssim_map_localises_a_lesion():
    x = torch.zeros(1, 1, 48, 48)
    x[..., ::2, :] = 0.5  # texture
    r = x.clone()
    r[..., 20:28, 20:28] = -0.8  # reconstruction wrong in one square
    m = anomaly_map(x, r, "ssim", ssim_window=7)
    assert m[..., 20:28, 20:28].mean() > 0.5
    assert m[..., :10, :10].abs().max() < 1e-4


def test_bad_kind_names_value_and_choices():
    x, r = _pair()
    with pytest.raises(ConfigError, match=r"'l3'.*l1.*l2.*ssim"):
        anomaly_map(x, r, kind="l3")


def test_shape_mismatch_names_both_shapes():
    x, r = _pair()
    with pytest.raises(DataError, match=r"\(2, 3, 32, 40\).*\(2, 3, 32, 39\)"):
        anomaly_map(x, r[..., :39], kind="l1")
    with pytest.raises(DataError, match="B, C, H, W"):
        anomaly_map(x[0], r[0])


@pytest.mark.parametrize("window", [4, 1, 81])
def test_bad_ssim_window(window):
    x, r = _pair()
    with pytest.raises(ConfigError, match="window"):
        anomaly_map(x, r, kind="ssim", ssim_window=window)
    with pytest.raises(ConfigError, match="kernel"):
        anomaly_map(x, r, kind="ssim", ssim_kernel="box")
