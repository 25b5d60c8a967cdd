"""Brainomaly's GAN parts (Siddiquee et al., WACV 2024; StarGAN-style): an additive-map generator and a PatchGAN
critic. Widths and depths are configurable so CPU demos can use small versions.

Generator ``G``: 7x7 conv (``conv_dim``) -> ``num_down`` stride-2 4x4 downsamplings (doubling the width: 128, 256
for ``conv_dim=64``) -> ``num_res_blocks`` residual blocks (3x3 conv + InstanceNorm) -> ``num_down`` stride-2
transposed-conv upsamplings -> 7x7 conv to ``channels`` = the additive map ``m``. The healthy estimate is
``tanh(x + m)`` (:meth:`BrainomalyGenerator.healthy`).

Critic ``D`` (WGAN-GP, so no sigmoid and no normalisation layers): ``num_layers`` stride-2 4x4 convs with
LeakyReLU(0.01), widths ``conv_dim * 2**i`` (capped at ``max_dim``), then a 3x3 conv to one channel: a map of patch
scores ``[B, 1, H / 2**num_layers, W / 2**num_layers]``.

InstanceNorm here does not track running statistics (StarGAN's ``track_running_stats=True`` makes eval mode use
batch-averaged statistics that training never used); images are normalised per image in train and eval alike.
"""

from __future__ import annotations

import torch
from torch import nn

from meddiff.errors import ConfigError


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise ConfigError(f"net.{name}={v!r} must be an integer >= 1.")


class ResidualBlock(nn.Module):
    """``x + IN(conv3x3(ReLU(IN(conv3x3(x)))))`` at constant width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            nn.InstanceNorm2d(dim, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            nn.InstanceNorm2d(dim, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class BrainomalyGenerator(nn.Module):
    """Additive-map generator: ``forward(x) -> m`` and ``healthy(x) = tanh(x + m)``.

    Args:
        channels: image channels (1 grayscale, 3 RGB); the map has as many.
        conv_dim: width of the first 7x7 conv (64 in Brainomaly).
        num_down: stride-2 downsamplings (and as many upsamplings); 2 in Brainomaly. Inputs must have H and W
            divisible by ``2**num_down``.
        num_res_blocks: residual blocks at the lowest resolution (6 in Brainomaly).
    """

    def __init__(self, channels: int = 1, conv_dim: int = 64, num_down: int = 2, num_res_blocks: int = 6) -> None:
        super().__init__()
        _check_positive(channels=channels, conv_dim=conv_dim, num_down=num_down, num_res_blocks=num_res_blocks)
        self.channels, self.num_down = int(channels), int(num_down)
        layers: list[nn.Module] = [
            nn.Conv2d(channels, conv_dim, 7, 1, 3, bias=False),
            nn.InstanceNorm2d(conv_dim, affine=True),
            nn.ReLU(inplace=True),
        ]
        dim = conv_dim
        for _ in range(num_down):
            layers += [nn.Conv2d(dim, dim * 2, 4, 2, 1, bias=False), nn.InstanceNorm2d(dim * 2, affine=True),
                       nn.ReLU(inplace=True)]
            dim *= 2
        layers += [ResidualBlock(dim) for _ in range(num_res_blocks)]
        for _ in range(num_down):
            layers += [nn.ConvTranspose2d(dim, dim // 2, 4, 2, 1, bias=False), nn.InstanceNorm2d(dim // 2, affine=True),
                       nn.ReLU(inplace=True)]
            dim //= 2
        layers.append(nn.Conv2d(dim, channels, 7, 1, 3, bias=False))
        self.main = nn.Sequential(*layers)

    @property
    def downsample_factor(self) -> int:
        """H and W must be divisible by this."""
        return 2**self.num_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Additive map ``m [B, C, H, W]`` (unbounded) for ``x [B, C, H, W] in [-1, 1]``."""
        h, w = x.shape[-2:]
        f = self.downsample_factor
        if h % f or w % f:
            raise ConfigError(
                f"image size {h}x{w} is not divisible by {f} (2**net.num_down); set data.image_size to a multiple of {f}."
            )
        return self.main(x)

    def healthy(self, x: torch.Tensor) -> torch.Tensor:
        """Healthy estimate ``tanh(x + m)``: ``[B, C, H, W] in (-1, 1)``."""
        return torch.tanh(x + self(x))


class PatchCritic(nn.Module):
    """PatchGAN critic for WGAN-GP: ``forward(x [B, C, H, W]) -> [B, 1, H / 2**L, W / 2**L]`` patch scores.

    Args:
        channels: image channels. conv_dim: width of the first conv (64 in Brainomaly).
        num_layers: stride-2 4x4 convs (6 in Brainomaly at 128-256 px); H and W must be divisible by ``2**L``.
        max_dim: cap on the width (``conv_dim * 2**i`` grows per layer).
    """

    def __init__(self, channels: int = 1, conv_dim: int = 64, num_layers: int = 6, max_dim: int = 2048) -> None:
        super().__init__()
        _check_positive(channels=channels, conv_dim=conv_dim, num_layers=num_layers, max_dim=max_dim)
        self.num_layers = int(num_layers)
        layers: list[nn.Module] = []
        dim_in, dim = channels, conv_dim
        for _ in range(num_layers):
            layers += [nn.Conv2d(dim_in, dim, 4, 2, 1), nn.LeakyReLU(0.01)]
            dim_in, dim = dim, min(dim * 2, max_dim)
        layers.append(nn.Conv2d(dim_in, 1, 3, 1, 1, bias=False))
        self.main = nn.Sequential(*layers)

    @property
    def downsample_factor(self) -> int:
        return 2**self.num_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = self.downsample_factor
        if h % f or w % f:
            raise ConfigError(
                f"image size {h}x{w} is not divisible by {f} (2**critic.num_layers); lower net.critic.num_layers or "
                f"use an image size that is a multiple of {f}."
            )
        return self.main(x)
