"""Denoising autoencoder (DAE) for reconstruction-based anomaly detection (Kascenas et al., MIDL 2022).

A UNet learns to remove *coarse* noise from healthy images: Gaussian noise drawn on a grid ``noise_downsample``
times coarser than the image, upsampled bilinearly (and shifted by a random offset so the grid does not stay
aligned), then added to the image. Coarse noise looks like blob-shaped intensity changes, so the net learns to
undo lesion-sized deviations and leaves them visible in ``|x - DAE(x)|``. One forward per image at test time: the
strong non-diffusion reference that the diffusion UAD papers compare with.

Composition: the shared :class:`~meddiff.models.base.DiffusionModule` (net, optimizer, EMA, loss reduction, logging)
and :class:`~meddiff.models.validation.AnomalyValidation`; the network is the same ``net(x, t)`` denoiser the
diffusion families use, always called at ``t = 0`` (no diffusion chain: ``model.schedule`` is unused and
``model.sampling`` must stay at its defaults). The net predicts the clean image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from meddiff.diffusion.sampling import SamplingConfig
from meddiff.errors import ConfigError
from meddiff.models.base import DiffusionModule
from meddiff.models.validation import AnomalyValidation

__all__ = ["DenoisingAutoencoder", "coarse_noise"]


def coarse_noise(x: torch.Tensor, downsample: int, std: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Coarse Gaussian noise shaped like ``x [B, C, H, W]``: ``N(0, std^2)`` on a grid ``downsample`` times coarser
    (at least 1 x 1), upsampled bilinearly, at a random sub-cell offset per image."""
    b, c, h, w = x.shape
    gh, gw = max(1, -(-h // downsample)) + 1, max(1, -(-w // downsample)) + 1  # one spare cell for the shift
    g = torch.randn(b, c, gh, gw, generator=generator, device=x.device if generator is None else generator.device)
    g = g.to(device=x.device, dtype=torch.float32) * std
    up = F.interpolate(g, size=(gh * downsample, gw * downsample), mode="bilinear", align_corners=False)
    off = torch.randint(0, downsample, (2,), generator=generator,
                        device="cpu" if generator is None else generator.device).tolist()
    return up[..., off[0]:off[0] + h, off[1]:off[1] + w].to(x.dtype)


class DenoisingAutoencoder(DiffusionModule):
    """DAE: ``reconstruct(batch) = clamp(net(x, t=0), -1, 1)``, trained on ``x + coarse_noise`` -> ``x``.

    Args (besides :class:`~meddiff.models.base.DiffusionModule`'s):
        noise_downsample: the noise grid is this many times coarser than the image (Kascenas: 16 x 16 noise on
            128 x 128 images = 8).
        noise_std: standard deviation of the coarse noise on the ``[-1, 1]`` intensity scale (Kascenas: 0.2 on
            standardised images).
        scoring: :class:`~meddiff.anomaly.scoring.ScoringConfig` fields (``val/auroc`` and the protocol default).
        aucp_rho: share of healthy images in the unannotated pool, if known (``val/aucp_debiased``).
    """

    eval_protocol: str = "anomaly"

    def __init__(self, *args: Any, noise_downsample: int = 8, noise_std: float = 0.2,
                 scoring: Mapping[str, Any] | None = None, aucp_rho: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(noise_downsample, bool) or not isinstance(noise_downsample, int) or noise_downsample < 1:
            raise ConfigError(f"model.noise_downsample={noise_downsample!r} must be an integer >= 1 (e.g. 8: noise "
                              "on a grid 8x coarser than the image).")
        if not float(noise_std) > 0:
            raise ConfigError(f"model.noise_std={noise_std!r} must be > 0 (e.g. 0.2).")
        self.noise_downsample, self.noise_std = int(noise_downsample), float(noise_std)
        self.anomaly_val = AnomalyValidation(scoring, aucp_rho)
        self.check_both_samplings()

    def check_sampling(self, cfg: SamplingConfig, where: str) -> None:
        # one forward, no chain: a sampling field set here would be silently ignored
        cfg.require_unset(("sampler", "steps", "t_start", "draws", "eta", "clip"), "the DAE (one forward pass)",
                          where)

    def _denoise(self, x: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.denoiser(self.net_input(x, batch), t, None)

    def diffusion_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The DAE loss (name kept for the base's training/validation steps): ``loss(net(x + coarse), x)``."""
        x0 = batch["image"]
        noisy = x0 + coarse_noise(x0, self.noise_downsample, self.noise_std, generator)
        return self._reduce_loss(self._denoise(noisy, batch), x0, None)

    def reconstruct(self, batch: Mapping[str, Any], sampling: SamplingConfig | None = None) -> torch.Tensor:
        """Healthy estimate ``[B, C, H, W] in [-1, 1]``: one forward of the (EMA) net on the clean input."""
        x = batch["image"]
        return self._denoise(x, batch).clamp(-1.0, 1.0).to(x.dtype)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.anomaly_val.step(self, batch, batch_idx, dataloader_idx)

