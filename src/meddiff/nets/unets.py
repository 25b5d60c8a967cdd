"""Denoiser backbones behind one call signature.

Every builder returns an ``nn.Module`` with
``forward(x [B, C_in, H, W], t LongTensor [B], class_labels LongTensor [B] | None) -> [B, C_out, H, W]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from meddiff.errors import ConfigError

PRETRAINED_HELP = (
    "Download the weights once on a machine with internet, e.g.\n"
    "  huggingface-cli download google/ddpm-ema-celebahq-256 --local-dir /weights/ddpm-ema-celebahq-256\n"
    "copy the folder here, and pass net.pretrained_dir=/weights/ddpm-ema-celebahq-256 "
    "(the folder holds config.json and diffusion_pytorch_model.safetensors). meddiff never downloads at run time."
)


class MonaiUNet(nn.Module):
    """MONAI ``DiffusionModelUNet`` (2D or 3D) with the project's call signature.

    ``num_class_embeds`` adds a class embedding (for classifier-free guidance pass ``num_classes + 1`` so the last
    index is the null class).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256),
        attention_levels: Sequence[bool] | None = None,
        num_res_blocks: int | Sequence[int] = 2,
        norm_num_groups: int = 32,
        num_head_channels: int | Sequence[int] = 32,
        num_class_embeds: int | None = None,
        spatial_dims: int = 2,
        resblock_updown: bool = False,
        dropout: float = 0.0,  # accepted for config symmetry; MONAI's UNet has no dropout on res blocks
    ) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        channels = tuple(int(c) for c in channels)
        if attention_levels is None:
            attention_levels = tuple(i >= len(channels) - 1 for i in range(len(channels)))
        attention_levels = tuple(bool(a) for a in attention_levels)
        if len(attention_levels) != len(channels):
            raise ConfigError(
                f"net.attention_levels has {len(attention_levels)} entries but net.channels has {len(channels)}; "
                "give one bool per level."
            )
        bad = [c for c in channels if c % norm_num_groups]
        if bad:
            raise ConfigError(
                f"net.channels {list(channels)} must be multiples of net.norm_num_groups={norm_num_groups}; "
                f"{bad} are not. Lower norm_num_groups or change channels."
            )
        if isinstance(num_res_blocks, int):
            num_res_blocks = (num_res_blocks,) * len(channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_levels = len(channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=tuple(num_res_blocks),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            num_class_embeds=num_class_embeds,
            resblock_updown=resblock_updown,
        )

    @property
    def downsample_factor(self) -> int:
        """Spatial sizes must be divisible by this."""
        return 2 ** (self.num_levels - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, timesteps=t, class_labels=class_labels)


class DiffusersUNet(nn.Module):
    """diffusers ``UNet2DModel``, built from scratch or loaded from a local pretrained folder.

    Grayscale <-> 3-channel adaptation: when the data has ``data_channels`` channels and the net expects 3
    (e.g. ``google/ddpm-ema-celebahq-256``), a 1-channel input is repeated to 3 channels and the 3-channel output
    averaged back to 1, so the same checkpoint serves one-window and three-window CT.
    """

    def __init__(
        self,
        pretrained_dir: str | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        sample_size: int = 64,
        block_out_channels: Sequence[int] = (64, 128, 256),
        layers_per_block: int = 2,
        attention_levels: Sequence[bool] | None = None,
        norm_num_groups: int = 32,
        num_class_embeds: int | None = None,
        data_channels: int | None = None,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        if pretrained_dir:
            folder = Path(pretrained_dir).expanduser()
            if not (folder / "config.json").is_file():
                raise ConfigError(f"Pretrained UNet folder {str(folder)!r} is missing or has no config.json.\n" + PRETRAINED_HELP)
            self.unet = UNet2DModel.from_pretrained(str(folder), local_files_only=True)
        else:
            n = len(block_out_channels)
            attention_levels = attention_levels or [i == n - 1 for i in range(n)]
            self.unet = UNet2DModel(
                sample_size=sample_size,
                in_channels=in_channels,
                out_channels=out_channels,
                block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block,
                down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
                up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
                norm_num_groups=norm_num_groups,
                num_class_embeds=num_class_embeds,
            )
        self.net_in = int(self.unet.config.in_channels)
        self.net_out = int(self.unet.config.out_channels)
        self.data_channels = int(data_channels or self.net_in)
        if self.data_channels not in (self.net_in, 1) or (self.data_channels == 1 and self.net_in != 3):
            if self.data_channels != self.net_in:
                raise ConfigError(
                    f"data has {self.data_channels} channels but the diffusers UNet expects {self.net_in}; "
                    "only 1 <-> 3 channel adaptation is supported. Set data channels to match."
                )
        self.num_levels = len(self.unet.config.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] != self.net_in:
            x = x.repeat(1, self.net_in // x.shape[1], 1, 1)
        out = self.unet(x, t, class_labels=class_labels).sample
        if self.data_channels != self.net_out:
            out = out.mean(dim=1, keepdim=True)
        return out


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
