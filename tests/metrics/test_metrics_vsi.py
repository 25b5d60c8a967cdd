"""VSI (Zhang, Shen & Li 2014): properties, hand-computed pieces, and agreement with piq where it imports.

Hand computations below follow the paper's formulas (and its MATLAB code for SDSP's log-Gabor filter, the Scharr
operator and the Lab conversion); each test says how its numbers were obtained.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydicom import dcmread
from pydicom.data import get_testdata_file
from scipy.signal import convolve2d
from scipy.stats import spearmanr
from torchmetrics.functional.image import structural_similarity_index_measure

from meddiff.errors import ConfigError, DataError
from meddiff.metrics import image_scores
from meddiff.metrics.vsi import (
    _downsample,
    downsample_factor,
    gray_to_lightness,
    log_gabor,
    piq_available,
    scharr_gradient,
    sdsp,
    srgb_to_lab,
    vsi,
    vsi_from_maps,
)


def _real(name: str) -> torch.Tensor:
    """A real scan shipped with pydicom (MR_small 64 px, CT_small 128 px) as [1, 1, H, W] in [-1, 1]."""
    a = dcmread(get_testdata_file(name)).pixel_array.astype(np.float32)
    return torch.from_numpy((a - a.min()) / (a.max() - a.min()) * 2 - 1)[None, None]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    shape = x.shape
    x = x.reshape(-1, 1, *shape[-2:])
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1)).reshape(shape)


def _noise(x: torch.Tensor, amount: float) -> torch.Tensor:
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return (x + amount * n).clamp(-1, 1)


BLURS = (0.5, 1.0, 1.5, 2.0, 3.0)
NOISES = (0.02, 0.05, 0.1, 0.2, 0.3)


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm"])
def test_identity_and_monotone_in_graded_blur_and_noise(name):
    x = _real(name)
    assert vsi(x, x.clone()).item() == pytest.approx(1.0, abs=1e-6)
    blur = [vsi(x, _blur(x, s)).item() for s in BLURS]
    noise = [vsi(x, _noise(x, a)).item() for a in NOISES]
    assert all(a > b for a, b in zip(blur, blur[1:])), blur
    assert all(a > b for a, b in zip(noise, noise[1:])), noise
    assert blur[0] < 1 and noise[0] < 1
    # symmetric in its arguments
    y = _blur(x, 1.0)
    assert vsi(y, x).item() == pytest.approx(vsi(x, y).item(), abs=1e-6)


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm"])
def test_ranks_graded_distortions_as_ssim_does(name):
    x = _real(name)
    ys = [_blur(x, s) for s in BLURS] + [_noise(x, a) for a in NOISES] + [x * c for c in (0.9, 0.7, 0.5)]
    v = [vsi(x, y).item() for y in ys]
    s = [structural_similarity_index_measure(y, x, data_range=2.0).item() for y in ys]
    assert spearmanr(v, s).statistic > 0.9  # measured 0.96 (MR) and 0.95 (CT) over these 13 distortions


def test_scharr_gradient_by_hand():
    # one bright pixel (16) in the centre of a 3 x 3 zero image. conv2 'same' with dx = [3 0 -3; 10 0 -10; 3 0 -3]/16
    # and dy = dx': at a corner the pixel meets kernel weight 3/16 in both -> |(3, 3)| = sqrt(18); at an edge
    # midpoint it meets 10/16 in one kernel and 0 in the other -> 10; at the centre both kernels' centre is 0.
    img = torch.zeros(1, 3, 3)
    img[0, 1, 1] = 16.0
    expect = torch.tensor([[math.sqrt(18), 10, math.sqrt(18)], [10, 0, 10], [math.sqrt(18), 10, math.sqrt(18)]])
    assert torch.allclose(scharr_gradient(img)[0], expect, atol=1e-5)


def test_log_gabor_by_hand():
    lg = log_gabor(256, 256)
    # DC is removed; frequency (0, 5) is u = 5/256 cycles/px: exp(-(ln((5/256)/0.021))^2 / (2 * 1.34^2))
    #   ln(0.0195313 / 0.021) = -0.072507; squared 0.0052573; / 3.5912 = 0.0014640; exp(-.) = 0.998537
    assert lg[0, 0] == 0
    assert lg[0, 5].item() == pytest.approx(0.998537, abs=1e-6)
    assert lg[5, 0].item() == pytest.approx(0.998537, abs=1e-6)
    # (0, 64): u = 0.25 -> ln(0.25/0.021) = 2.476938; squared 6.135224; / 3.5912 = 1.708405; exp(-.) = 0.181154
    assert lg[0, 64].item() == pytest.approx(0.181154, abs=1e-6)
    # |u| > 0.5 (the corner frequency (0.5, 0.5)) is cut
    assert lg[128, 128] == 0


def test_lightness_by_hand():
    # sRGB gray 255 -> Y = 1 -> L* = 116 * 1 - 16 = 100; gray 0 -> 0;
    # gray 128: ((128/255 + 0.055)/1.055)^2.4 = 0.215861, L* = 116 * 0.215861^(1/3) - 16 = 53.585
    v = torch.tensor([0.0, 128.0, 255.0]).view(1, 1, 1, 3)
    assert torch.allclose(gray_to_lightness(v).flatten(), torch.tensor([0.0, 53.585, 100.0]), atol=2e-3)
    # the RGB path gives the same L* for grays (a, b are not 0: SDSP.m uses a D50 white with sRGB primaries)
    lab = srgb_to_lab(v.expand(1, 3, 1, 3))
    assert torch.allclose(lab[:, 0].flatten(), gray_to_lightness(v).flatten(), atol=1e-3)


def test_pooling_by_hand():
    # two pixels. Saliency equal in both images (S_VS = 1); gradients 10 vs 20 at pixel 0, 0 vs 0 at pixel 1:
    # S_G = (2*10*20 + 386) / (100 + 400 + 386) = 786 / 886 at pixel 0 and 1 at pixel 1; weights VS_m = (1, 0.5):
    # VSI = (1 * (786/886)^0.4 + 0.5 * 1) / 1.5
    vs = torch.tensor([[[1.0, 0.5]]])
    g1, g2 = torch.tensor([[[10.0, 0.0]]]), torch.tensor([[[20.0, 0.0]]])
    expect = (1 * (786 / 886) ** 0.4 + 0.5) / 1.5
    assert vsi_from_maps(vs, vs, g1, g2).item() == pytest.approx(expect, rel=1e-6)
    # chroma: pixel 0 of image 1 is pure red (M = 0.30*255 = 76.5, N = 0.34*255 = 86.7), image 2 is black there:
    # S_C = 130/(76.5^2 + 130) * 130/(86.7^2 + 130) = 0.0217310 * 0.0170004; S_C^0.02 multiplies pixel 0
    m1, m2 = torch.tensor([[[76.5, 0.0]]]), torch.zeros(1, 1, 2)
    n1, n2 = torch.tensor([[[86.7, 0.0]]]), torch.zeros(1, 1, 2)
    sc = (130 / (76.5**2 + 130)) * (130 / (86.7**2 + 130))
    expect_c = (1 * (786 / 886) ** 0.4 * sc**0.02 + 0.5) / 1.5
    assert vsi_from_maps(vs, vs, g1, g2, m1, m2, n1, n2).item() == pytest.approx(expect_c, rel=1e-6)
    # different saliency: S_VS = (2*0.2*0.8 + 1.27)/(0.04 + 0.64 + 1.27) = 1.59/1.95 at pixel 0 (weight 0.8)
    v1, v2 = torch.tensor([[[0.2, 0.5]]]), torch.tensor([[[0.8, 0.5]]])
    expect_v = (0.8 * (1.59 / 1.95) * (786 / 886) ** 0.4 + 0.5) / 1.3
    assert vsi_from_maps(v1, v2, g1, g2).item() == pytest.approx(expect_v, rel=1e-6)
    # a mask drops pixel 1
    mask = torch.tensor([[[True, False]]])
    assert vsi_from_maps(vs, vs, g1, g2, mask=mask).item() == pytest.approx((786 / 886) ** 0.4, rel=1e-6)


def test_assembly_matches_the_formulas_on_a_real_scan():
    # the whole gray pipeline against the paper's formulas written out in numpy: the saliency maps from sdsp (tested
    # above piece by piece), the Scharr gradient as MATLAB's conv2(..., 'same') via scipy, L = 0.96 * v for gray.
    x = _real("MR_small.dcm")
    y = _blur(x, 1.0)
    a, b = ((t[0, 0].double().numpy() + 1) * 127.5 for t in (x, y))
    vs1, vs2 = (sdsp(torch.from_numpy(t)[None, None].float())[0].double().numpy() for t in (a, b))
    dx = np.array([[3, 0, -3], [10, 0, -10], [3, 0, -3]]) / 16

    def grad(img):
        return np.hypot(convolve2d(0.96 * img, dx, mode="same"), convolve2d(0.96 * img, dx.T, mode="same"))

    g1, g2 = grad(a), grad(b)
    s = (2 * vs1 * vs2 + 1.27) / (vs1**2 + vs2**2 + 1.27) * ((2 * g1 * g2 + 386) / (g1**2 + g2**2 + 386)) ** 0.4
    w = np.maximum(vs1, vs2)
    assert vsi(x, y).item() == pytest.approx((s * w).sum() / w.sum(), abs=1e-5)


def test_downsampling_as_the_paper():
    assert downsample_factor(64, 64) == 1 and downsample_factor(383, 500) == 1
    assert downsample_factor(384, 512) == 2 and downsample_factor(640, 640) == 3  # MATLAB round(2.5) = 3
    # F = 2: MATLAB conv2([1 2 3 4], [.5 .5], 'same') = [1.5 2.5 3.5 2], sampled 1:2:end -> [1.5 3.5]
    row = torch.tensor([1.0, 2, 3, 4]).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    assert _downsample(row, 2)[0, 0, 0].tolist() == [0.75 * 2, 1.75 * 2]
    # F = 3 against scipy (odd kernel: 'same' is unambiguous)
    img = torch.rand(1, 1, 10, 11, generator=torch.Generator().manual_seed(0))
    ref = convolve2d(img[0, 0].numpy(), np.ones((3, 3)) / 9, mode="same")[::3, ::3]
    assert np.allclose(_downsample(img, 3)[0, 0].numpy(), ref, atol=1e-6)


def test_rgb_and_per_channel_modes():
    g = torch.Generator().manual_seed(0)
    x = _blur(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, 1.0)
    assert torch.allclose(vsi(x, x.clone()), torch.ones(2), atol=1e-6)
    swapped = x[:, [1, 0, 2]]
    assert (vsi(x, swapped) < 0.999).all()
    # per-channel gray mode = mean of the single-channel VSIs
    per = torch.stack([vsi(x[:, c : c + 1], swapped[:, c : c + 1]) for c in range(3)], 1).mean(1)
    assert torch.allclose(vsi(x, swapped, rgb=False), per, atol=1e-6)
    with pytest.raises(DataError, match="rgb=True"):
        vsi(x[:, :2], x[:, :2], rgb=True)


def test_image_scores_has_vsi():
    x = _real("MR_small.dcm").repeat(2, 1, 1, 1)
    y = torch.cat([x[:1], _blur(x[1:], 1.5)])
    r = image_scores(x, y)
    assert r["vsi"].shape == (2,) and r["vsi"][0] == pytest.approx(1.0, abs=1e-6) and r["vsi"][1] < 0.99
    assert r["vsi"][1].item() == pytest.approx(vsi(x[1:], y[1:]).item(), abs=1e-6)
    mask = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    mask[0, :, 20:40, 20:40] = True
    rm = image_scores(x, y, mask=mask)
    assert rm["vsi"][0] == pytest.approx(1.0, abs=1e-6) and torch.isnan(rm["vsi"][1])


def test_bad_inputs():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(DataError, match="same shape|one shape"):
        vsi(x, torch.zeros(1, 1, 8, 7))
    with pytest.raises(ConfigError, match="value_range"):
        vsi(x, x, value_range=(1.0, 1.0))
    with pytest.raises(ConfigError, match="backend"):
        vsi(x, x, backend="matlab")
    with pytest.raises(DataError, match="mask"):
        vsi(x, x, mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))


@pytest.mark.skipif(not piq_available(), reason="piq does not import here (it needs torchvision)")
def test_equals_piq_on_rgb_at_256_px():
    # at 256 px no resizing happens inside SDSP, and ours equals piq's to ~1e-5 (checked with piq 0.8.0)
    import skimage.data

    a = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(a, size=(256, 256), mode="bilinear", antialias=True).clamp(0, 1)
    y = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    ours = vsi(x, y, value_range=(0, 1), backend="torch").item()
    assert ours == pytest.approx(vsi(x, y, value_range=(0, 1), backend="piq").item(), abs=1e-4)


def test_rgb_reference_values():
    # regression values at 256 px, equal (to 1e-5) to piq 0.8.0's VSI on the same inputs (piq loaded without
    # torchvision in a scratch script): blur 0.95074, channel swap 0.97472
    import skimage.data

    a = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(a, size=(256, 256), mode="bilinear", antialias=True).clamp(0, 1)
    blur = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    assert vsi(x, blur, value_range=(0, 1), backend="torch").item() == pytest.approx(0.95074, abs=5e-5)
    assert vsi(x, x[:, [1, 0, 2]], value_range=(0, 1), backend="torch").item() == pytest.approx(0.97472, abs=5e-5)
