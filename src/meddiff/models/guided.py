"""Classifier-free guided diffusion (Ho & Salimans 2022) for healthy counterfactuals (seed 004, ADNI).

Training: class-conditional noise prediction; each label is replaced by the *null class* (index
``num_classes``, the last row of the net's class embedding) with probability ``cond_drop_prob``, so one net learns
both ``eps(x_t, t, c)`` and ``eps(x_t, t, null)``.

Healthy counterfactual (``reconstruct`` / :meth:`GuidedDiffusion.healthy_counterfactual`), the FIELD-NOTES recipe:

1. ``x_{t_start}``: deterministic DDIM inversion of the input with the null class over the ascending respaced
   list ``make_partial_timesteps(t_start, steps)`` reversed (``sampling.invert=true``), or
   ``q_sample(x0, t_start, noise)`` (``invert=false``, SDEdit-style);
2. DDIM (eta=0) from ``t_start`` down to 0 over the same list with the guided output
   ``cfg_combine(out_null, out_healthy, w)`` = ``out_null + w (out_healthy - out_null)``; both branches run in one
   forward pass (batch concatenated), the healthy class is CN (index 0).

Combining raw outputs is the same as combining epsilons for any prediction type: eps, x0 and v are affine in eps
at fixed ``(x_t, t)`` and the CFG weights ``(1 - w, w)`` sum to one. All diffusion math is ``meddiff.diffusion``'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meddiff.diffusion import cfg_combine, ddim_invert, make_partial_timesteps, sample
from meddiff.diffusion.noise import gaussian_like
from meddiff.diffusion.sampling import SamplingConfig
from meddiff.errors import ConfigError, DataError
from meddiff.models.base import DiffusionModule
from meddiff.models.validation import AnomalyValidation

__all__ = ["GuidedDiffusion", "GuidedSampling", "net_num_class_embeds"]

#: ``model.sampling`` fields a guided translation does not use (DDIM, eta 0, one deterministic pass)
_UNUSED = ("eta", "spacing", "clip", "draws", "precision", "noise")


@dataclass
class GuidedSampling(SamplingConfig):
    """``model.sampling`` of a guided model: DDIM from ``t_start`` over ``steps`` plus the guidance fields.

    Attributes (besides ``t_start`` (inversion / noising depth, FIELD-NOTES: 25-75 % of the chain), ``steps`` (DDIM
    steps between ``t_start`` and 0; the same respaced list inverts and denoises; None = every timestep) and ``seed``
    (of the ``q_sample`` noise when ``invert=False``)):
        guidance_scale: ``w >= 0``; 0 = unconditional, 1 = plain conditional, > 1 extrapolates toward healthy.
        invert: DDIM-invert with the null class (True) or noise with ``q_sample`` (False).
        target_class: class to translate toward (0 = CN).
    """

    steps: int | None = 50
    t_start: int | None = 500
    guidance_scale: float = 3.0
    invert: bool = True
    target_class: int = 0

    def validate(self, num_train_timesteps: int | None = None, where: str = "model.sampling") -> GuidedSampling:
        super().validate(num_train_timesteps, where)
        _check_guidance(self.guidance_scale, f"{where}.guidance_scale")
        if self.sampler != "ddim" or self.t_start is None:
            raise ConfigError(f"{where}: a guided translation runs DDIM from a depth; set sampler: ddim and an "
                              f"integer t_start (got sampler={self.sampler!r}, t_start={self.t_start!r}).")
        return self


def _check_guidance(w: Any, name: str) -> None:
    if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
        raise ConfigError(f"{name}={w!r} must be a finite number >= 0 (0 = unconditional, 1 = conditional, "
                          "~3 = the seed's healthy translation).")


def net_num_class_embeds(net: nn.Module) -> int | None:
    """Rows of the net's class embedding (MONAI ``DiffusionModelUNet`` or diffusers ``UNet2DModel``), or None."""
    for mod in (net, getattr(net, "unet", None)):
        if mod is None:
            continue
        n = getattr(mod, "num_class_embeds", None)
        if n is None and hasattr(mod, "config"):
            n = getattr(mod.config, "num_class_embeds", None)
        if n is not None:
            return int(n)
        emb = getattr(mod, "class_embedding", None)
        if isinstance(emb, nn.Embedding):
            return int(emb.num_embeddings)
    return None


class GuidedDiffusion(DiffusionModule):
    """Class-conditional DDPM with a null class, translated toward healthy with classifier-free guidance.

    Args (besides :class:`~meddiff.models.base.DiffusionModule`'s; ``sampling`` holds :class:`GuidedSampling`
    fields, ``val_batches`` validation batches spread evenly over each loader are translated and scored for
    ``val/auroc``, label CN vs other; 0 = loss only):
        The net must be built with ``num_class_embeds = num_classes + 1`` (the last index is the null class).
        num_classes: number of real classes (5 for ADNI: CN, EMCI, MCI, LMCI, AD).
        cond_drop_prob: probability in ``[0, 1]`` that a training label is replaced by the null class.
        scoring: :class:`~meddiff.anomaly.scoring.ScoringConfig` fields of ``val/auroc`` and the protocol.
        aucp_rho: share of healthy images in the unannotated pool, if known (``val/aucp_debiased``).

    Batches carry ``image [B, 1, H, W] in [-1, 1]`` and ``class_label`` int64 ``[B]`` in ``[0, num_classes)``;
    for ``val/auroc`` also ``label`` (0 CN / 1 other) and optionally ``brain_mask``.
    """

    eval_protocol: str = "guided"
    sampling_class = GuidedSampling

    def __init__(
        self,
        *args: Any,
        num_classes: int = 5,
        cond_drop_prob: float = 0.2,
        val_batches: int | None = 4,
        scoring: Mapping[str, Any] | None = None,
        aucp_rho: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, val_batches=val_batches, **kwargs)
        self.anomaly_val = AnomalyValidation(scoring, aucp_rho)
        if isinstance(num_classes, bool) or int(num_classes) < 1:
            raise ConfigError(f"model.num_classes={num_classes!r} must be an integer >= 1 (5 for ADNI).")
        self.num_classes = int(num_classes)
        n_embeds = net_num_class_embeds(self.net)
        if n_embeds != self.num_classes + 1:
            raise ConfigError(
                f"net.num_class_embeds={n_embeds} but a guided model with model.num_classes={self.num_classes} "
                f"needs net.num_class_embeds={self.num_classes + 1} (the last index is the null class)."
            )
        p = float(cond_drop_prob)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(
                f"model.cond_drop_prob={cond_drop_prob!r} must be in [0, 1] (FIELD-NOTES: 0.1-0.35)."
            )
        self.cond_drop_prob = p
        self.check_both_samplings()

    def check_sampling(self, cfg: SamplingConfig, where: str) -> None:
        cfg.require_unset(_UNUSED, "a guided translation (DDIM, eta 0, one pass)", where)
        if not 0 <= int(cfg.target_class) < self.num_classes:
            raise ConfigError(f"{where}.target_class={cfg.target_class!r} is outside [0, {self.num_classes}); 0 is "
                              "CN (healthy).")

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) class: ``num_classes``."""
        return self.num_classes

    # ------------------------------------------------------------------ hooks
    def class_labels(self, batch: Mapping[str, Any], train: bool) -> torch.Tensor:
        """``[B]`` int64 class ids; in training each is dropped to the null class with ``cond_drop_prob``.

        A batch without ``class_label`` is a ``DataError`` in training and gets the null class otherwise.
        """
        x = batch["image"]
        if "class_label" not in batch:
            if train:
                raise DataError(
                    "a guided model trains on batches with 'class_label' (int64 [B], 0..num_classes-1); this batch "
                    f"has keys {sorted(batch)}. Use a DataModule that yields class labels (e.g. adni_slices)."
                )
            return torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        labels = batch["class_label"].to(device=x.device, dtype=torch.long).reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(
                f"class_label values {sorted(set(labels.tolist()))[:8]} are outside [0, {self.num_classes}); "
                f"model.num_classes={self.num_classes}."
            )
        if train and self.cond_drop_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cond_drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return labels

    # ------------------------------------------------------------------ translation
    def guided_fn(self, target_class: int, guidance_scale: float):
        """``fn(x_t [B, C, H, W], t [B]) -> output`` = ``cfg_combine(out_null, out_target, w)``.

        Null and target branches run in one forward pass of ``2B`` items (EMA weights in eval mode).
        """

        def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = x_t.shape[0]
            labels = torch.cat(
                [
                    torch.full((b,), self.null_class, dtype=torch.long, device=x_t.device),
                    torch.full((b,), int(target_class), dtype=torch.long, device=x_t.device),
                ]
            )
            out = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), labels)
            out_null, out_cond = out[:b], out[b:]
            return cfg_combine(out_null, out_cond, guidance_scale)

        return fn

    def null_fn(self):
        """``fn(x_t, t) -> output`` of the null (unconditional) branch, used for DDIM inversion."""

        def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            labels = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
            return self.denoiser(x_t, t, labels)

        return fn

    @torch.no_grad()
    def healthy_counterfactual(
        self,
        x0: torch.Tensor,
        cfg: GuidedSampling | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Translate ``x0 [B, C, H, W] in [-1, 1]`` toward ``cfg.target_class``; returns ``[B, C, H, W]`` in [-1, 1].

        ``cfg`` defaults to ``model.sampling``; a protocol passes a changed copy
        (``dataclasses.replace(model.sampling, guidance_scale=...)``), validated here (``guidance_scale < 0`` ->
        ConfigError) and never stored. ``generator`` seeds the ``q_sample`` noise (``invert=False``; default
        ``cfg.seed``).
        """
        cfg = self.sampling if cfg is None else cfg
        self.check_sampling(cfg.validate(self.schedule.num_train_timesteps), "sampling")
        steps = make_partial_timesteps(int(cfg.t_start), cfg.steps)  # descending, starts at t_start
        if cfg.invert:
            x_t = ddim_invert(self.null_fn(), self.schedule, x0, steps.flip(0))
        else:
            if generator is None:
                generator = torch.Generator(device=x0.device).manual_seed(int(cfg.seed))
            t = torch.full((x0.shape[0],), int(cfg.t_start), dtype=torch.long, device=x0.device)
            x_t = self.schedule.q_sample(x0, t, gaussian_like(x0, generator=generator))
        fn = self.guided_fn(int(cfg.target_class), float(cfg.guidance_scale))
        out = sample(fn, self.schedule, x_t, steps, sampler="ddim", eta=0.0)
        return out.clamp(-1.0, 1.0)

    def reconstruct(self, batch: Mapping[str, Any], sampling: GuidedSampling | None = None) -> torch.Tensor:
        """Healthy counterfactual of ``batch['image']`` with ``sampling`` (default ``model.sampling``):
        ``[B, C, H, W] in [-1, 1]``."""
        return self.healthy_counterfactual(batch["image"], sampling)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Healthy (CN) loss on every batch; translation and ``val/auroc`` (CN vs other) on ``val_batches`` batches
        spread over each validation loader (with ``data.aucp_holdout`` the known-healthy pool's too: ``val/aucp``)."""
        self.anomaly_val.step(self, batch, batch_idx, dataloader_idx, spread=True)

