"""Conditioned DDPM (cDDPM; Behrendt et al. 2024, "Guided reconstruction with conditioned diffusion models for
unsupervised anomaly detection in brain MRIs").

The denoiser sees, besides ``x_t``, a learned latent of the *noise-free* input: an encoder maps the clean image to a
``latent_dim`` vector, which reaches the UNet as ``latent_dim`` spatially constant channels beside ``x_t``. The latent
is a global bottleneck: enough to carry the image's intensity and contrast (so the healthy reconstruction keeps the
input's intensities and the residual of healthy tissue stays small), too small to carry a lesion's shape. Training
is the DDPM loss with the encoder learned jointly (the encoder sits inside the wrapped net, so EMA and checkpoints
cover it); reconstruction is partial diffusion from ``sampling.t_start`` of the whole image (no patching needed),
exactly as in :class:`~meddiff.models.unconditional.UnconditionalDiffusion`, whose sampling and scoring it reuses.

Shapes: ``image [B, C, H, W]`` in ``[-1, 1]``; the wrapped net must take ``C + latent_dim`` input channels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from meddiff.errors import ConfigError
from meddiff.models.conditional import net_in_channels
from meddiff.models.unconditional import UnconditionalDiffusion

__all__ = ["ConditionedDDPM", "LatentConditionedNet", "LatentEncoder"]


class LatentEncoder(nn.Module):
    """Strided conv encoder: ``[B, C, H, W] -> [B, latent_dim]`` (global average pooled, then linear)."""

    def __init__(self, in_channels: int, latent_dim: int, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LatentConditionedNet(nn.Module):
    """``forward(cat([x_t, x0]), t) = net(cat([x_t, broadcast(encoder(x0))]), t)``: one module, so the EMA copy and
    checkpoints hold the encoder with the denoiser. ``image_channels`` splits the input into ``x_t`` and ``x0``."""

    def __init__(self, net: nn.Module, encoder: nn.Module, image_channels: int) -> None:
        super().__init__()
        self.net, self.encoder, self.image_channels = net, encoder, image_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x_t, x0 = x[:, : self.image_channels], x[:, self.image_channels :]
        z = self.encoder(x0)
        zmap = z[:, :, None, None].expand(-1, -1, *x_t.shape[-2:]).to(x_t.dtype)
        return self.net(torch.cat([x_t, zmap], dim=1), t, class_labels)


class ConditionedDDPM(UnconditionalDiffusion):
    """cDDPM: partial-diffusion reconstruction by a denoiser conditioned on a latent of the clean input.

    Args (besides :class:`~meddiff.models.unconditional.UnconditionalDiffusion`'s):
        image_channels: channels ``C`` of the image.
        latent_dim: size of the encoder's latent (= the extra input channels of ``net``: ``net.in_channels`` must
            be ``image_channels + latent_dim``).
        encoder_channels: widths of the encoder's strided convolutions.
    """

    # the clean image is the conditioning: gathered per item when patches or draws index the batch
    conditioning_keys = ("image",)

    def __init__(self, net: nn.Module, *args: Any, image_channels: int = 1, latent_dim: int = 16,
                 encoder_channels: Sequence[int] = (16, 32, 64), **kwargs: Any) -> None:
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ConfigError(f"model.latent_dim={latent_dim!r} must be an integer >= 1 (e.g. 16).")
        expected = net_in_channels(net)
        if expected is not None and expected != image_channels + latent_dim:
            raise ConfigError(f"net.in_channels={expected} but cDDPM feeds x_t ({image_channels}) + the latent "
                              f"({latent_dim}) channels; set net.in_channels={image_channels + latent_dim}.")
        wrapped = LatentConditionedNet(net, LatentEncoder(image_channels, latent_dim, list(encoder_channels)),
                                       image_channels)
        super().__init__(wrapped, *args, **kwargs)
        if self.patch_size is not None:
            raise ConfigError("cDDPM reconstructs whole images (the latent carries the input's intensities); set "
                              "model.patch_size=null.")

    def net_input(self, x_t: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        return torch.cat([x_t, batch["image"].to(x_t.dtype)], dim=1)
