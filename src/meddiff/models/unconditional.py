"""Unconditional DDPM and patched DDPM (pDDPM) for reconstruction-based anomaly detection.

Whole-image DDPM: noise the image to t, learn to denoise it. Patched DDPM (Behrendt et al., MIDL 2023): noise
the whole image, keep only one patch of the grid noisy inside the otherwise clean image, and count the loss on
that patch only; at test time every patch of the grid is noised in turn (all of them in one batched pass) and
the patch predictions are stitched (``meddiff.diffusion.partial``).

Composition: ``model.sampling`` is a :class:`~meddiff.diffusion.partial.PartialSampling` (the depth ``t_start``,
sampler, draws, ... and the pDDPM patch fields), validation scoring is the one
:class:`~meddiff.models.validation.AnomalyValidation` component (``self.anomaly_val``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from meddiff.diffusion.partial import PartialSampling, partial_reconstruct
from meddiff.diffusion.sampling import AUTO
from meddiff.errors import ConfigError
from meddiff.models.base import DiffusionModule
from meddiff.models.validation import AnomalyValidation
from meddiff.patches import patch_masks
from meddiff.utils.cpu import bf16_support


class UnconditionalDiffusion(DiffusionModule):
    """DDPM / pDDPM. ``patch_size=None`` trains whole-image DDPM; an int trains pDDPM on the grid of
    ``patch_size`` x ``patch_size`` patches with ``patch_stride`` (default = patch size).

    Args (besides :class:`~meddiff.models.base.DiffusionModule`'s; ``sampling`` holds
    :class:`~meddiff.diffusion.partial.PartialSampling` fields):
        patch_size, patch_stride: the training patch grid (None = whole image).
        scoring: :class:`~meddiff.anomaly.scoring.ScoringConfig` fields for ``val/auroc`` (and the anomaly
            protocol's default setting).
        aucp_rho: share of healthy images in the unannotated pool, if known (logs ``val/aucp_debiased``).

    Reconstruction uses ``sampling.patch_size`` (defaults to the training patch) so a model trained patched is
    evaluated patched unless the config says otherwise.
    """

    eval_protocol: str = "anomaly"
    sampling_class = PartialSampling

    def __init__(self, *args: Any, patch_size: int | None = None, patch_stride: int | None = None,
                 scoring: Mapping[str, Any] | None = None, aucp_rho: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anomaly_val = AnomalyValidation(scoring, aucp_rho)
        if patch_size is not None and patch_size < 1:
            raise ConfigError(f"model.patch_size={patch_size} must be a positive number of pixels or null.")
        # a stride of 0 used to become the patch size silently (``0 or patch_size``)
        _check_stride("model.patch_stride", patch_stride, "the patch size (non-overlapping patches)")
        self.patch_size = patch_size
        self.patch_stride = patch_size if patch_stride is None else int(patch_stride)
        if self.sampling.patch_size is None and patch_size is not None:
            stride = self.sampling.stride
            self.sampling = replace(self.sampling, patch_size=patch_size,
                                    stride=self.patch_stride if stride is None else stride)
        self.validation_sampling().validate(self.schedule.num_train_timesteps, "model.val_sampling")
        self._masks: torch.Tensor | None = None

    def loss_region(self, x0: torch.Tensor) -> torch.Tensor | None:
        if self.patch_size is None:
            return None
        b, _, h, w = x0.shape
        if self._masks is None or self._masks.shape[-2:] != (h, w) or self._masks.device != x0.device:
            self._masks = patch_masks(h, w, self.patch_size, self.patch_stride, device=x0.device)
        which = torch.randint(0, self._masks.shape[0], (b,), device=x0.device)
        return self._masks[which]

    def reconstruct(self, batch: Mapping[str, Any], sampling: PartialSampling | None = None) -> torch.Tensor:
        """Healthy estimate of ``batch['image']`` by partial diffusion: ``[B, C, H, W] in [-1, 1]``.

        ``sampling`` (default ``model.sampling``) is used as given and never stored: a protocol trying other depths
        passes a copy (``dataclasses.replace(model.sampling, t_start=...)``).
        """
        cfg = self.sampling if sampling is None else sampling
        x = batch["image"]
        native = cfg.precision == AUTO and x.device.type == "cpu" and native_cpu_bf16()
        return partial_reconstruct(self.model_fn(batch), self.schedule, x, cfg, native_bf16=native)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.anomaly_val.step(self, batch, batch_idx, dataloader_idx)



@functools.cache
def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (read once: ``precision: auto`` runs bf16 only there)."""
    return bool(bf16_support()["native_bf16"])


def _check_stride(name: str, value: object, default: str) -> None:
    """A patch stride is null or an integer >= 1 (pixels between patch origins); ConfigError naming ``name``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1 (pixels between patch origins), or null for "
                          f"{default}.")
