"""reduce_map: reductions inside a mask, empty masks, agreement with numpy, bad inputs."""

import numpy as np
import pytest
import torch

from meddiff.anomaly import reduce_map
from meddiff.errors import ConfigError, DataError


def test_mask_ignores_outside_pixels():
    maps = torch.zeros(2, 1, 8, 8)
    maps[:, :, :4] = 1.0
    maps[:, :, 4:] = 100.0  # huge values outside the mask
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    for red in ("mean", "max", "percentile"):
        s = reduce_map(maps, mask, reduction=red)
        assert s.shape == (2,)
        assert torch.allclose(s, torch.ones(2)), red
    assert reduce_map(maps, reduction="max")[0] == 100.0  # and they do count without a mask


def test_values_match_numpy_per_image():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 1, 10, 12, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 1, 10, 12, generator=g) > 0.4
    for q in (0, 37.5, 50, 99, 100):
        s = reduce_map(maps, mask, reduction="percentile", q=q)
        ref = [np.percentile(maps[i][mask[i]].numpy(), q) for i in range(5)]
        np.testing.assert_allclose(s.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(
        reduce_map(maps, mask, "mean").numpy(), [maps[i][mask[i]].mean().item() for i in range(5)]
    )
    np.testing.assert_allclose(
        reduce_map(maps, mask, "max").numpy(), [maps[i][mask[i]].max().item() for i in range(5)]
    )


def test_empty_mask_gets_empty_value():
    maps = torch.rand(3, 1, 6, 6)
    mask = torch.ones(3, 1, 6, 6, dtype=torch.bool)
    mask[1] = False
    for red in ("mean", "max", "percentile"):
        s = reduce_map(maps, mask, reduction=red)
        assert s[1] == 0.0 and torch.isfinite(s).all()
        s = reduce_map(maps, mask, reduction=red, empty_value=float("nan"))
        assert torch.isnan(s[1]) and not torch.isnan(s[[0, 2]]).any()


def test_single_pixel_mask_percentile():
    maps = torch.rand(1, 1, 5, 5)
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 2, 3] = True
    assert reduce_map(maps, mask, "percentile", q=99)[0] == maps[0, 0, 2, 3]


def test_bad_inputs():
    maps = torch.rand(2, 1, 4, 4)
    with pytest.raises(ConfigError, match=r"'median'.*mean.*max.*percentile"):
        reduce_map(maps, reduction="median")
    with pytest.raises(ConfigError, match="q=101"):
        reduce_map(maps, reduction="percentile", q=101)
    with pytest.raises(DataError, match=r"\(2, 1, 4, 5\).*\(2, 1, 4, 4\)"):
        reduce_map(maps, torch.ones(2, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(DataError):
        reduce_map(maps[0])
