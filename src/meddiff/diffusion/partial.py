"""Partial-diffusion reconstruction, whole-image or patched (pDDPM), pure torch.

For images ``x0 [B, C, H, W] in [-1, 1]`` and patch masks ``[P, 1, H, W]``, every (image, patch) pair is one item:
the patch region is noised to ``t_start`` while the rest of the image stays clean context (pDDPM); items run through
the denoiser in chunks of ``max_batch``, and each pixel's reconstruction is the average over the patches that cover
it. With a single all-true mask (``patch_size=None``) this is plain whole-image partial diffusion (AnoDDPM / SDEdit).

Samplers (``PartialSampling.sampler``):
- ``one_step``: one forward pass at ``t_start`` predicting x0 (pDDPM's test-time procedure);
- ``ddim`` / ``ddpm``: the reverse chain from ``t_start`` to 0 over ``steps`` respaced timesteps
  (``make_partial_timesteps``), the context re-imposed clean at every step.

``draws`` independent noise draws are averaged (an ensemble: the reconstruction's own noise on healthy tissue falls,
most at low ``t_start``). ``precision`` sets how the network runs (``meddiff.diffusion.sampling.with_precision``);
the noise, the schedule tables and the stitching stay float32; the reconstruction has the input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from meddiff.diffusion.noise import make_noise
from meddiff.diffusion.samplers import make_partial_timesteps, sample
from meddiff.diffusion.sampling import ONE_STEP, SamplingConfig, with_precision
from meddiff.diffusion.schedule import NoiseSchedule
from meddiff.errors import ConfigError
from meddiff.patches import patch_masks

__all__ = ["PartialSampling", "partial_reconstruct"]

ModelFn = Callable[..., torch.Tensor]  # (x_t [n,C,H,W], t [n], idx [n] | None) -> output


@dataclass
class PartialSampling(SamplingConfig):
    """:class:`SamplingConfig` of a partial-diffusion reconstruction, plus the pDDPM patch fields.

    ``patch_size``: side of the noised patch (None = the whole image); ``stride``: pixels between patch origins
    (None = the patch size); ``max_batch``: (image, patch) items per network call. ``t_start`` is required.
    """

    sampler: str = ONE_STEP
    steps: int | None = 10
    t_start: int | None = 250
    patch_size: int | None = None
    stride: int | None = None
    max_batch: int = 256

    def validate(self, num_train_timesteps: int | None = None, where: str = "model.sampling",
                 image_hw: tuple[int, int] | None = None) -> PartialSampling:
        """:meth:`SamplingConfig.validate` plus the depth, batch and patch checks (patch vs image when given)."""
        super().validate(num_train_timesteps, where)
        if self.t_start is None:
            raise ConfigError(f"{where}.t_start is null but a partial-diffusion reconstruction starts at a depth; "
                              "set e.g. t_start: 250.")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"{where}.max_batch={self.max_batch!r} must be an integer >= 1.")
        for name in ("patch_size", "stride"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{where}.{name}={v!r} must be an integer >= 1 (pixels), or null.")
        if image_hw is not None and self.patch_size is not None and self.patch_size > min(image_hw):
            raise ConfigError(f"{where}.patch_size={self.patch_size} is larger than the image {tuple(image_hw)}; "
                              f"use a patch <= {min(image_hw)} or null for whole-image reconstruction.")
        return self


@torch.no_grad()
def partial_reconstruct(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cfg: PartialSampling,
    generator: torch.Generator | None = None,
    native_bf16: bool = False,
) -> torch.Tensor:
    """Healthy estimate of ``x0 [B, C, H, W] in [-1, 1]``; returns ``[B, C, H, W]`` clamped to ``[-1, 1]``.

    ``model_fn(x_t [n, C, H, W], t LongTensor [n], idx LongTensor [n]) -> model output`` in the schedule's prediction
    type; ``idx`` says which input image each item comes from, so the function can attach that image's conditioning.
    ``generator`` defaults to one seeded with ``cfg.seed``; ``native_bf16``: whether this CPU computes bf16 natively
    (read by ``precision="auto"`` only; the caller measures it).
    """
    b, _, h, w = x0.shape
    cfg.validate(schedule.num_train_timesteps, image_hw=(h, w))
    model_fn = with_precision(model_fn, cfg.precision, x0.device.type, x0.dtype, native_bf16)
    if generator is None:
        generator = torch.Generator(device=x0.device).manual_seed(cfg.seed)
    masks = patch_masks(h, w, cfg.patch_size, cfg.stride, device=x0.device)
    recon = torch.zeros_like(x0)
    for _ in range(cfg.draws):
        recon += _reconstruct_once(model_fn, schedule, x0, masks, cfg, generator)
    return recon / cfg.draws


def _reconstruct_once(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    masks: torch.Tensor,
    cfg: PartialSampling,
    generator: torch.Generator,
) -> torch.Tensor:
    """One noise draw: every (image, patch) item in chunks of ``max_batch``, stitched by averaging."""
    b, _, h, w = x0.shape
    n_patches = masks.shape[0]
    noise = make_noise(cfg.noise, x0, generator=generator)
    t_start = int(cfg.t_start)
    x_t = schedule.q_sample(x0, torch.full((b,), t_start, device=x0.device, dtype=torch.long), noise)

    total = torch.zeros_like(x0)
    count = torch.zeros(b, 1, h, w, device=x0.device, dtype=x0.dtype)
    flat = torch.arange(b * n_patches, device=x0.device)
    for chunk in flat.split(cfg.max_batch):
        img, pat = chunk // n_patches, chunk % n_patches
        m = masks[pat]
        context = x0[img]
        start = torch.where(m, x_t[img], context)
        if cfg.sampler == ONE_STEP:
            t = torch.full((len(chunk),), t_start, device=x0.device, dtype=torch.long)
            pred = schedule.predict_x0(model_fn(start, t, img), start, t)
        else:

            def masked_fn(x: torch.Tensor, t: torch.Tensor, m=m, context=context, img=img) -> torch.Tensor:
                return model_fn(torch.where(m, x, context), t, img)

            steps = make_partial_timesteps(t_start, cfg.steps)
            pred = sample(masked_fn, schedule, start, steps, sampler=cfg.sampler, eta=cfg.eta, generator=generator,
                          clip_sample=cfg.clip)
        mf = m.to(x0.dtype)
        total.index_add_(0, img, pred.clamp(-1, 1) * mf)
        count.index_add_(0, img, mf)
    return total / count.clamp_min(1.0)
