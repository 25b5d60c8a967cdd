"""BM3D as an optional extra, and the noise-level estimate."""

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from meddiff.errors import ConfigError, DataError
from meddiff.metrics import denoisers
from meddiff.metrics.denoisers import available, bm3d_denoise, bm3d_denoise_batch, estimate_sigma


def _mr(crop: int = 64) -> np.ndarray:
    a = dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float64)
    a = (a - a.min()) / (a.max() - a.min()) * 2 - 1
    o = (64 - crop) // 2
    return a[o : o + crop, o : o + crop]


def _psnr(a, b):
    return 10 * np.log10(4.0 / np.mean((a - b) ** 2))


def test_missing_extra_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(denoisers, "available", lambda: False)
    with pytest.raises(ConfigError, match=r"optional extra `bm3d`.*not installed.*meddiff\[denoise\]"):
        bm3d_denoise(np.zeros((16, 16)), 0.1)
    with pytest.raises(ConfigError, match="optional extra"):
        bm3d_denoise_batch(np.zeros((1, 1, 16, 16)), 0.1)


def test_available_matches_import():
    try:
        import bm3d  # noqa: F401

        imported = True
    except ImportError:
        imported = False
    assert available() is imported


def test_estimate_sigma_on_a_real_scan():
    x = _mr()
    rng = np.random.default_rng(0)
    for s in (0.05, 0.1, 0.2):
        est = estimate_sigma(x + s * rng.normal(size=x.shape))
        assert est == pytest.approx(s, rel=0.25)


def test_bad_inputs():
    with pytest.raises(DataError, match="2D slice"):
        bm3d_denoise(np.zeros((1, 16, 16)), 0.1)
    with pytest.raises(DataError, match="too small"):
        bm3d_denoise(np.zeros((4, 4)), 0.1)
    with pytest.raises(ConfigError, match="sigma"):
        bm3d_denoise(np.zeros((16, 16)), -0.1)
    with pytest.raises(DataError, match=r"\[N, C, H, W\]"):
        bm3d_denoise_batch(np.zeros((16, 16)), 0.1)


@pytest.mark.skipif(not available(), reason="optional extra bm3d not installed")
def test_bm3d_denoises_a_real_scan():
    x = _mr(crop=32)
    noisy = x + 0.1 * np.random.default_rng(1).normal(size=x.shape)
    out = bm3d_denoise(noisy, 0.1)
    assert out.shape == x.shape and out.dtype == np.float32 and out.min() >= -1 and out.max() <= 1
    assert _psnr(out, x) > _psnr(noisy, x) + 3.0  # measured +5.5 dB at 32 px (+6.6 dB on the whole 64 px slice)
    est = bm3d_denoise(noisy)  # sigma estimated
    assert _psnr(est, x) > _psnr(noisy, x) + 3.0
    assert np.array_equal(bm3d_denoise(x, 0.0), x.astype(np.float32))
    batch = bm3d_denoise_batch(noisy[None, None], 0.1)
    assert batch.shape == (1, 1, 32, 32) and np.allclose(batch[0, 0], out, atol=1e-5)
