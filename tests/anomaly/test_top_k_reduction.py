"""The ``top_k`` image score: mean of the k largest map values inside the region."""

import numpy as np
import pytest
import torch

from meddiff.anomaly import reduce_map
from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.errors import ConfigError


def test_top_k_matches_numpy_inside_the_mask():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 1, 7, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 1, 7, 9, generator=g) > 0.5
    for k in (1, 3, 10):
        s = reduce_map(maps, mask, reduction="top_k", k=k)
        ref = [np.sort(maps[i][mask[i]].numpy())[::-1][:k].mean() for i in range(6)]
        np.testing.assert_allclose(s.numpy(), ref, rtol=1e-12)
    # k=1 is the max; without a mask every pixel counts
    torch.testing.assert_close(reduce_map(maps, mask, "top_k", k=1), reduce_map(maps, mask, "max"))
    ref = maps.flatten(1).topk(4, dim=1).values.mean(1)
    torch.testing.assert_close(reduce_map(maps, reduction="top_k", k=4), ref)


def test_top_k_with_fewer_pixels_than_k_and_empty_masks():
    maps = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0, :2] = True  # two pixels: values 0 and 1
    s = reduce_map(maps, mask, reduction="top_k", k=5)
    assert s[0] == pytest.approx(0.5) and s[1] == 0.0  # mean of the 2 region pixels; empty -> empty_value
    assert reduce_map(maps, reduction="top_k", k=100)[1] == pytest.approx(maps[1].mean().item())  # k > H*W


def test_top_k_ranks_a_small_strong_anomaly_above_widespread_mild_error():
    healthy = torch.full((1, 1, 10, 10), 0.3)  # mild error everywhere (a blurry reconstruction)
    healthy[0, 0, 0, 0] = 1.0  # one hot pixel: noise
    anomaly = torch.full((1, 1, 10, 10), 0.1)
    anomaly[0, 0, 4:6, 4:7] = 0.9  # six strong pixels together
    maps = torch.cat([healthy, anomaly])
    top = reduce_map(maps, reduction="top_k", k=5)
    assert top[1] > top[0]
    assert reduce_map(maps, reduction="max")[0] > reduce_map(maps, reduction="max")[1]  # max is fooled
    assert reduce_map(maps, reduction="mean")[0] > reduce_map(maps, reduction="mean")[1]  # so is the mean


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k(k):
    with pytest.raises(ConfigError, match="top_k k="):
        reduce_map(torch.rand(2, 1, 4, 4), reduction="top_k", k=k)


def test_scoring_config_passes_k():
    x = torch.zeros(2, 1, 8, 8)
    recon = torch.zeros(2, 1, 8, 8)
    recon[0, 0, 0, :3] = torch.tensor([1.0, 0.5, 0.3])
    s2 = score_batch(x, recon, None, ScoringConfig(reduction="top_k", k=2))["score"]
    s3 = score_batch(x, recon, None, ScoringConfig(reduction="top_k", k=3))["score"]
    assert s2[0].item() == pytest.approx(0.75) and s3[0].item() == pytest.approx(0.6)
    assert ScoringConfig().k == 5 and "k" in ScoringConfig().as_dict()
