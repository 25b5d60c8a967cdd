"""PSNR / SSIM / MAE per image (with masks) and MS-SSIM scale selection."""

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from meddiff.errors import ConfigError, DataError
from meddiff.metrics import image_scores, ms_ssim, ms_ssim_scales


def _pair(b=3, c=1, h=32, w=32, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(b, c, h, w, generator=g) * 2 - 1
    return gt, (gt + noise * torch.randn(b, c, h, w, generator=g)).clamp(-1, 1)


def test_identical_images():
    gt, _ = _pair()
    r = image_scores(gt, gt.clone())
    assert torch.isinf(r["psnr"]).all() and (r["psnr"] > 0).all()  # documented: +inf, no silent cap
    assert torch.allclose(r["ssim"], torch.ones(3))
    assert (r["mae"] == 0).all()
    assert (image_scores(gt, gt.clone(), max_psnr=100.0)["psnr"] == 100.0).all()


def test_known_psnr_and_mae():
    gt = torch.zeros(2, 1, 16, 16)
    pred = torch.full((2, 1, 16, 16), 0.2)
    r = image_scores(gt, pred, dynamic_range=2.0)
    assert torch.allclose(r["mae"], torch.full((2,), 0.2))
    assert torch.allclose(r["psnr"], torch.full((2,), 10 * math.log10(4 / 0.04)))
    r1 = image_scores(gt, pred, dynamic_range=1.0)  # the range is really used
    assert torch.allclose(r1["psnr"], torch.full((2,), 10 * math.log10(1 / 0.04)))


def test_agrees_with_torchmetrics_per_image():
    gt, pred = _pair(c=2)
    r = image_scores(gt, pred, dynamic_range=2.0)
    for i in range(3):
        assert r["psnr"][i] == pytest.approx(
            peak_signal_noise_ratio(pred[i : i + 1], gt[i : i + 1], data_range=2.0).item(), abs=1e-4
        )
        assert r["ssim"][i] == pytest.approx(
            structural_similarity_index_measure(pred[i : i + 1], gt[i : i + 1], data_range=2.0).item(),
            abs=1e-5,
        )


def test_mask_restricts_to_mask_pixels():
    gt = torch.zeros(2, 1, 16, 16)
    pred = gt.clone()
    pred[:, :, 8:] = 1.0  # error only in the bottom half
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[:, :, :8] = True
    r = image_scores(gt, pred, mask=mask)
    assert (r["mae"] == 0).all() and torch.isinf(r["psnr"]).all()
    full = image_scores(gt, pred, mask=torch.ones_like(mask))
    plain = image_scores(gt, pred)
    for k in ("psnr", "ssim", "mae"):
        assert torch.allclose(full[k], plain[k], atol=1e-5), k
    mask[1] = False
    r = image_scores(gt, pred, mask=mask)
    assert all(torch.isnan(r[k][1]) for k in ("psnr", "ssim", "mae"))


def test_ms_ssim_scale_selection():
    assert ms_ssim_scales(176, 176) == 5
    assert ms_ssim_scales(175, 200) == 4
    assert ms_ssim_scales(128, 128) == 4
    assert ms_ssim_scales(96, 96) == 3
    assert ms_ssim_scales(44, 44) == 3
    assert ms_ssim_scales(43, 43) == 2
    assert ms_ssim_scales(16, 16) == 1  # a 2nd scale (8 px) would be smaller than the 11-px window
    assert ms_ssim_scales(10, 10) == 0


def test_single_scale_ms_ssim_is_ssim():
    gt, pred = _pair(b=2, h=16, w=16, noise=0.1)
    ref = structural_similarity_index_measure(pred, gt, data_range=2.0, reduction="none")
    assert torch.allclose(ms_ssim(gt, pred), ref.clamp_min(0), atol=1e-5)


@pytest.mark.parametrize("size", [64, 128, 176])
def test_ms_ssim_runs_at_any_size_and_is_one_for_identical(size):
    gt, pred = _pair(b=2, h=size, w=size, noise=0.2)
    same = ms_ssim(gt, gt.clone())
    assert same.shape == (2,) and torch.allclose(same, torch.ones(2), atol=1e-5)
    v = ms_ssim(gt, pred)
    assert (v < 0.999).all() and (v > 0).all()


def test_ms_ssim_forced_scales():
    gt, pred = _pair(b=1, h=128, w=128, noise=0.2)
    assert ms_ssim(gt, pred, scales=3).item() != pytest.approx(ms_ssim(gt, pred).item(), abs=1e-6)
    with pytest.raises(ConfigError, match="at most 4"):
        ms_ssim(gt, pred, scales=5)


def test_bad_inputs():
    gt, pred = _pair()
    with pytest.raises(DataError, match=r"\(3, 1, 32, 32\).*\(3, 1, 32, 31\)"):
        image_scores(gt, pred[..., :31])
    with pytest.raises(ConfigError, match="dynamic_range"):
        image_scores(gt, pred, dynamic_range=0)
    with pytest.raises(DataError, match="mask"):
        image_scores(gt, pred, mask=torch.ones(3, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(DataError, match="too small"):
        ms_ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
