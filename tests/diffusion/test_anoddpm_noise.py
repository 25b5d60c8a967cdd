"""The official AnoDDPM / pDDPM simplex field (noise kind ``simplex_anoddpm``): raw octave sum of OpenSimplex 3D on a
2D slice, checked against a per-pixel reimplementation of the published algorithm and against the amplitude the
official generator has (issue 19: std about 0.44-0.64, per-image mean up to about +-0.36 on 96 px images)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from meddiff.diffusion import make_noise
from meddiff.diffusion.noise import _GRAD3, anoddpm_simplex_noise, simplex_noise


def reference_field(h: int, w: int, seed: int, octaves: int = 6, persistence: float = 0.8,
                    frequency: float = 64) -> list[list[float]]:
    """One slice, pixel by pixel, as the published algorithm reads: per octave, OpenSimplex 3D at
    ``(x / f, y / f, z)`` = sum over lattice vertices v of ``max(0, 2 - |d|^2)^4 <g_v, d> / 103`` (skew -1/6,
    unskew 1/3); octaves summed with amplitude ``persistence**k`` at ``f = frequency / 2**k``; no standardisation.
    The random draws (``z`` per octave, one gradient index per vertex of the bounding box) are made in the order
    the implementation makes them, so both see the same field."""
    gen = torch.Generator().manual_seed(seed)
    out = [[0.0] * w for _ in range(h)]
    amp, f = 1.0, float(frequency)
    for _ in range(octaves):
        z = float(torch.rand((1, 1), generator=gen, dtype=torch.float32))
        cells = {}
        for r, c in itertools.product(range(h), range(w)):
            x, y = c / f, r / f
            s = (x + y + z) * (-1 / 6)
            cells[r, c] = (math.floor(x + s), math.floor(y + s), math.floor(z + s))
        lo = [min(v[i] for v in cells.values()) - 1 for i in range(3)]
        size = [max(v[i] for v in cells.values()) + 3 - lo[i] for i in range(3)]
        table = torch.randint(0, 24, (1, size[0] * size[1] * size[2]), generator=gen)[0].tolist()
        for (r, c), base in cells.items():
            x, y, value = c / f, r / f, 0.0
            for off in itertools.product((-1, 0, 1, 2), repeat=3):
                v = [base[i] + off[i] for i in range(3)]
                u = sum(v) / 3
                d = (x - v[0] - u, y - v[1] - u, z - v[2] - u)
                attn = 2 - sum(t * t for t in d)
                if attn > 0:
                    g = _GRAD3[table[((v[0] - lo[0]) * size[1] + v[1] - lo[1]) * size[2] + v[2] - lo[2]]]
                    value += attn ** 4 * sum(gi * di for gi, di in zip(g, d, strict=True))
            out[r][c] += amp * value / 103
        amp *= persistence
        f /= 2
    return out


def test_matches_the_per_pixel_reimplementation():
    got = anoddpm_simplex_noise((1, 1, 12, 10), torch.Generator().manual_seed(7), dtype=torch.float32)[0, 0]
    ref = torch.tensor(reference_field(12, 10, seed=7), dtype=torch.float32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_raw_amplitude_of_the_official_settings():
    """Fixed seed, 32 fields of 96 px: the amplitude of the official generator, not unit variance."""
    n = anoddpm_simplex_noise((32, 1, 96, 96), torch.Generator().manual_seed(0), dtype=torch.float64).flatten(1)
    std, mean = n.std(dim=1), n.mean(dim=1)
    assert 0.40 < float(std.mean()) < 0.60  # the official 0.44-0.64, against 1.0 for the standardised field
    assert float(std.min()) > 0.25 and float(std.max()) < 0.75
    assert 0.2 < float(mean.abs().max()) < 0.6  # a per-image mean of the official's +-0.36 order (not 0)
    unit = simplex_noise((4, 1, 96, 96), torch.Generator().manual_seed(0)).flatten(1)
    torch.testing.assert_close(unit.std(dim=1, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)


def test_snr_at_pddpm_t499_is_about_3_not_1():
    """What "t = 499 with simplex noise" means on the cosine schedule (abar = 0.49): SNR abar / ((1 - abar) var)."""
    from meddiff.diffusion import NoiseSchedule

    abar = float(NoiseSchedule(1000, "cosine").alphas_cumprod[499])
    var = anoddpm_simplex_noise((16, 1, 96, 96), torch.Generator().manual_seed(1)).flatten(1).var(dim=1).mean()
    snr = abar / ((1 - abar) * float(var))
    assert 0.45 < abar < 0.52 and 2.0 < snr < 7.0


def test_make_noise_kinds_and_seeding():
    like = torch.zeros(2, 1, 16, 16)
    a = make_noise("simplex_anoddpm", like, torch.Generator().manual_seed(0))
    b = make_noise("simplex_anoddpm", like, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == like.shape and not torch.equal(a[0], a[1])
    with pytest.raises(Exception, match="unknown"):
        make_noise("simplex_anoddpm", like, scale=2)
