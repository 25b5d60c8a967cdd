"""PixelAccumulator (binned, streaming), choose_threshold, dice_score."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from meddiff.errors import ConfigError, DataError
from meddiff.metrics import PixelAccumulator, choose_threshold, dice_score


def _case(seed=0, b=6, h=24, w=24):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, 1, h, w, dtype=torch.bool)
    masks[:, :, 6:14, 8:18] = True
    masks[0] = False  # a healthy image
    maps = (0.35 * torch.randn(b, 1, h, w, generator=g) + 0.5 + 0.5 * masks).clamp(0, 2)
    region = torch.ones_like(masks)
    region[:, :, :2] = False
    return maps, masks, region


def test_binned_auroc_auprc_close_to_sklearn_and_exact_on_quantised():
    maps, masks, region = _case()
    acc = PixelAccumulator(num_bins=1000, max_value=2.0)
    acc.update(maps, masks, region)
    r = acc.compute()
    v = maps[region].double().numpy()
    t = masks[region].numpy()
    assert r["auroc"] == pytest.approx(roc_auc_score(t, v), abs=1e-2)
    assert r["auprc"] == pytest.approx(average_precision_score(t, v), abs=1e-2)
    # exact for scores quantised to their bin's lower edge
    edges = acc.thresholds
    q = edges[np.clip(np.searchsorted(edges, v, side="right") - 1, 0, 999)]
    assert r["auroc"] == pytest.approx(roc_auc_score(t, q), abs=1e-12)
    assert r["auprc"] == pytest.approx(average_precision_score(t, q), abs=1e-12)
    assert r["n_pos_pixels"] == int(t.sum()) and r["n_neg_pixels"] == int((~t).sum())


def test_chunked_updates_equal_one_update():
    maps, masks, region = _case(seed=1)
    one = PixelAccumulator(num_bins=200)
    one.update(maps, masks, region)
    many = PixelAccumulator(num_bins=200)
    for i in range(0, 6, 2):
        many.update(maps[i : i + 2], masks[i : i + 2], region[i : i + 2])
    assert torch.equal(one.pos_hist, many.pos_hist) and torch.equal(one.neg_hist, many.neg_hist)
    assert one.compute() == many.compute()
    a, b = PixelAccumulator(num_bins=200), PixelAccumulator(num_bins=200)
    a.update(maps[:3], masks[:3], region[:3])
    b.update(maps[3:], masks[3:], region[3:])
    assert a.merge(b).compute() == one.compute()


def test_memory_is_bounded_by_bins():
    acc = PixelAccumulator(num_bins=64)
    for _ in range(4):
        maps = torch.rand(16, 1, 128, 128)
        acc.update(maps, maps > 0.9)
    assert acc.pos_hist.numel() == 64 and acc.neg_hist.numel() == 64
    assert int(acc.pos_hist.sum() + acc.neg_hist.sum()) == 4 * 16 * 128 * 128


def test_perfect_maps_give_auroc_one_and_dice_one():
    masks = torch.zeros(2, 1, 10, 10, dtype=torch.bool)
    masks[:, :, 3:6, 3:6] = True
    acc = PixelAccumulator(num_bins=100, max_value=1.0)
    acc.update(masks.float(), masks)
    r = acc.compute()
    assert r["auroc"] == 1.0 and r["auprc"] == 1.0 and r["oracle_dice"] == 1.0
    rev = PixelAccumulator(num_bins=100, max_value=1.0)
    rev.update((~masks).float(), masks)
    assert rev.compute()["auroc"] == 0.0


def test_choose_threshold_finds_planted_threshold_and_dice_at_is_consistent():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(8, 1, 32, 32, generator=g) < 0.2
    neg = torch.rand(8, 1, 32, 32, generator=g) * 0.499  # [0, 0.499)
    pos = 0.5 + torch.rand(8, 1, 32, 32, generator=g) * 0.5  # [0.5, 1)
    maps = torch.where(masks, pos, neg)
    val = PixelAccumulator(num_bins=100, max_value=1.0)
    val.update(maps, masks)
    thr = choose_threshold(val)
    assert thr == pytest.approx(0.5, abs=1e-9)
    assert val.compute()["oracle_dice"] == 1.0
    assert val.dice_at(thr) == 1.0
    # dice_at equals the direct pooled Dice of `maps >= thr` on fresh, overlapping data
    test_maps = (0.3 * torch.randn(8, 1, 32, 32, generator=g) + 0.3 + 0.4 * masks).clamp(0, 1)
    test = PixelAccumulator(num_bins=100, max_value=1.0)
    test.update(test_maps, masks)
    for t in (0.2, 0.37, 0.5, 0.81):
        k = int(np.argmin(np.abs(test.thresholds - t)))
        edge = float(test.thresholds[k])
        direct = dice_score(test_maps.double() >= edge, masks, reduction="pooled").item()
        assert test.dice_at(t) == pytest.approx(direct, abs=1e-12)
    assert test.dice_at(-5.0) == pytest.approx(dice_score(torch.ones_like(masks), masks, "pooled").item())
    assert test.dice_at(5.0) == 0.0


@pytest.mark.parametrize("num_bins,max_value", [(100, 1.0), (1000, 2.0), (37, 0.3)])
def test_values_on_bin_edges_land_in_the_bin_they_open(num_bins, max_value):
    # floor(v * K / max) is off by one for many edges in floating point (e.g. 0.29 * 100 = 28.999...);
    # the bins must agree exactly with the thresholds "v >= edges[k]".
    acc = PixelAccumulator(num_bins=num_bins, max_value=max_value)
    edges = torch.from_numpy(acc.thresholds.copy())
    below = torch.nextafter(edges, torch.full_like(edges, -1.0))[1:]  # just under each edge but the first
    vals = torch.cat([edges, below]).view(1, 1, 1, -1)
    acc.update(vals, torch.ones_like(vals, dtype=torch.bool))
    expected = torch.full((num_bins,), 2, dtype=torch.int64)  # edges[k] and just under edges[k + 1]
    expected[-1] += 1  # max_value itself lands in the last bin
    assert torch.equal(acc.pos_hist, expected)


def test_clipping_is_counted_and_warned():
    acc = PixelAccumulator(num_bins=10, max_value=1.0)
    maps = torch.tensor([0.2, 3.0, 0.9, -1.0]).view(1, 1, 2, 2)
    acc.update(maps, torch.tensor([False, True, True, False]).view(1, 1, 2, 2))
    with pytest.warns(UserWarning, match="2 pixel scores"):
        r = acc.compute()
    assert r["n_clipped"] == 2 and r["auroc"] == 1.0


def test_dice_score_known_values():
    a = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    b = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    a[0, 0, :2] = True
    b[0, 0, :2] = True  # identical -> 1
    a[1, 0, 0, :2] = True
    b[1, 0, 0, 1:3] = True  # overlap 1 of 2+2 -> 0.5
    d = dice_score(a, b)  # image 2: both empty -> empty_value 1
    assert d.tolist() == [1.0, 0.5, 1.0]
    assert dice_score(a, b, empty_value=0.0)[2] == 0.0
    assert dice_score(a, b, reduction="pooled").item() == pytest.approx(2 * 9 / (10 + 10))
    assert dice_score(a, b, reduction="mean").item() == pytest.approx(2.5 / 3)
    assert dice_score(a, ~a)[0] == 0.0


def test_bad_inputs():
    with pytest.raises(ConfigError, match="num_bins"):
        PixelAccumulator(num_bins=1)
    with pytest.raises(ConfigError, match="max_value"):
        PixelAccumulator(max_value=0.0)
    acc = PixelAccumulator()
    with pytest.raises(DataError, match=r"\(2, 1, 4, 5\).*\(2, 1, 4, 4\)"):
        acc.update(torch.rand(2, 1, 4, 4), torch.ones(2, 1, 4, 5, dtype=torch.bool))
    acc.update(torch.rand(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(DataError, match="lesion"):
        acc.compute()
    with pytest.raises(DataError, match="NaN"):
        acc.update(torch.full((1, 1, 2, 2), float("nan")), torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ConfigError):
        PixelAccumulator(num_bins=10).merge(PixelAccumulator(num_bins=20))
    with pytest.raises(ConfigError, match="reduction"):
        dice_score(torch.ones(1, 2), torch.ones(1, 2), reduction="sum")
    with pytest.raises(DataError, match=r"\(1, 2\).*\(1, 3\)"):
        dice_score(torch.ones(1, 2), torch.ones(1, 3))
    with pytest.raises(ConfigError):
        choose_threshold(0.5)
