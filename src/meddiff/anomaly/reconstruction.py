"""Healthy reconstruction by partial diffusion, whole-image or patched, all patches of all images batched.

Given clean inputs ``x0 [B, C, H, W] in [-1, 1]`` and patch masks ``[P, 1, H, W]``, every (image, patch) pair is
one item: the patch region is noised to ``t_start`` while the rest of the image stays clean context (pDDPM);
items are run through the denoiser in chunks of ``max_batch``, and each pixel's reconstruction is the average
over the patches that cover it. With a single all-true mask this is plain whole-image DDPM reconstruction.

Methods:
- ``one_step``: one forward pass at ``t_start`` predicting x0 (pDDPM's test-time procedure);
- ``ddim`` / ``ddpm``: the reverse chain from ``t_start`` to 0 over ``num_steps`` respaced timesteps, the context
  re-imposed clean at every step.

``n_noise`` independent noise draws are averaged (an ensemble: the reconstruction's own noise on healthy tissue
falls, most at low ``t_start``). ``precision`` sets how the network runs: ``None`` as the caller's context has it
(e.g. Lightning's autocast during validation), ``"bf16"`` under bfloat16 autocast (about 1.8x faster on CPUs with
native bf16), ``"16"`` under float16 autocast (GPUs), ``"32"`` in float32 even inside an autocast region, ``"auto"``
bf16 where the device computes it natively (CPU: AMX / AVX-512-BF16, ``meddiff.utils.cpu.bf16_support``), float32
otherwise on CPU, float16 on GPUs without bf16. Lightning's names (``bf16-mixed``, ``32-true``, ...) are accepted,
so ``${trainer.precision}`` can be passed. The noise, the schedule tables and the stitching stay float32 in every
case; the reconstruction has the input's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from meddiff.diffusion import NoiseSchedule, make_noise
from meddiff.diffusion.samplers import make_partial_timesteps, sample
from meddiff.errors import ConfigError
from meddiff.patches import patch_masks

ModelFn = Callable[..., torch.Tensor]  # (x_t [n,C,H,W], t [n], idx [n] | None) -> output
METHODS = ("one_step", "ddim", "ddpm")
# accepted name (ours or Lightning's) -> autocast dtype of the network call (None = autocast off, float32)
PRECISIONS: dict[str, torch.dtype | None] = {
    "32": None, "32-true": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
    "16": torch.float16, "16-mixed": torch.float16,
}
AUTO = "auto"  # bf16 where the device computes it natively (see auto_dtype)


@dataclass
class ReconstructionConfig:
    """How a healthy estimate is made. Written into every report."""

    method: str = "one_step"
    t_start: int = 250
    num_steps: int | None = 10
    patch_size: int | None = None
    stride: int | None = None
    noise: str = "gaussian"
    eta: float = 0.0
    max_batch: int = 256
    seed: int = 0
    n_noise: int = 1  # independent noise draws averaged (lowers the reconstruction's own noise on healthy tissue)
    precision: str | None = None  # network precision: None = the caller's (autocast) context, "bf16", "16", "32"

    def validate(self, num_train_timesteps: int | None = None, image_hw: tuple[int, int] | None = None) -> None:
        """Raise ``ConfigError`` naming the bad option. The depth is checked against the schedule's length and the
        patch against the image size when those are given (``options_from`` calls this with neither)."""
        if self.method not in METHODS:
            raise ConfigError(f"recon.method={self.method!r} is unknown; choose one of {list(METHODS)}.")
        if num_train_timesteps is not None and not 0 <= int(self.t_start) < num_train_timesteps:
            raise ConfigError(
                f"recon.t_start={self.t_start} is outside [0, {num_train_timesteps}); pick a noise level inside the "
                f"schedule, e.g. {num_train_timesteps // 4}."
            )
        if self.n_noise < 1:
            raise ConfigError(f"recon.n_noise={self.n_noise} must be >= 1 (the number of noise draws averaged).")
        if self.max_batch < 1:
            raise ConfigError(f"recon.max_batch={self.max_batch} must be >= 1.")
        if self.precision is not None and str(self.precision) not in (*PRECISIONS, AUTO):
            raise ConfigError(
                f"recon.precision={self.precision!r} is unknown; choose null (the caller's context), {AUTO!r} or "
                f"{sorted(PRECISIONS)} (Lightning's names are accepted)."
            )
        if image_hw is not None and self.patch_size is not None and self.patch_size > min(image_hw):
            raise ConfigError(
                f"recon.patch_size={self.patch_size} is larger than the image {tuple(image_hw)}; "
                f"use a patch <= {min(image_hw)} or null for whole-image reconstruction."
            )


@torch.no_grad()
def reconstruct(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cfg: ReconstructionConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Healthy estimate of ``x0 [B, C, H, W] in [-1, 1]``; returns ``[B, C, H, W]`` clamped to ``[-1, 1]``.

    ``model_fn(x_t [n, C, H, W], t LongTensor [n], idx LongTensor [n]) -> model output`` in the schedule's
    prediction type; ``idx`` says which input image each item comes from, so the function can attach that image's
    conditioning (see ``DiffusionModule.model_fn``).
    """
    b, _, h, w = x0.shape
    cfg.validate(schedule.num_train_timesteps, (h, w))
    model_fn = with_precision(model_fn, cfg.precision, x0.device.type, x0.dtype)
    if generator is None:
        generator = torch.Generator(device=x0.device).manual_seed(cfg.seed)
    masks = patch_masks(h, w, cfg.patch_size, cfg.stride, device=x0.device)
    recon = torch.zeros_like(x0)
    for _ in range(cfg.n_noise):
        recon += _reconstruct_once(model_fn, schedule, x0, masks, cfg, generator)
    return recon / cfg.n_noise


def with_precision(model_fn: ModelFn, precision: str | None, device_type: str, dtype: torch.dtype) -> ModelFn:
    """``model_fn`` run under the requested precision, its output cast to ``dtype`` (``precision`` None: unchanged).

    ``"bf16"`` (``"16"``): bfloat16 (float16) autocast around the network call only; ``"32"``: autocast disabled
    there (float32 even when the caller runs under autocast, e.g. a bf16-mixed Lightning validation step).
    """
    if precision is None:
        return model_fn
    low = auto_dtype(device_type) if str(precision) == AUTO else PRECISIONS[str(precision)]

    def fn(*args, **kwargs) -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=low or torch.bfloat16, enabled=low is not None):
            out = model_fn(*args, **kwargs)
        return out.to(dtype)

    return fn


@functools.cache
def auto_dtype(device_type: str) -> torch.dtype | None:
    """Autocast dtype of ``precision="auto"`` on ``device_type`` (None = float32): bf16 where it is native."""
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu":
        from meddiff.utils.cpu import bf16_support

        return torch.bfloat16 if bf16_support()["native_bf16"] else None
    return None


def _reconstruct_once(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    masks: torch.Tensor,
    cfg: ReconstructionConfig,
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
        if cfg.method == "one_step":
            t = torch.full((len(chunk),), t_start, device=x0.device, dtype=torch.long)
            pred = schedule.predict_x0(model_fn(start, t, img), start, t)
        else:

            def masked_fn(x: torch.Tensor, t: torch.Tensor, m=m, context=context, img=img) -> torch.Tensor:
                return model_fn(torch.where(m, x, context), t, img)

            steps = make_partial_timesteps(t_start, cfg.num_steps)
            pred = sample(masked_fn, schedule, start, steps, sampler=cfg.method, eta=cfg.eta, generator=generator)
        mf = m.to(x0.dtype)
        total.index_add_(0, img, pred.clamp(-1, 1) * mf)
        count.index_add_(0, img, mf)
    return total / count.clamp_min(1.0)
