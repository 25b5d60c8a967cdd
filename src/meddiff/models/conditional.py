"""Conditional DDPM for denoising (CDM4MI): the noisy image is concatenated to ``x_t`` as conditioning.

Training is the base class's denoising loss with ``net_input = cat([x_t, cond], dim=1)``: the network sees the
noisy sample of the diffusion chain and the noisy observation side by side and predicts eps / x0 / v (the
schedule's ``prediction_type``). The denoised estimate is a sample of ``p(x0 | cond)``: start from pure noise
``x_T ~ N(0, I)`` and run the reverse chain (full DDPM chain, or DDIM with ``n`` respaced steps and ``eta``) with
every network call conditioned on ``cond``. All diffusion math comes from ``meddiff.diffusion``
(``make_timesteps`` + ``sample``).

Shapes: ``image`` (clean, training target) ``[B, C, H, W]`` and ``cond`` (noisy) ``[B, C', H, W]``, both in
``[-1, 1]`` (``cond`` may exceed it by the noise); the net must take ``C + C'`` input channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from meddiff.diffusion import SAMPLERS, SPACINGS, make_noise, make_timesteps, sample
from meddiff.errors import ConfigError, DataError
from meddiff.metrics.image_quality import image_scores
from meddiff.models.anomaly import drop_legacy_recon
from meddiff.models.base import DiffusionModule


class CondSkip(nn.Module):
    """``net(cat([x_t, cond]), t) + cond``: an x0-predicting net then only learns the correction to the noisy
    image (a residual / skip connection over the network; the diffusion math is untouched).

    Holds no parameters of its own; ``image_channels`` splits the input into ``x_t`` and ``cond`` (which must have
    as many channels as the output).
    """

    def __init__(self, net: nn.Module, image_channels: int) -> None:
        super().__init__()
        self.net = net
        self.image_channels = image_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, t, class_labels) + x[:, self.image_channels :]


def net_in_channels(net: nn.Module) -> int | None:
    """Input channels a denoiser expects (``MonaiUNet.in_channels`` / ``DiffusersUNet.net_in``), or None."""
    for attr in ("in_channels", "net_in"):
        value = getattr(net, attr, None)
        if isinstance(value, int):
            return value
    return None


class ConditionalDiffusion(DiffusionModule):
    """Concatenation-conditioned DDPM whose ``reconstruct`` denoises ``batch['cond']``.

    Args (besides :class:`~meddiff.models.base.DiffusionModule`'s):
        image_channels: channels ``C`` of the clean image (what is diffused and sampled).
        cond_channels: channels ``C'`` of ``batch['cond']``; ``net.in_channels`` must be ``C + C'``.
        sampler: ``"ddim"`` or ``"ddpm"`` for :meth:`reconstruct`.
        sample_steps: reverse steps (``make_timesteps`` respacing); ``None`` = every timestep (the full chain).
        eta: DDIM stochasticity (0 = deterministic, 1 = DDPM-like variance).
        timestep_spacing: ``leading`` | ``trailing`` | ``linspace`` (see ``meddiff.diffusion.make_timesteps``).
        clip_sample: clamp the x0 estimate of every step to ``[-c, c]`` (``True`` = 1.0, ``None`` = off).
        num_samples: average this many independent samples per input (1 = the plain posterior sample; more
            approaches the posterior mean: higher PSNR, smoother images, ``num_samples`` times the cost).
        sample_seed: seed of the starting noise and step noise (reproducible denoising).
        cond_skip: add ``cond`` to the network output (:class:`CondSkip`), so that with x0 prediction
            (``schedule.prediction_type: sample``) the net learns only the correction to the noisy image; this
            converges much faster (an extension of the seed, off by default). Needs x0 prediction and
            ``cond_channels == image_channels``.
        val_psnr_batches: validation batches on which a fast DDIM denoising is scored (``val/psnr``,
            ``val/ssim``, and the noisy input's ``val/psnr_noisy`` for reference); 0 logs ``val/loss`` only.
        val_sample_steps: DDIM steps of that validation denoising.
    """

    eval_protocol = "denoise"
    conditioning_keys = ("cond",)

    def __init__(
        self,
        *args: Any,
        image_channels: int = 1,
        cond_channels: int = 1,
        sampler: str = "ddim",
        sample_steps: int | None = 50,
        eta: float = 0.0,
        timestep_spacing: str = "leading",
        clip_sample: float | bool | None = True,
        num_samples: int = 1,
        sample_seed: int = 0,
        cond_skip: bool = False,
        val_psnr_batches: int = 1,
        val_sample_steps: int = 10,
        **kwargs: Any,
    ) -> None:
        drop_legacy_recon(kwargs, "ConditionalDiffusion", "denoising samples from pure noise: see model.sampler, "
                          "model.sample_steps")
        super().__init__(*args, **kwargs)
        T = self.schedule.num_train_timesteps
        if int(image_channels) < 1 or int(cond_channels) < 1:
            raise ConfigError(
                f"model.image_channels={image_channels} and model.cond_channels={cond_channels} must be >= 1."
            )
        self.image_channels, self.cond_channels = int(image_channels), int(cond_channels)
        want = self.image_channels + self.cond_channels
        have = net_in_channels(self.net)
        if have is not None and have != want:
            raise ConfigError(
                f"net.in_channels={have} but ConditionalDiffusion feeds x_t ({self.image_channels} channel(s), "
                f"model.image_channels) concatenated with cond ({self.cond_channels}, model.cond_channels) = {want} "
                f"channels; set net.in_channels={want}."
            )
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler={sampler!r} is unknown; choose one of {list(SAMPLERS)}.")
        if timestep_spacing not in SPACINGS:
            raise ConfigError(
                f"model.timestep_spacing={timestep_spacing!r} is unknown; choose one of {list(SPACINGS)}."
            )
        if sample_steps is not None and not 1 <= int(sample_steps) <= T:
            raise ConfigError(
                f"model.sample_steps={sample_steps} is outside [1, {T}] (T = schedule.num_train_timesteps); "
                "use e.g. 50 for DDIM or null for the full chain."
            )
        if not 1 <= int(val_sample_steps) <= T:
            raise ConfigError(f"model.val_sample_steps={val_sample_steps} is outside [1, {T}].")
        if not float(eta) >= 0:
            raise ConfigError(f"model.eta={eta} must be >= 0 (0 = deterministic DDIM).")
        if int(num_samples) < 1 or int(val_psnr_batches) < 0:
            raise ConfigError(
                f"model.num_samples={num_samples} must be >= 1 and model.val_psnr_batches={val_psnr_batches} >= 0."
            )
        if cond_skip and self.schedule.prediction_type != "sample":
            raise ConfigError(
                f"model.cond_skip=true adds the noisy image to the network output, which only makes sense for x0 "
                f"prediction, but schedule.prediction_type={self.schedule.prediction_type!r}; set "
                "schedule.prediction_type=sample or model.cond_skip=false."
            )
        if cond_skip and self.cond_channels != self.image_channels:
            raise ConfigError(
                f"model.cond_skip=true needs model.cond_channels ({self.cond_channels}) == model.image_channels "
                f"({self.image_channels}); set model.cond_skip=false."
            )
        self.cond_skip = bool(cond_skip)
        self._skips: dict[int, CondSkip] = {}
        self.sampler = sampler
        self.sample_steps = None if sample_steps is None else int(sample_steps)
        self.eta = float(eta)
        self.timestep_spacing = timestep_spacing
        self.clip_sample = clip_sample
        self.num_samples = int(num_samples)
        self.sample_seed = int(sample_seed)
        self.val_psnr_batches = int(val_psnr_batches)
        self.val_sample_steps = int(val_sample_steps)

    # ------------------------------------------------------------------ conditioning
    @property
    def denoiser(self) -> nn.Module:
        """The base's (EMA or online) net, wrapped in :class:`CondSkip` when ``cond_skip`` is on."""
        net = super().denoiser
        if not self.cond_skip:
            return net
        key = id(net)
        if key not in self._skips or self._skips[key].net is not net:
            self._skips[key] = CondSkip(net, self.image_channels)
        return self._skips[key]

    def _cond(self, batch: Mapping[str, Any]) -> torch.Tensor:
        cond = batch.get("cond") if isinstance(batch, Mapping) else None
        if cond is None:
            raise DataError(
                "ConditionalDiffusion needs batch['cond'] (the noisy image, [B, C', H, W]); use a denoising "
                "datamodule such as data=hdf5_patches."
            )
        if cond.ndim != 4 or cond.shape[1] != self.cond_channels:
            raise DataError(
                f"batch['cond'] has shape {tuple(cond.shape)} but [B, {self.cond_channels}, H, W] is expected "
                "(model.cond_channels)."
            )
        return cond

    def net_input(self, x_t: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """``cat([x_t, cond], 1)``: ``[B, C + C', H, W]``."""
        cond = self._cond(batch)
        if cond.shape[0] != x_t.shape[0] or cond.shape[-2:] != x_t.shape[-2:]:
            raise DataError(
                f"cond {tuple(cond.shape)} does not match x_t {tuple(x_t.shape)} in batch size / spatial size."
            )
        return torch.cat([x_t, cond.to(x_t.dtype)], dim=1)

    # ------------------------------------------------------------------ denoising
    def timesteps(self, steps: int | None | str = "config") -> torch.Tensor:
        """Descending timesteps of a reverse chain (configured spacing); ``steps=None`` is every timestep."""
        n = self.sample_steps if steps == "config" else steps
        T = self.schedule.num_train_timesteps
        return make_timesteps(T, T if n is None else int(n), self.timestep_spacing)

    @torch.no_grad()
    def denoise(
        self,
        cond: torch.Tensor,
        sampler: str | None = None,
        steps: int | None | str = "config",
        eta: float | None = None,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Denoise ``cond [B, C', H, W]`` by sampling ``p(x0 | cond)`` from pure noise at ``T``.

        Unset arguments take the model's configured values (``steps="config"``; ``steps=None`` = full chain).
        Uses the EMA weights when the module is in eval mode. Returns ``[B, C, H, W]`` clamped to ``[-1, 1]``.
        """
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler={sampler!r} is unknown; choose one of {list(SAMPLERS)}.")
        eta = self.eta if eta is None else float(eta)
        k = self.num_samples if num_samples is None else int(num_samples)
        if k < 1:
            raise ConfigError(f"num_samples={k} must be >= 1.")
        batch = {"cond": cond}
        self._cond(batch)
        ts = self.timesteps(steps)
        if generator is None:
            generator = torch.Generator(device=cond.device).manual_seed(self.sample_seed)
        b, _, h, w = cond.shape
        shape_like = torch.empty(b, self.image_channels, h, w, device=cond.device, dtype=cond.dtype)
        fn = self.model_fn(batch)
        acc = torch.zeros_like(shape_like)
        for _ in range(k):
            x_T = make_noise("gaussian", shape_like, generator=generator)
            x0 = sample(fn, self.schedule, x_T, ts, sampler=sampler, eta=eta, generator=generator,
                        clip_sample=self.clip_sample, progress=progress)
            acc += x0.clamp(-1.0, 1.0)
        return acc / k

    def reconstruct(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Denoised estimate of ``batch['cond']`` with the configured sampler: ``[B, C, H, W]`` in ``[-1, 1]``."""
        return self.denoise(self._cond(batch))

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """``val/loss`` (base) and, on the first ``val_psnr_batches`` batches, ``val/psnr`` of a fast DDIM pass."""
        super().validation_step(batch, batch_idx)
        if batch_idx >= self.val_psnr_batches or "image" not in batch:
            return
        x0 = batch["image"]
        gen = torch.Generator(device=x0.device).manual_seed(self.sample_seed + batch_idx)
        pred = self.denoise(batch["cond"], sampler="ddim", steps=self.val_sample_steps, eta=0.0, num_samples=1,
                            generator=gen)
        s = image_scores(x0, pred, dynamic_range=2.0, max_psnr=100.0)
        noisy = image_scores(x0, batch["cond"].clamp(-1, 1), dynamic_range=2.0, max_psnr=100.0)
        n = x0.shape[0]
        self.log("val/psnr", s["psnr"].mean(), prog_bar=True, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("val/ssim", s["ssim"].mean(), on_epoch=True, sync_dist=True, batch_size=n)
        self.log("val/psnr_noisy", noisy["psnr"].mean(), on_epoch=True, sync_dist=True, batch_size=n)
