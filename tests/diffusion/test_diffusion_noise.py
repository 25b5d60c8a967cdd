"""Noise sources: Gaussian and multi-octave simplex noise."""

import time

import pytest
import torch

from meddiff.diffusion import gaussian_like, make_noise, simplex_noise
from meddiff.errors import ConfigError


def neighbour_corr(n: torch.Tensor) -> float:
    """Pearson correlation between horizontally adjacent pixels."""
    a, b = n[..., :, :-1].flatten().double(), n[..., :, 1:].flatten().double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_gaussian_like_matches_seeded_randn():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    n = gaussian_like(x, torch.Generator().manual_seed(4))
    assert n.shape == x.shape and n.dtype == torch.float64 and n.device == x.device
    assert torch.equal(
        n, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    )
    assert not torch.equal(n, gaussian_like(x, torch.Generator().manual_seed(5)))


def test_simplex_is_seeded_and_deterministic():
    a = simplex_noise((2, 3, 32, 32), torch.Generator().manual_seed(0))
    b = simplex_noise((2, 3, 32, 32), torch.Generator().manual_seed(0))
    c = simplex_noise((2, 3, 32, 32), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.3


def test_simplex_unit_variance_per_sample():
    n = simplex_noise((4, 2, 48, 48), torch.Generator().manual_seed(0))
    assert n.shape == (4, 2, 48, 48) and n.dtype == torch.float32 and torch.isfinite(n).all()
    flat = n.reshape(4, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(4), rtol=0, atol=1e-4)


def test_simplex_is_spatially_correlated():
    g = torch.Generator().manual_seed(0)
    simplex = simplex_noise((4, 1, 64, 64), g)
    gauss = torch.randn(4, 1, 64, 64, generator=g)
    assert abs(neighbour_corr(gauss)) < 0.05
    assert neighbour_corr(simplex) > 0.7
    # fewer octaves / longer wavelength -> smoother
    smooth = simplex_noise((4, 1, 64, 64), g, octaves=1)
    fine = simplex_noise((4, 1, 64, 64), g, frequency=8)
    assert neighbour_corr(smooth) > neighbour_corr(simplex) > neighbour_corr(fine) > 0.2


def test_simplex_slices_are_independent():
    """Every channel and batch item gets its own noise: slice-to-slice correlations average to ~0 (single pairs
    vary a lot at 64 px because a 64-px wavelength gives only a few independent blobs)."""
    n = simplex_noise((24, 2, 64, 64), torch.Generator().manual_seed(3))

    def r(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    across_channels = torch.tensor([r(n[i, 0], n[i, 1]) for i in range(24)])
    across_items = torch.tensor([r(n[i, 0], n[i + 1, 0]) for i in range(23)])
    for rs in (across_channels, across_items):
        assert abs(rs.mean().item()) < 0.1
        assert rs.abs().max().item() < 0.9


def test_simplex_shapes_dtype_device():
    n2 = simplex_noise((16, 20), torch.Generator().manual_seed(0), dtype=torch.float64)
    assert n2.shape == (16, 20) and n2.dtype == torch.float64
    assert n2.mean().abs().item() < 1e-9 and abs(n2.std(unbiased=False).item() - 1) < 1e-9
    n5 = simplex_noise((2, 1, 3, 16, 16), torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    assert n5.shape == (2, 1, 3, 16, 16) and n5.dtype == torch.bfloat16
    n = simplex_noise((1, 1, 8, 8))  # unseeded works
    assert torch.isfinite(n).all()


def test_simplex_is_vectorised_fast():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on an oversubscribed 2-CPU box OpenMP spinning dominates; one thread is fair
    try:
        t0 = time.perf_counter()
        simplex_noise((8, 1, 128, 128), torch.Generator().manual_seed(0))
        assert time.perf_counter() - t0 < 3.0
    finally:
        torch.set_num_threads(threads)


def test_make_noise_factory():
    like = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    g = make_noise("gaussian", like, torch.Generator().manual_seed(0))
    assert torch.equal(g, gaussian_like(like, torch.Generator().manual_seed(0)))
    s = make_noise("simplex", like, torch.Generator().manual_seed(0), octaves=2, frequency=8)
    assert s.dtype == torch.float64 and s.shape == like.shape
    assert torch.equal(
        s,
        simplex_noise(
            like.shape, torch.Generator().manual_seed(0), octaves=2, frequency=8, dtype=torch.float64
        ),
    )
    with pytest.raises(ConfigError) as e:
        make_noise("pink", like)
    assert "pink" in str(e.value) and "gaussian" in str(e.value) and "simplex" in str(e.value)
    with pytest.raises(ConfigError, match="octaves"):
        make_noise("gaussian", like, octaves=3)
    with pytest.raises(ConfigError, match="lacunarity"):
        make_noise("simplex", like, lacunarity=2.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"octaves": 0}, "octaves=0"),
        ({"persistence": 0}, "persistence=0"),
        ({"frequency": -1}, "frequency=-1"),
    ],
)
def test_simplex_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        simplex_noise((1, 1, 8, 8), **kw)
    with pytest.raises(ConfigError, match="shape"):
        simplex_noise((8,))
