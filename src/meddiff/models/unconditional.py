"""Unconditional DDPM and patched DDPM (pDDPM) for reconstruction-based anomaly detection.

Whole-image DDPM: noise the image to t, learn to denoise it. Patched DDPM (Behrendt et al., MIDL 2023): noise
the whole image, keep only one patch of the grid noisy inside the otherwise clean image, and count the loss on
that patch only; at test time every patch of the grid is noised in turn (all of them in one batched pass) and
the patch predictions are stitched (``meddiff.anomaly.reconstruction``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from meddiff.errors import ConfigError
from meddiff.models.anomaly import PartialDiffusionReconstruction
from meddiff.patches import patch_masks


class UnconditionalDiffusion(PartialDiffusionReconstruction):
    """DDPM / pDDPM. ``patch_size=None`` trains whole-image DDPM; an int trains pDDPM on the grid of
    ``patch_size`` x ``patch_size`` patches with ``patch_stride`` (default = patch size).

    Reconstruction uses ``recon.patch_size`` (defaults to the training patch) so a model trained patched is
    evaluated patched unless the config says otherwise.
    """

    def __init__(self, *args, patch_size: int | None = None, patch_stride: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if patch_size is not None and patch_size < 1:
            raise ConfigError(f"model.patch_size={patch_size} must be a positive number of pixels or null.")
        # a stride of 0 used to become the patch size silently (``0 or patch_size``)
        _check_stride("model.patch_stride", patch_stride, "the patch size (non-overlapping patches)")
        recon_stride = self.recon_cfg.stride
        _check_stride("model.recon.stride", recon_stride, "the training stride")
        self.patch_size = patch_size
        self.patch_stride = patch_size if patch_stride is None else int(patch_stride)
        if self.recon_cfg.patch_size is None and patch_size is not None:
            self.recon_cfg = replace(self.recon_cfg, patch_size=patch_size,
                                     stride=self.patch_stride if recon_stride is None else recon_stride)
        self._masks: torch.Tensor | None = None

    def loss_region(self, x0: torch.Tensor) -> torch.Tensor | None:
        if self.patch_size is None:
            return None
        b, _, h, w = x0.shape
        if self._masks is None or self._masks.shape[-2:] != (h, w) or self._masks.device != x0.device:
            self._masks = patch_masks(h, w, self.patch_size, self.patch_stride, device=x0.device)
        which = torch.randint(0, self._masks.shape[0], (b,), device=x0.device)
        return self._masks[which]


def _check_stride(name: str, value: object, default: str) -> None:
    """A patch stride is null or an integer >= 1 (pixels between patch origins); ConfigError naming ``name``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1 (pixels between patch origins), or null for "
                          f"{default}.")
