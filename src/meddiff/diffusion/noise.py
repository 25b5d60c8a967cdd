"""Noise sources for the forward/reverse process: Gaussian and multi-octave simplex noise (pure torch).

Simplex noise (Perlin 2001; the "OpenSimplex-style" 2D variant used by AnoDDPM, Wyatt et al. 2022) is a smooth,
band-limited gradient noise. Diffusing with it instead of white Gaussian noise destroys larger structures (whole
lesions) at a given timestep, which is why AnoDDPM uses it for anomaly detection. Here each 2D slice gets its own
random gradient lattice (drawn from the generator), all pixels are evaluated at once (no per-pixel Python loops) and
``octaves`` layers are summed with amplitude ``persistence ** k`` and wavelength ``frequency / 2 ** k`` pixels, as
AnoDDPM's ``rand_2d_octaves`` does. The result is normalised to zero mean and unit variance per sample so it can
replace ``eps ~ N(0, I)`` in ``x_t = sqrt(ā_t) x0 + sqrt(1 - ā_t) eps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from meddiff.errors import ConfigError

__all__ = ["NOISE_KINDS", "gaussian_like", "simplex_noise", "make_noise"]

NOISE_KINDS = ("gaussian", "simplex")

# Skew/unskew factors of the 2D simplex grid: F2 = (sqrt(3) - 1) / 2, G2 = (3 - sqrt(3)) / 6.
_F2 = 0.5 * (math.sqrt(3.0) - 1.0)
_G2 = (3.0 - math.sqrt(3.0)) / 6.0


def _rand_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Device to draw on: the generator's (a CPU generator draws on CPU, the result is moved afterwards)."""
    if generator is None:
        return device
    return generator.device


def gaussian_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise with the shape, dtype and device of ``x``.

    Drawn with ``torch.randn(x.shape, generator=generator, dtype=x.dtype)`` on the generator's device and then
    moved to ``x.device``: the same draw diffusers' ``randn_tensor`` makes, so seeded runs are comparable.
    """
    dev = _rand_device(generator, x.device)
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def _simplex_octave(
    rows: Tensor, cols: Tensor, wavelength: float, n_slices: int, generator, rand_dev, compute_dtype
) -> Tensor:
    """One octave of 2D simplex noise for ``n_slices`` independent slices, shape ``[n_slices, H*W]``.

    For a point p = (x, y) (pixel coordinates / wavelength):
    skew ``s = (x + y) F2``, cell ``(i, j) = floor(x + s, y + s)``; the three simplex corners are ``(i, j)``,
    ``(i, j) + (1, 0) or (0, 1)`` (whichever triangle p is in) and ``(i + 1, j + 1)``; the offset from a corner
    ``c`` (unskewed with ``G2``) is ``d_c`` and its contribution ``max(0, 0.5 - |d_c|^2)^4 <g_c, d_c>`` with a
    random unit gradient ``g_c`` per lattice vertex. The sum is scaled by 70 (the classic normalisation).
    """
    x = cols / wavelength
    y = rows / wavelength
    s = (x + y) * _F2
    i = torch.floor(x + s)
    j = torch.floor(y + s)
    t = (i + j) * _G2
    x0 = x - (i - t)
    y0 = y - (j - t)
    lower = (x0 > y0).to(compute_dtype)  # lower triangle: middle corner (1, 0), upper triangle: (0, 1)
    i1, j1 = lower, 1.0 - lower
    x1, y1 = x0 - i1 + _G2, y0 - j1 + _G2
    x2, y2 = x0 - 1.0 + 2.0 * _G2, y0 - 1.0 + 2.0 * _G2

    ii = i.long()
    jj = j.long()
    gh = int(ii.max()) + 2
    gw = int(jj.max()) + 2
    device = rows.device
    angles = torch.rand((n_slices, gh * gw), generator=generator, device=rand_dev, dtype=compute_dtype)
    angles = angles.to(device) * (2.0 * math.pi)
    gx, gy = torch.cos(angles), torch.sin(angles)

    out = torch.zeros((n_slices, rows.numel()), device=device, dtype=compute_dtype)
    corners = ((ii, jj, x0, y0), (ii + i1.long(), jj + j1.long(), x1, y1), (ii + 1, jj + 1, x2, y2))
    for ci, cj, dx, dy in corners:
        lin = (ci * gw + cj).reshape(-1)
        dxf, dyf = dx.reshape(1, -1), dy.reshape(1, -1)
        w4 = (0.5 - dxf * dxf - dyf * dyf).clamp(min=0.0) ** 4  # the pixel geometry is shared by all slices
        out += torch.addcmul(
            torch.index_select(gx, 1, lin) * (w4 * dxf), torch.index_select(gy, 1, lin), w4 * dyf
        )
    return 70.0 * out


def simplex_noise(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Multi-octave 2D simplex noise of ``shape`` ``[..., H, W]``, zero mean and unit variance per sample.

    Every 2D slice (each batch item, channel and, for ``[B, C, D, H, W]``, depth index) gets independent noise::

        n(p) = sum_{k=0}^{octaves-1} persistence**k * simplex_k(p / (frequency / 2**k))

    then each sample (index along dim 0; the whole tensor for a 2D ``shape``) is standardised to mean 0, std 1.

    Args:
        shape: ``[..., H, W]`` with at least two dimensions.
        generator: seeds the random gradient lattices (same seed and shape give the same noise).
        octaves: number of layers (AnoDDPM: 6).
        persistence: amplitude ratio between consecutive octaves (AnoDDPM: 0.8).
        frequency: wavelength of the coarsest octave in pixels, halved per octave (AnoDDPM: 64).
        device, dtype: of the result (default: CPU / ``torch.get_default_dtype()``).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigError(f"simplex_noise shape={shape} must be [..., H, W] with positive sizes.")
    if int(octaves) != octaves or octaves < 1:
        raise ConfigError(f"octaves={octaves} must be an integer >= 1 (AnoDDPM uses 6).")
    if not persistence > 0:
        raise ConfigError(f"persistence={persistence} must be > 0 (AnoDDPM uses 0.8).")
    if not frequency > 0:
        raise ConfigError(
            f"frequency={frequency} must be > 0: the coarsest wavelength in pixels (AnoDDPM: 64)."
        )
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.get_default_dtype()
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rand_dev = _rand_device(generator, device)

    h, w = shape[-2:]
    n_slices = math.prod(shape[:-2]) if len(shape) > 2 else 1
    rows = torch.arange(h, device=device, dtype=compute_dtype).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=device, dtype=compute_dtype).view(1, w).expand(h, w)

    total = torch.zeros((n_slices, h * w), device=device, dtype=compute_dtype)
    amplitude = 1.0
    wavelength = float(frequency)
    for _ in range(int(octaves)):
        total += amplitude * _simplex_octave(
            rows, cols, wavelength, n_slices, generator, rand_dev, compute_dtype
        )
        amplitude *= persistence
        wavelength /= 2.0

    flat = total.reshape(shape[0], -1) if len(shape) > 2 else total.reshape(1, -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True, unbiased=False).clamp(min=1e-12)
    flat = (flat - mean) / std
    return flat.reshape(shape).to(dtype)


def make_noise(kind: str, like: Tensor, generator: torch.Generator | None = None, **kw) -> Tensor:
    """Noise with the shape/dtype/device of ``like``: ``kind="gaussian"`` or ``"simplex"`` (kwargs of
    :func:`simplex_noise`: ``octaves``, ``persistence``, ``frequency``).

    Raises:
        ConfigError: unknown ``kind`` or keyword arguments the kind does not take.
    """
    if kind == "gaussian":
        if kw:
            raise ConfigError(
                f"gaussian noise takes no options, got {sorted(kw)}; drop them or use kind='simplex'."
            )
        return gaussian_like(like, generator=generator)
    if kind == "simplex":
        allowed = {"octaves", "persistence", "frequency"}
        extra = set(kw) - allowed
        if extra:
            raise ConfigError(f"simplex noise options {sorted(extra)} are unknown; valid: {sorted(allowed)}.")
        return simplex_noise(like.shape, generator=generator, device=like.device, dtype=like.dtype, **kw)
    raise ConfigError(f"noise kind={kind!r} is not supported; choose one of {list(NOISE_KINDS)}.")
