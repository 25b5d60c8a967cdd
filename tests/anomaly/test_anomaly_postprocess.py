"""Post-processing: median filter, erosion, masking, small components, the PostProcess pipeline."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from meddiff.anomaly import PostProcess, apply_mask, erode_mask, median_filter, remove_small_components
from meddiff.errors import ConfigError, DataError


def test_median_filter_removes_single_hot_pixel():
    m = torch.zeros(2, 1, 16, 16)
    m[0, 0, 7, 9] = 5.0
    out = median_filter(m, size=5)
    assert out.shape == m.shape
    assert out.abs().max() == 0.0
    # size 3 removes it too; size 1 is a no-op copy
    assert median_filter(m, size=3).abs().max() == 0.0
    same = median_filter(m, size=1)
    assert torch.equal(same, m) and same.data_ptr() != m.data_ptr()


def test_median_filter_matches_scipy_mirror_and_keeps_large_blob():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(3, 2, 20, 17, generator=g)
    ours = median_filter(m, size=5).numpy()
    ref = ndimage.median_filter(m.numpy(), size=(1, 1, 5, 5), mode="mirror")
    np.testing.assert_allclose(ours, ref)
    blob = torch.zeros(1, 1, 20, 20)
    blob[..., 5:15, 5:15] = 1.0
    assert torch.equal(median_filter(blob, 5)[..., 7:13, 7:13], torch.ones(1, 1, 6, 6))


def test_median_filter_volume_is_3d():
    vol = torch.zeros(7, 1, 9, 9)
    vol[3, 0, 2:7, 2:7] = 1.0  # a 5x5 plate one slice thick: 2D filter keeps its centre, 3D removes it
    assert median_filter(vol, 5)[3, 0, 4, 4] == 1.0
    assert median_filter(vol, 5, volume=True).abs().max() == 0.0


@pytest.mark.parametrize("connectivity", [1, 2])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_erosion_shrinks_square_by_iterations(connectivity, iterations):
    mask = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    mask[..., 4:14, 4:14] = True  # 10 x 10
    out = erode_mask(mask, iterations, connectivity=connectivity)
    side = 10 - 2 * iterations
    expected = torch.zeros_like(mask)
    expected[..., 4 + iterations : 4 + iterations + side, 4 + iterations : 4 + iterations + side] = True
    assert out.dtype == torch.bool
    assert torch.equal(out, expected)


def test_erosion_matches_scipy_on_random_masks_and_border():
    g = torch.Generator().manual_seed(1)
    mask = ndimage.binary_dilation(torch.rand(4, 1, 24, 24, generator=g).numpy() > 0.7, iterations=2)
    for conn in (1, 2):
        struct = ndimage.generate_binary_structure(2, conn)
        ours = erode_mask(torch.from_numpy(mask), 2, connectivity=conn).numpy()
        for i in range(4):
            ref = ndimage.binary_erosion(mask[i, 0], structure=struct, iterations=2, border_value=0)
            np.testing.assert_array_equal(ours[i, 0], ref)
    full = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    assert erode_mask(full, 1).sum() == 16  # the image border counts as background
    assert torch.equal(erode_mask(full, 0), full)


def test_apply_mask_zeroes_outside_only():
    maps = torch.arange(16.0).view(1, 1, 4, 4)
    maps[0, 0, 0, 0] = float("nan")
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1:3, 1:3] = True
    out = apply_mask(maps, mask)
    assert torch.equal(out[mask], maps[mask])
    assert (out[~mask] == 0).all()  # NaN outside becomes 0 too
    assert apply_mask(maps, None) is maps
    with pytest.raises(DataError, match=r"\(1, 1, 4, 5\).*\(1, 1, 4, 4\)"):
        apply_mask(maps, torch.ones(1, 1, 4, 5, dtype=torch.bool))


def test_remove_small_components_per_image():
    b = torch.zeros(2, 1, 12, 12, dtype=torch.bool)
    b[0, 0, 0:3, 0:3] = True  # 9 px
    b[0, 0, 8, 8] = True  # 1 px
    b[0, 0, 5:7, 10:12] = True  # 4 px
    b[1, 0, 2:4, 2:6] = True  # 8 px
    b[1, 0, 10:12, 0:3] = True  # 6 px
    out = remove_small_components(b, min_size=8)  # pDDPM: components <= 7 removed
    assert out[0].sum() == 9 and out[0, 0, 0:3, 0:3].all()
    assert out[1].sum() == 8 and out[1, 0, 2:4, 2:6].all()
    assert torch.equal(remove_small_components(b, 0), b)
    # diagonal neighbours join only with connectivity 2
    d = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    d[0, 0, [0, 1, 2], [0, 1, 2]] = True
    assert remove_small_components(d, 2, connectivity=1).sum() == 0
    assert remove_small_components(d, 2, connectivity=2).sum() == 3


def test_remove_small_components_volume():
    v = torch.zeros(3, 1, 5, 5, dtype=torch.bool)
    v[:, 0, 2, 2] = True  # a 3-voxel column: 1 px per slice, 3 voxels in 3D
    assert remove_small_components(v, 2).sum() == 0
    assert remove_small_components(v, 2, volume=True).sum() == 3


def test_postprocess_pipeline():
    maps = torch.zeros(1, 1, 24, 24)
    maps[..., 8:16, 8:16] = 1.0  # lesion
    maps[..., 2, 2] = 9.0  # hot pixel inside the brain, removed by the median filter
    maps[..., 0, :] = 3.0  # bright rim outside the eroded brain mask
    brain = torch.zeros(1, 1, 24, 24, dtype=torch.bool)
    brain[..., 1:23, 1:23] = True
    pp = PostProcess(median_size=3, erode_iterations=1)
    out = pp(maps, brain)
    region = pp.region(brain)
    assert region.sum() == 20 * 20
    assert (out[~region] == 0).all()
    assert out[..., 2, 2] == 0.0
    assert torch.equal(out[..., 9:15, 9:15], torch.ones(1, 1, 6, 6))
    seg = PostProcess(min_component_size=5).binarize(maps, 0.5)
    assert seg[..., 8:16, 8:16].all() and not seg[..., 2, 2]
    assert pp(maps).shape == maps.shape  # no brain mask: just the filter


def test_postprocess_median_cannot_leak_outside_region():
    maps = torch.ones(1, 1, 9, 9)
    brain = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    brain[0, 0, 4, 4] = False  # a one-pixel hole: its 3x3 neighbourhood is mostly inside
    out = PostProcess(median_size=3)(maps, brain)
    assert out[0, 0, 4, 4] == 0.0
    assert (out[brain] == 1.0).all()


@pytest.mark.parametrize(
    "kwargs", [{"median_size": 4}, {"median_size": 0}, {"erode_iterations": -1}, {"connectivity": 3}]
)
def test_postprocess_bad_config(kwargs):
    with pytest.raises(ConfigError):
        PostProcess(**kwargs)


def test_bad_inputs():
    with pytest.raises(DataError):
        median_filter(torch.zeros(4, 4))
    with pytest.raises(ConfigError, match="odd"):
        median_filter(torch.zeros(1, 1, 4, 4), size=2)
    with pytest.raises(ConfigError):
        erode_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), iterations=-2)
    with pytest.raises(DataError, match="brain_mask"):
        PostProcess()(torch.zeros(2, 1, 8, 8), torch.ones(1, 1, 8, 8, dtype=torch.bool))
