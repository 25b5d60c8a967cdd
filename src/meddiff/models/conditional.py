"""Conditional DDPM for denoising (CDM4MI): the noisy image is concatenated to ``x_t`` as conditioning.

Training is the base class's denoising loss with ``net_input = cat([x_t, cond], dim=1)``: the network sees the
noisy sample of the diffusion chain and the noisy observation side by side and predicts eps / x0 / v (the
schedule's ``prediction_type``). The denoised estimate is a sample of ``p(x0 | cond)``: start from pure noise
``x_T ~ N(0, I)`` and run the reverse chain (full DDPM chain, or DDIM with ``n`` respaced steps and ``eta``) with
every network call conditioned on ``cond``; ``model.sampling`` says which (sampler, steps, spacing, eta, clip, seed,
draws). All diffusion math comes from ``meddiff.diffusion`` (``make_timesteps`` + ``sample``).

Shapes: ``image`` (clean, training target) ``[B, C, H, W]`` and ``cond`` (noisy) ``[B, C', H, W]``, both in
``[-1, 1]`` (``cond`` may exceed it by the noise); the net must take ``C + C'`` input channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from meddiff.diffusion import SAMPLERS, make_noise, make_timesteps, sample
from meddiff.diffusion.sampling import SamplingConfig
from meddiff.errors import ConfigError, DataError
from meddiff.metrics.image_quality import image_scores
from meddiff.models.base import DiffusionModule
from meddiff.models.validation import chosen_batches


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

    Args (besides :class:`~meddiff.models.base.DiffusionModule`'s; ``sampling``: how :meth:`reconstruct` samples,
    ``sampler`` ddim | ddpm, ``steps`` (None = the full chain), ``spacing``, ``eta``, ``clip`` (``True`` = clamp each
    step's x0 estimate to [-1, 1]), ``seed``, ``draws`` (independent samples averaged: towards the posterior mean,
    higher PSNR, smoother images); ``val_sampling``: the fast validation denoising (``val/psnr``, ``val/ssim``,
    ``val/psnr_noisy``) on the first ``val_batches`` batches, 0 = ``val/loss`` only):
        image_channels: channels ``C`` of the clean image (what is diffused and sampled).
        cond_channels: channels ``C'`` of ``batch['cond']``; ``net.in_channels`` must be ``C + C'``.
        cond_skip: add ``cond`` to the network output (:class:`CondSkip`), so that with x0 prediction
            (``schedule.prediction_type: sample``) the net learns only the correction to the noisy image; this
            converges much faster (an extension of the seed, off by default). Needs x0 prediction and
            ``cond_channels == image_channels``.
    """

    eval_protocol = "denoise"
    conditioning_keys = ("cond",)
    sampling_defaults = {"sampler": "ddim", "steps": 50, "spacing": "leading", "clip": True}

    def __init__(
        self,
        *args: Any,
        image_channels: int = 1,
        cond_channels: int = 1,
        cond_skip: bool = False,
        val_batches: int | None = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, val_batches=val_batches, **kwargs)
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
        self.check_both_samplings()
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

    def check_sampling(self, cfg: SamplingConfig, where: str) -> None:
        if cfg.sampler not in SAMPLERS:
            raise ConfigError(f"{where}.sampler={cfg.sampler!r} is unknown here; choose one of {list(SAMPLERS)}.")
        cfg.require_unset(("t_start", "precision", "noise"), "the conditional denoiser (it samples from pure "
                          "Gaussian noise at T)", where)

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
        n = self.sampling.steps if steps == "config" else steps
        T = self.schedule.num_train_timesteps
        return make_timesteps(T, T if n is None else int(n), self.sampling.spacing)

    @torch.no_grad()
    def sample_posterior(self, cond: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
                         progress: bool = False) -> torch.Tensor:
        """Denoise ``cond [B, C', H, W]`` by sampling ``p(x0 | cond)`` from pure noise at ``T`` with ``cfg``
        (``cfg.draws`` samples averaged); EMA weights in eval mode. Returns ``[B, C, H, W]`` clamped to [-1, 1]."""
        batch = {"cond": cond}
        self._cond(batch)
        ts = self.timesteps(cfg.steps)
        if generator is None:
            generator = torch.Generator(device=cond.device).manual_seed(cfg.seed)
        b, _, h, w = cond.shape
        shape_like = torch.empty(b, self.image_channels, h, w, device=cond.device, dtype=cond.dtype)
        fn = self.model_fn(batch)
        acc = torch.zeros_like(shape_like)
        for _ in range(cfg.draws):
            x_T = make_noise("gaussian", shape_like, generator=generator)
            x0 = sample(fn, self.schedule, x_T, ts, sampler=cfg.sampler, eta=cfg.eta, generator=generator,
                        clip_sample=cfg.clip, progress=progress)
            acc += x0.clamp(-1.0, 1.0)
        return acc / cfg.draws

    def reconstruct(self, batch: Mapping[str, Any], sampling: SamplingConfig | None = None) -> torch.Tensor:
        """Denoised estimate of ``batch['cond']`` with ``sampling`` (default ``model.sampling``): ``[B, C, H, W]`` in
        ``[-1, 1]``. A protocol passes a changed copy (``dataclasses.replace(model.sampling, sampler="ddpm",
        steps=None, seed=...)``), validated here and never stored; the noise is seeded with ``sampling.seed``."""
        if sampling is None:
            sampling = self.sampling
        else:
            self.check_sampling(sampling.validate(self.schedule.num_train_timesteps, "sampling"), "sampling")
        return self.sample_posterior(self._cond(batch), sampling)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``val/loss`` (base) and, on the first ``val_batches`` batches, ``val/psnr`` of the ``val_sampling`` pass."""
        super().validation_step(batch, batch_idx)
        chosen = chosen_batches(self.val_batches, self.num_val_batches(dataloader_idx), spread=False)
        if (chosen is not None and batch_idx not in chosen) or "image" not in batch:
            return
        x0 = batch["image"]
        cfg = self.validation_sampling()
        gen = torch.Generator(device=x0.device).manual_seed(cfg.seed + batch_idx)
        pred = self.sample_posterior(self._cond(batch), cfg, generator=gen)
        s = image_scores(x0, pred, dynamic_range=2.0, max_psnr=100.0)
        noisy = image_scores(x0, batch["cond"].clamp(-1, 1), dynamic_range=2.0, max_psnr=100.0)
        n = x0.shape[0]
        self.log("val/psnr", s["psnr"].mean(), prog_bar=True, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("val/ssim", s["ssim"].mean(), on_epoch=True, sync_dist=True, batch_size=n)
        self.log("val/psnr_noisy", noisy["psnr"].mean(), on_epoch=True, sync_dist=True, batch_size=n)
