"""The denoising methods compared (noisy input, NLM, BM3D, supervised U-Net, the model's samplers) and the
per-patch scores, shared by the selection step and the test pass.

Images are ``[B, C, P, P]`` floats in ``[-1, 1]``; every method's output is clipped to that range.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from meddiff.metrics import denoisers
from meddiff.metrics.image_quality import image_scores
from meddiff.protocols.denoise.options import DenoiseEvalOptions

#: generator seeds of the validation pass are offset so they never coincide with the test pass's
VAL_SEED_OFFSET = 500_009


def nlm_denoise(noisy: np.ndarray, sigma: float, h_factor: float, patch_size: int = 5,
                patch_distance: int = 6) -> np.ndarray:
    """Non-local means of each image of ``noisy [N, C, H, W]`` (float, ``[-1, 1]`` units); same shape, clipped.

    ``sigma`` is the noise std (same units), ``h = h_factor * sigma`` the filter strength (scikit-image's
    recommended setting is ``h ~ 0.8 sigma`` with ``fast_mode``).
    """
    from skimage.restoration import denoise_nl_means

    out = np.empty_like(noisy, dtype=np.float32)
    s = max(float(sigma), 1e-6)
    for i in range(noisy.shape[0]):
        for c in range(noisy.shape[1]):
            out[i, c] = denoise_nl_means(noisy[i, c].astype(np.float64), h=h_factor * s, sigma=s, fast_mode=True,
                                         patch_size=patch_size, patch_distance=patch_distance)
    return np.clip(out, -1.0, 1.0)


def mask_for(clean: torch.Tensor, opts: DenoiseEvalOptions) -> torch.Tensor | None:
    """The pixels that count (``mask: foreground``: clean value above the threshold); None = all."""
    if opts.mask in (None, "none"):
        return None
    return clean > opts.foreground_threshold


def scores(clean: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None, dr: float) -> dict[str, np.ndarray]:
    """PSNR / SSIM / MAE / VSI of each image (``[B]`` float64 arrays) at dynamic range ``dr``."""
    s = image_scores(clean.float().cpu(), pred.float().cpu(), None if mask is None else mask.cpu(), dynamic_range=dr,
                     max_psnr=100.0)
    return {k: v.numpy().astype(np.float64) for k, v in s.items()}


def agg(values: list[np.ndarray]) -> tuple[float, float]:
    """Mean and std of the finite values of ``values`` (NaN, NaN when there are none)."""
    v = np.concatenate(values) if values else np.zeros(0)
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())


def sync(device: torch.device) -> None:
    """Wait for the device, so wall-clock timings measure the work and not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class MethodContext:
    """What applying a method needs at one noise level (``h_factor`` is set once chosen on validation)."""

    model: Any  # provides DenoiseModel
    opts: DenoiseEvalOptions
    level: float
    li: int  # index of the level: part of the samplers' seeds
    device: torch.device
    sup_model: torch.nn.Module | None = None
    h_factor: float | None = None


def apply_method(m: str, cond: torch.Tensor, ctx: MethodContext, seed: int) -> torch.Tensor:
    """Method ``m`` on the noisy patches ``cond [B, C', P, P]`` -> estimates ``[B, C, P, P]`` in ``[-1, 1]``."""
    opts = ctx.opts
    if m == "noisy":
        return cond.clamp(-1.0, 1.0)
    if m == "nlm":
        return torch.from_numpy(nlm_denoise(cond.cpu().numpy(), ctx.level, ctx.h_factor, opts.nlm_patch_size,
                                            opts.nlm_patch_distance)).to(cond.device)
    if m == "bm3d":
        sigma = ctx.level if opts.bm3d_sigma == "known" else None
        return torch.from_numpy(denoisers.bm3d_denoise_batch(cond.cpu().numpy(), sigma, opts.bm3d_profile)
                                ).to(cond.device)
    if m == "supervised":
        with torch.no_grad():
            return ctx.sup_model(cond)
    return ctx.model.reconstruct({"cond": cond}, sampler_settings(ctx.model, m, opts, seed))


def sampler_settings(model: Any, m: str, opts: DenoiseEvalOptions, seed: int) -> Any:
    """The copy of ``model.sampling`` that runs sampler method ``m`` (``ddpm``: the full chain; ``ddim_<n>``: DDIM
    with ``n`` steps) with ``eval.eta``, ``eval.num_samples`` (None = the model's ``draws``) and the noise ``seed``;
    the model's own settings are never changed."""
    sampler, steps = ("ddpm", None) if m == "ddpm" else ("ddim", int(m.split("_")[1]))
    changes: dict[str, Any] = {"sampler": sampler, "steps": steps, "seed": int(seed)}
    if opts.eta is not None:
        changes["eta"] = float(opts.eta)
    if opts.num_samples is not None:
        changes["draws"] = int(opts.num_samples)
    return replace(model.sampling, **changes)


def batch_seed(ctx: MethodContext, bi: int) -> int:
    """The sampler seed of batch ``bi`` at the context's level (the same for every method: paired samples)."""
    return ctx.opts.seed * 1_000_003 + ctx.li * 10_007 + bi
