"""Noise sources for the forward/reverse process: Gaussian and multi-octave simplex noise (pure torch).

Simplex noise (Perlin 2001; the "OpenSimplex-style" 2D variant used by AnoDDPM, Wyatt et al. 2022) is a smooth,
band-limited gradient noise. Diffusing with it instead of white Gaussian noise destroys larger structures (whole
lesions) at a given timestep, which is why AnoDDPM uses it for anomaly detection. Here each 2D slice gets its own
random gradient lattice (drawn from the generator), all pixels are evaluated at once (no per-pixel Python loops) and
``octaves`` layers are summed with amplitude ``persistence ** k`` and wavelength ``frequency / 2 ** k`` pixels, as
AnoDDPM's ``rand_2d_octaves`` does. The result is normalised to zero mean and unit variance per sample so it can
replace ``eps ~ N(0, I)`` in ``x_t = sqrt(ā_t) x0 + sqrt(1 - ā_t) eps``.

Two simplex kinds, named for what they are:

- ``"simplex"``: the field above, *standardised* (mean 0, std 1 per sample): meddiff's choice, SNR comparable to
  Gaussian noise at the same timestep.
- ``"simplex_anoddpm"``: the official AnoDDPM / pDDPM generator's *amplitude*: OpenSimplex 3D noise sampled on a 2D
  slice, ``octaves`` layers summed with amplitude ``persistence ** k`` and wavelength ``frequency / 2 ** k`` and left
  *raw* (not standardised). With the official settings (6 octaves, persistence 0.8, frequency 64) a 96 px field has
  a std of about 0.45-0.65 and a per-image mean of up to about +-0.35, so at a timestep t it corrupts much less than
  unit-variance noise: at pDDPM's t = 499 on the cosine schedule (abar = 0.49) the SNR abar / ((1 - abar) var) is
  about 2.4-5 instead of 1 (unit-variance noise reaches that SNR at t ~ 260-360). Gradients come from OpenSimplex's 24
  3D directions, chosen per lattice vertex from the generator (the official code hashes a random permutation; the
  statistics are the same), and each image gets its own field (the official code repeats one field over a batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from meddiff.errors import ConfigError

__all__ = ["NOISE_KINDS", "anoddpm_simplex_noise", "gaussian_like", "make_noise", "simplex_noise"]

NOISE_KINDS = ("gaussian", "simplex", "simplex_anoddpm")

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


# OpenSimplex 3D (Spencer 2014): skew -1/6, unskew 1/3, kernel radius^2 2, normalisation 103, 24 gradients
_STRETCH3, _SQUISH3, _NORM3 = -1.0 / 6.0, 1.0 / 3.0, 103.0
_GRAD3 = ((-11, 4, 4), (-4, 11, 4), (-4, 4, 11), (11, 4, 4), (4, 11, 4), (4, 4, 11), (-11, -4, 4), (-4, -11, 4),
          (-4, -4, 11), (11, -4, 4), (4, -11, 4), (4, -4, 11), (-11, 4, -4), (-4, 11, -4), (-4, 4, -11), (11, 4, -4),
          (4, 11, -4), (4, 4, -11), (-11, -4, -4), (-4, -11, -4), (-4, -4, -11), (11, -4, -4), (4, -11, -4),
          (4, -4, -11))
_OFFSETS3 = tuple((i, j, k) for i in (-1, 0, 1, 2) for j in (-1, 0, 1, 2) for k in (-1, 0, 1, 2))


def _opensimplex3_slice(rows: Tensor, cols: Tensor, wavelength: float, n_slices: int, generator, rand_dev,
                        compute_dtype) -> Tensor:
    """OpenSimplex 3D noise on the plane ``z = z_0`` (``z_0`` drawn per slice), points ``(col, row) / wavelength``:
    ``[n_slices, H*W]`` in about ``[-1, 1]``.

    Every lattice vertex ``v`` (skewed integer coordinates) within reach adds ``max(0, 2 - |d|^2)^4 <g_v, d>`` with
    ``d`` the offset from ``v`` (unskewed by ``(v_x + v_y + v_z) / 3``) and ``g_v`` one of the 24 gradients; the sum is
    divided by 103. The vertices in reach of a point lie within ``{-1, .., 2}^3`` of its skewed cell.
    """
    device = rows.device
    x = (cols.reshape(1, -1) / wavelength)
    y = (rows.reshape(1, -1) / wavelength)
    z = torch.rand((n_slices, 1), generator=generator, device=rand_dev, dtype=compute_dtype).to(device)
    s = (x + y + z) * _STRETCH3
    bx, by, bz = torch.floor(x + s), torch.floor(y + s), torch.floor(z + s)  # [n, P] skewed cell origin
    lo = [int(b.min()) - 1 for b in (bx, by, bz)]
    size = [int(b.max()) + 3 - m for b, m in zip((bx, by, bz), lo, strict=True)]
    table = torch.randint(0, len(_GRAD3), (n_slices, size[0] * size[1] * size[2]), generator=generator,
                          device=rand_dev).to(device)
    grads = torch.tensor(_GRAD3, device=device, dtype=compute_dtype)
    out = torch.zeros(n_slices, x.shape[1], device=device, dtype=compute_dtype)
    for ox, oy, oz in _OFFSETS3:
        vx, vy, vz = bx + ox, by + oy, bz + oz
        u = (vx + vy + vz) * _SQUISH3
        dx, dy, dz = x - (vx + u), y - (vy + u), z - (vz + u)
        attn = (2.0 - dx * dx - dy * dy - dz * dz).clamp(min=0.0)
        lin = ((vx.long() - lo[0]) * size[1] + (vy.long() - lo[1])) * size[2] + (vz.long() - lo[2])
        g = grads[torch.gather(table, 1, lin)]  # [n, P, 3]
        out += attn.pow(4) * (g[..., 0] * dx + g[..., 1] * dy + g[..., 2] * dz)
    return out / _NORM3


def anoddpm_simplex_noise(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The official AnoDDPM / pDDPM octave simplex field of ``shape`` ``[..., H, W]``, raw (not standardised).

    ``n(p) = sum_k persistence**k * opensimplex3(p / (frequency / 2**k), z_k)`` for every 2D slice (see the module
    docstring for its amplitude and what it means for the SNR). Arguments as :func:`simplex_noise`.
    """
    shape = tuple(int(v) for v in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigError(f"anoddpm_simplex_noise shape={shape} must be [..., H, W] with positive sizes.")
    if int(octaves) != octaves or octaves < 1 or not persistence > 0 or not frequency > 0:
        raise ConfigError(f"octaves={octaves}, persistence={persistence}, frequency={frequency}: need an integer "
                          ">= 1 and two positive numbers (AnoDDPM / pDDPM: 6, 0.8, 64).")
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.get_default_dtype()
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    h, w = shape[-2:]
    n_slices = math.prod(shape[:-2]) if len(shape) > 2 else 1
    rows = torch.arange(h, device=device, dtype=compute_dtype).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=device, dtype=compute_dtype).view(1, w).expand(h, w)
    total = torch.zeros((n_slices, h * w), device=device, dtype=compute_dtype)
    amplitude, wavelength = 1.0, float(frequency)
    for _ in range(int(octaves)):
        total += amplitude * _opensimplex3_slice(rows, cols, wavelength, n_slices, generator,
                                                 _rand_device(generator, device), compute_dtype)
        amplitude *= persistence
        wavelength /= 2.0
    return total.reshape(shape).to(dtype)


def make_noise(kind: str, like: Tensor, generator: torch.Generator | None = None, **kw) -> Tensor:
    """Noise with the shape/dtype/device of ``like``: ``kind="gaussian"``, ``"simplex"`` (standardised) or
    ``"simplex_anoddpm"`` (the official raw amplitude); simplex kinds take ``octaves``, ``persistence``,
    ``frequency``.

    Raises:
        ConfigError: unknown ``kind`` or keyword arguments the kind does not take.
    """
    if kind == "gaussian":
        if kw:
            raise ConfigError(
                f"gaussian noise takes no options, got {sorted(kw)}; drop them or use kind='simplex'."
            )
        return gaussian_like(like, generator=generator)
    if kind in ("simplex", "simplex_anoddpm"):
        allowed = {"octaves", "persistence", "frequency"}
        extra = set(kw) - allowed
        if extra:
            raise ConfigError(f"simplex noise options {sorted(extra)} are unknown; valid: {sorted(allowed)}.")
        fn = simplex_noise if kind == "simplex" else anoddpm_simplex_noise
        return fn(like.shape, generator=generator, device=like.device, dtype=like.dtype, **kw)
    raise ConfigError(f"noise kind={kind!r} is not supported; choose one of {list(NOISE_KINDS)}.")
