"""VSI, the visual saliency-induced index (Zhang, Shen & Li, IEEE TIP 23(10), 2014), in torch.

``vsi(gt, pred)`` uses ``piq.vsi`` when ``piq`` imports (``backend="auto"``) and this module's own implementation
otherwise (piq imports torchvision, whose wheels need a CUDA build of torch on some machines). Ours follows the
paper and its reference MATLAB code (VSI.m + SDSP.m):

- Images are mapped to ``[0, 255]``. Colour images ``[B, 3, H, W]`` are RGB; grayscale ``[B, 1, H, W]`` follows the
  paper's remark for gray images: the chrominance similarity is 1 and SDSP has no colour prior (the "warm colours"
  prior is 1); only the luminance channel is used. (Repeating a gray image to RGB, as piq does, would give it a
  spurious colour prior: SDSP's Lab conversion uses a D50 white with sRGB/D65 primaries, so grays are not neutral.)
- Visual saliency: SDSP (Zhang, Gong & Zhang, ICIP 2013) on the image resized to 256 x 256 (bilinear): frequency
  prior = magnitude of the log-Gabor band-pass (omega0 = 0.021, sigmaF = 1.34) of the CIE L*a*b* channels;
  location prior ``exp(-|p - centre|^2 / sigmaD^2)`` (sigmaD = 145); colour prior
  ``1 - exp(-(a_n^2 + b_n^2) / sigmaC^2)`` (a, b min-max normalised, sigmaC = 0.001); the product is resized back
  and min-max normalised to ``[0, 1]``.
- Downsampling as the paper: ``F = max(1, round(min(H, W) / 256))``; L, M, N and both saliency maps are averaged
  over ``F x F`` (MATLAB ``conv2(..., 'same')``, zero padding) and sampled every ``F`` pixels (F = 1 below 384 px).
- Opponent colour space ``L = 0.06R + 0.63G + 0.27B``, ``M = 0.30R + 0.04G - 0.35B``, ``N = 0.34R - 0.60G + 0.17B``;
  gradient magnitude of L with the Scharr operator (``[3 0 -3; 10 0 -10; 3 0 -3] / 16``, zero padding).
- ``S_VS = (2 VS1 VS2 + C1) / (VS1^2 + VS2^2 + C1)``, ``S_G`` likewise with C2 on the gradient magnitudes,
  ``S_C = S_M * S_N`` with C3; ``S = S_VS * S_G^alpha * real(S_C^beta)`` (a negative ``S_C``, opposite chroma,
  gives ``|S_C|^beta cos(pi beta)`` as in MATLAB); ``VSI = sum(S * VS_m) / sum(VS_m)``, ``VS_m = max(VS1, VS2)``.
  Constants: C1 = 1.27, C2 = 386, C3 = 130, alpha = 0.40, beta = 0.02.

With a ``mask`` the pooling sums run over the mask pixels only (the maps are computed on the whole image).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from meddiff.errors import ConfigError, DataError

C1, C2, C3 = 1.27, 386.0, 130.0
ALPHA, BETA = 0.40, 0.02
OMEGA0, SIGMA_F, SIGMA_D, SIGMA_C = 0.021, 1.34, 145.0, 0.001
SDSP_SIZE = 256
BACKENDS = ("auto", "torch", "piq")

_RGB_TO_LMN = ((0.06, 0.63, 0.27), (0.30, 0.04, -0.35), (0.34, -0.60, 0.17))
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_WHITE_D50 = (0.9642, 1.0, 0.8251)  # SDSP.m's reference white
_SCHARR_X = ((3.0, 0.0, -3.0), (10.0, 0.0, -10.0), (3.0, 0.0, -3.0))


@functools.lru_cache(maxsize=1)
def piq_available() -> bool:
    """True when ``import piq`` works (it imports torchvision); checked once per process."""
    try:
        import piq  # noqa: F401
    except Exception:  # ImportError, or torchvision failing to load its ops
        return False
    return True


def vsi_backend(backend: str = "auto") -> str:
    """The implementation ``vsi(..., backend=backend)`` uses: ``"piq"`` or ``"torch"``."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown VSI backend {backend!r}; choose one of {list(BACKENDS)}.")
    if backend == "piq" and not piq_available():
        raise ConfigError("VSI backend 'piq' requested but `import piq` fails; use backend='torch' or 'auto'.")
    if backend == "auto":
        return "piq" if piq_available() else "torch"
    return backend


# ------------------------------------------------------------------------------------------- building blocks


def srgb_to_lab(x255: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* as SDSP.m computes it (sRGB primaries, D50 reference white): ``[B, 3, H, W]`` in [0, 255] -> Lab."""
    v = x255 / 255.0
    lin = torch.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055).clamp_min(0).pow(2.4))
    m = torch.tensor(_RGB_TO_XYZ, dtype=v.dtype, device=v.device)
    xyz = torch.einsum("kc,bchw->bkhw", m, lin)
    white = torch.tensor(_WHITE_D50, dtype=v.dtype, device=v.device).view(1, 3, 1, 1)
    f = _lab_f(xyz / white)
    L = 116.0 * f[:, 1] - 16.0
    a = 500.0 * (f[:, 0] - f[:, 1])
    b = 200.0 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], dim=1)


def gray_to_lightness(x255: torch.Tensor) -> torch.Tensor:
    """CIE L* of gray pixels (R = G = B), as ``srgb_to_lab``: ``[B, 1, H, W]`` in [0, 255] -> ``[B, 1, H, W]``."""
    v = x255 / 255.0
    lin = torch.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055).clamp_min(0).pow(2.4))
    y = lin * sum(_RGB_TO_XYZ[1]) / _WHITE_D50[1]
    return 116.0 * _lab_f(y) - 16.0


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    eps, kappa = 0.008856, 903.3
    return torch.where(t > eps, t.clamp_min(eps).pow(1.0 / 3.0), (kappa * t + 16.0) / 116.0)


def log_gabor(rows: int, cols: int, omega0: float = OMEGA0, sigma_f: float = SIGMA_F) -> torch.Tensor:
    """SDSP's log-Gabor filter in the (unshifted) frequency domain, ``[rows, cols]`` float64.

    ``LG(u) = exp(-(ln(|u| / omega0))^2 / (2 sigma_f^2))`` with ``u`` in cycles/pixel, zero at DC and beyond
    ``|u| > 0.5``.
    """
    u1 = (torch.arange(cols, dtype=torch.float64) - cols // 2) / (cols - cols % 2)
    u2 = (torch.arange(rows, dtype=torch.float64) - rows // 2) / (rows - rows % 2)
    uu2, uu1 = torch.meshgrid(u2, u1, indexing="ij")
    keep = (uu1**2 + uu2**2) <= 0.25
    uu1, uu2 = uu1 * keep, uu2 * keep
    uu1 = torch.fft.ifftshift(uu1)
    uu2 = torch.fft.ifftshift(uu2)
    radius = torch.sqrt(uu1**2 + uu2**2)
    radius[0, 0] = 1.0
    lg = torch.exp(-(torch.log(radius / omega0) ** 2) / (2.0 * sigma_f**2))
    lg[radius == 0] = 0.0  # frequencies cut by the 0.5 disc (log(0) -> exp(-inf) = 0 in MATLAB too)
    lg[0, 0] = 0.0
    return lg


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B, C, H, W]`` (pixel-centre aligned, antialiased when shrinking, as ``imresize``)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-image ``(x - min) / (max - min)`` over the last two dims (``mat2gray``); constant maps become 0."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def sdsp(
    x255: torch.Tensor,
    omega0: float = OMEGA0,
    sigma_f: float = SIGMA_F,
    sigma_d: float = SIGMA_D,
    sigma_c: float = SIGMA_C,
) -> torch.Tensor:
    """SDSP visual saliency of ``[B, 3, H, W]`` (RGB) or ``[B, 1, H, W]`` (gray) images in [0, 255].

    Returns:
        ``[B, H, W]`` in ``[0, 1]``.
    """
    H, W = x255.shape[-2:]
    small = _resize(x255, (SDSP_SIZE, SDSP_SIZE))
    color = small.shape[1] == 3
    lab = srgb_to_lab(small) if color else gray_to_lightness(small)
    # LG is real and even (a function of |u|), so the real FFT pair gives ifft2(fft2(lab) * LG).real exactly
    lg = log_gabor(SDSP_SIZE, SDSP_SIZE, omega0, sigma_f)[:, : SDSP_SIZE // 2 + 1].to(lab.device, lab.dtype)
    band = torch.fft.irfft2(torch.fft.rfft2(lab) * lg, s=(SDSP_SIZE, SDSP_SIZE))
    s_f = band.pow(2).sum(dim=1).sqrt()
    i = torch.arange(1, SDSP_SIZE + 1, dtype=lab.dtype, device=lab.device)
    centre = SDSP_SIZE / 2.0
    d2 = (i[:, None] - centre) ** 2 + (i[None, :] - centre) ** 2
    s_d = torch.exp(-d2 / sigma_d**2)
    if color:
        ab = _minmax(lab[:, 1:])
        s_c = 1.0 - torch.exp(-(ab.pow(2).sum(dim=1)) / sigma_c**2)
    else:
        s_c = torch.ones_like(s_f)  # gray: no colour prior
    vs = _resize((s_f * s_d * s_c).unsqueeze(1), (H, W)).squeeze(1)
    return _minmax(vs).to(x255.dtype)


def scharr_gradient(x: torch.Tensor) -> torch.Tensor:
    """Scharr gradient magnitude ``[B, H, W]`` of ``[B, H, W]`` maps (zero padding, MATLAB ``conv2 'same'``)."""
    kx = torch.tensor(_SCHARR_X, dtype=x.dtype, device=x.device) / 16.0
    k = torch.stack([kx, kx.T]).unsqueeze(1)  # conv2 flips the kernel: only the sign differs, not the magnitude
    g = F.conv2d(x.unsqueeze(1), k, padding=1)
    return torch.sqrt(g.pow(2).sum(dim=1))


def _downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``conv2(x, ones(F)/F^2, 'same')`` sampled at ``1:F:end`` for ``[B, K, H, W]``."""
    if factor == 1:
        return x
    top = (factor - 1) - factor // 2
    padded = F.pad(x, (top, factor // 2, top, factor // 2))
    k = torch.full((x.shape[1], 1, factor, factor), 1.0 / factor**2, dtype=x.dtype, device=x.device)
    return F.conv2d(padded, k, stride=factor, groups=x.shape[1])


def downsample_factor(height: int, width: int) -> int:
    """The paper's ``F = max(1, round(min(H, W) / 256))`` (MATLAB rounds halves away from zero)."""
    return max(1, int(math.floor(min(height, width) / 256.0 + 0.5)))


def similarity(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """``(2ab + c) / (a^2 + b^2 + c)``."""
    return (2.0 * a * b + c) / (a * a + b * b + c)


def vsi_from_maps(
    vs1: torch.Tensor,
    vs2: torch.Tensor,
    g1: torch.Tensor,
    g2: torch.Tensor,
    m1: torch.Tensor | None = None,
    m2: torch.Tensor | None = None,
    n1: torch.Tensor | None = None,
    n2: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    c1: float = C1,
    c2: float = C2,
    c3: float = C3,
    alpha: float = ALPHA,
    beta: float = BETA,
) -> torch.Tensor:
    """The paper's pooling from saliency maps ``vs*``, gradient magnitudes ``g*`` and chroma ``m*, n*``.

    All maps ``[B, H, W]``; without ``m*/n*`` (gray) ``S_C = 1``. ``mask`` (bool ``[B, H, W]``) restricts the sums.
    Returns ``[B]``; 1 when the weights sum to 0 (both saliency maps zero on the pooled pixels).
    """
    s = similarity(vs1, vs2, c1) * similarity(g1, g2, c2).pow(alpha)
    if m1 is not None:
        s_c = similarity(m1, m2, c3) * similarity(n1, n2, c3)
        # MATLAB's real(s_c .^ beta): a negative s_c (opposite chroma) gives |s_c|^beta * cos(pi * beta)
        s_c_pow = s_c.abs().pow(beta) * torch.where(s_c < 0, math.cos(math.pi * beta), 1.0)
        s = s * s_c_pow
    weight = torch.maximum(vs1, vs2)
    if mask is not None:
        weight = weight * mask.to(weight.dtype)
    eps = torch.finfo(weight.dtype).eps
    return ((s * weight).sum(dim=(-2, -1)) + eps) / (weight.sum(dim=(-2, -1)) + eps)


# ------------------------------------------------------------------------------------------------- the index


def _check(gt: Any, pred: Any, value_range: tuple[float, float]) -> tuple[float, float]:
    if not isinstance(gt, torch.Tensor) or not isinstance(pred, torch.Tensor):
        raise DataError(f"gt and pred must be torch tensors, got {type(gt).__name__} and {type(pred).__name__}.")
    if gt.ndim != 4 or gt.shape != pred.shape:
        raise DataError(
            f"VSI needs gt and pred of one shape [B, C, H, W]; got {tuple(gt.shape)} and {tuple(pred.shape)}."
        )
    if min(gt.shape[-2:]) < 3:
        raise DataError(f"VSI needs images of at least 3 x 3 pixels; got {tuple(gt.shape[-2:])}.")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ConfigError(f"value_range={value_range!r} must be (low, high) with high > low, e.g. (-1.0, 1.0).")
    return lo, hi


def _vsi_torch(gt255: torch.Tensor, pred255: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = torch.cat([gt255, pred255]).float()  # float32: ~2x faster than float64, differences ~1e-6
    vs = sdsp(x)
    factor = downsample_factor(*x.shape[-2:])
    if x.shape[1] == 3:
        lmn = torch.einsum("kc,bchw->bkhw", torch.tensor(_RGB_TO_LMN, dtype=x.dtype, device=x.device), x)
    else:
        lmn = x * sum(_RGB_TO_LMN[0])  # gray: L = (0.06 + 0.63 + 0.27) v
    lmn = _downsample(lmn, factor)
    vs = _downsample(vs.unsqueeze(1), factor).squeeze(1)
    g = scharr_gradient(lmn[:, 0])
    B = gt255.shape[0]
    chroma = {}
    if lmn.shape[1] == 3:
        chroma = dict(m1=lmn[:B, 1], m2=lmn[B:, 1], n1=lmn[:B, 2], n2=lmn[B:, 2])
    if mask is not None:
        mask = _downsample(mask.float(), factor)[:, 0] > 0.5
    return vsi_from_maps(vs[:B], vs[B:], g[:B], g[B:], mask=mask, **chroma)


def vsi(
    gt: torch.Tensor,
    pred: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    mask: torch.Tensor | None = None,
    rgb: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """VSI of each image pair (symmetric in its arguments; 1 for identical images).

    Args:
        gt, pred: ``[B, C, H, W]``, same shape, values in ``value_range``.
        value_range: ``(low, high)`` of the images, mapped to ``[0, 255]`` (the paper's constants assume it);
            values outside are clipped.
        mask: optional bool ``[B, 1, H, W]``: pool over these pixels only.
        rgb: treat 3 channels as RGB (the paper's colour VSI). None = ``C == 3``. Otherwise each channel is scored
            as a gray image and the channel VSIs are averaged (e.g. CT window stacks, which are not colours).
        backend: ``"auto"``: piq's VSI when ``import piq`` works, for RGB input without a mask; ours otherwise
            (piq has no mask, and scores gray images as RGB copies, which the paper does not). ``"torch"``: ours.
            ``"piq"``: piq (RGB, no mask), an error when it does not import.

    Returns:
        ``[B]`` float32, usually in ``[0, 1]``.
    """
    lo, hi = _check(gt, pred, value_range)
    if mask is not None and (
        not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != 1
        or mask.shape[0] != gt.shape[0] or mask.shape[2:] != gt.shape[2:]
    ):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DataError(f"mask shape {shape} does not fit images {tuple(gt.shape)}; use bool [B, 1, H, W].")
    color = gt.shape[1] == 3 if rgb is None else bool(rgb)
    if color and gt.shape[1] != 3:
        raise DataError(f"rgb=True needs 3 channels; got {gt.shape[1]}.")
    chosen = vsi_backend(backend)
    if backend == "piq" and (mask is not None or not color):
        raise ConfigError("piq's VSI takes RGB images without a mask; use backend='torch' or 'auto'.")
    use = "piq" if chosen == "piq" and color and mask is None else "torch"
    to01 = [((t.float() - lo) / (hi - lo)).clamp(0.0, 1.0) for t in (gt, pred)]
    if use == "piq":
        import piq

        return piq.vsi(to01[1], to01[0], data_range=1.0, reduction="none").float()
    m = None if mask is None else mask != 0
    with torch.no_grad():
        if color:
            out = _vsi_torch(to01[0] * 255.0, to01[1] * 255.0, m)
        else:
            C = gt.shape[1]
            per = [_vsi_torch(to01[0][:, c : c + 1] * 255.0, to01[1][:, c : c + 1] * 255.0, m) for c in range(C)]
            out = torch.stack(per, dim=1).mean(dim=1)
    return out.float()
