"""meddiff.patches: the one patch grid (file patches, pDDPM masks) and the one stitcher (crops and masked images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.errors import ConfigError, DataError
from meddiff.patches import (
    OverlapAverage,
    grid_starts,
    patch_grid,
    patch_masks,
    patch_starts,
    stitch,
    stitch_canvases,
)


def test_one_grid_for_file_patches_and_diffusion_masks():
    assert patch_starts(28, 12, 8).tolist() == grid_starts(28, 12, 8) == [0, 8, 16]
    assert patch_starts(96, 40, 32).tolist() == [0, 32, 56]  # last patch aligned to the border
    assert patch_starts(33, 64, 32).size == 0  # a file slice too small for a patch has none...
    with pytest.raises(ConfigError, match="larger than the image"):  # ...an image to diffuse must hold one
        grid_starts(33, 64, 32)
    with pytest.raises(ConfigError, match="stride=0"):
        patch_starts(28, 12, 0)
    for h, w, size, stride in [(28, 28, 12, 8), (30, 20, 7, 3), (16, 24, 16, 5)]:
        masks = patch_masks(h, w, size, stride)
        corners = patch_grid((h, w), size, stride)
        assert masks.shape == (len(corners), 1, h, w) and masks.any(0).all()
        for m, (y, x) in zip(masks, corners.tolist()):  # mask i is the patch at corner i
            ref = torch.zeros(1, h, w, dtype=torch.bool)
            ref[:, y : y + size, x : x + size] = True
            assert torch.equal(m, ref)
    assert patch_masks(5, 7, None).shape == (1, 1, 5, 7) and patch_masks(5, 7, None).all()


def _reference_masked_average(x0: torch.Tensor, masks: torch.Tensor, preds: list[torch.Tensor],
                              index: list[torch.Tensor]) -> torch.Tensor:
    """pDDPM reconstruction's accumulation as written before the stitcher was shared (diffusion/partial.py)."""
    b, _, h, w = x0.shape
    total = torch.zeros_like(x0)
    count = torch.zeros(b, 1, h, w, dtype=x0.dtype)
    for img, (pred, pat) in zip(index, preds):
        mf = masks[pat].to(x0.dtype)
        total.index_add_(0, img, pred.clamp(-1, 1) * mf)
        count.index_add_(0, img, mf)
    return total / count.clamp_min(1.0)


def test_masked_stitching_matches_the_reconstruction_arithmetic_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 20, 20, generator=g) * 2 - 1
    masks = patch_masks(20, 20, 8, 5)
    n = masks.shape[0]
    flat = torch.arange(3 * n)
    chunks = list(flat.split(7))  # uneven chunks, images repeated within a chunk
    preds = [(torch.randn(len(c), 2, 20, 20, generator=g), c % n) for c in chunks]
    canvas = OverlapAverage(3, 2, 20, 20, dtype=x0.dtype)
    for c, (pred, pat) in zip(chunks, preds):
        canvas.add_masked(c // n, pred.clamp(-1, 1), masks[pat])
    ref = _reference_masked_average(x0, masks, preds, [c // n for c in chunks])
    assert torch.equal(canvas.mean(), ref)
    assert canvas.covered().all()


def test_crops_and_masks_stitch_to_the_same_average():
    g = torch.Generator().manual_seed(1)
    corners = patch_grid((12, 10), 6, 4)
    crops = torch.randn(len(corners), 1, 6, 6, dtype=torch.float64, generator=g)
    a = OverlapAverage(1, 1, 12, 10)
    b = OverlapAverage(1, 1, 12, 10)
    masks = patch_masks(12, 10, 6, 4)
    for crop, (y, x), m in zip(crops, corners.tolist(), masks):
        a.add_patch(0, crop, y, x)
        full = torch.zeros(1, 1, 12, 10, dtype=torch.float64)
        full[..., y : y + 6, x : x + 6] = crop
        b.add_masked(torch.tensor([0]), full, m[None])
    torch.testing.assert_close(a.mean(), b.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.counts, b.counts, rtol=0, atol=0)


def test_stitch_reproduces_slices_averages_overlaps_and_fills_gaps():
    rng = np.random.default_rng(0)
    slice_ = rng.uniform(-1, 1, (11, 9)).astype(np.float32)
    corners = patch_grid((11, 9), 5, 3)
    patches = np.stack([slice_[y : y + 5, x : x + 5] for y, x in corners])[:, None]
    coords = np.array([(2, 7, y, x) for y, x in corners])
    out = stitch(patches, coords, (11, 9))
    assert list(out) == [(2, 7)] and out[(2, 7)].dtype == np.float32
    np.testing.assert_array_equal(out[(2, 7)], slice_)  # identical overlaps reproduce the slice exactly
    shifted = patches.copy()
    shifted[0] += 1.0  # one patch moves its pixels by 1 / (patches covering them)
    moved = stitch(shifted, coords, (11, 9))[(2, 7)] - slice_
    cover = np.zeros((11, 9))
    for y, x in corners:
        cover[y : y + 5, x : x + 5] += 1
    np.testing.assert_allclose(moved[:5, :5], 1 / cover[:5, :5], atol=1e-6)
    assert not moved[5:].any() and not moved[:, 5:].any()
    partial = stitch(patches[:1], coords[:1], (11, 9), fill=-7.0)[(2, 7)]  # uncovered pixels get `fill`
    assert (partial[5:] == -7.0).all() and (partial[:5, :5] == slice_[:5, :5]).all()
    canvas = stitch_canvases(np.concatenate([patches, -patches], axis=1)[:1], coords[:1], (11, 9))[(2, 7)]
    assert canvas.covered()[0, 0, :5, :5].all() and not canvas.covered()[0, 0, 5:].any()
    np.testing.assert_array_equal(canvas.mean(-1.0)[0, 1, :5, :5].numpy(), -slice_[:5, :5])


def test_stitch_rejects_bad_shapes_and_patches_outside_the_slice():
    with pytest.raises(DataError, match="outside slice shape"):
        stitch(np.zeros((1, 1, 5, 5)), np.array([(0, 0, 8, 0)]), (11, 9))
    with pytest.raises(DataError, match=r"\[N, 1, P, P\]"):
        stitch(np.zeros((1, 2, 5, 5)), np.array([(0, 0, 0, 0)]), (11, 9))
    with pytest.raises(DataError, match=r"\[N, 4\]"):
        stitch(np.zeros((2, 1, 5, 5)), np.array([(0, 0, 0, 0)]), (11, 9))
