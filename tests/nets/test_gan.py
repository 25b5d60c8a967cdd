"""Brainomaly's GAN parts: shapes, the additive healthy map, configurable widths, bad sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meddiff.errors import ConfigError
from meddiff.nets.gan import BrainomalyGenerator, PatchCritic


@pytest.mark.parametrize("channels", [1, 3])
def test_generator_map_and_healthy_keep_the_input_shape(channels):
    g = BrainomalyGenerator(channels=channels, conv_dim=8, num_down=2, num_res_blocks=2)
    x = torch.rand(2, channels, 32, 32) * 2 - 1
    m = g(x)
    h = g.healthy(x)
    assert m.shape == h.shape == x.shape
    assert h.abs().max() < 1
    assert torch.allclose(h, torch.tanh(x + m))


def test_generator_layout_is_brainomalys():
    g = BrainomalyGenerator()  # the published sizes
    convs = [m for m in g.main if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size == (7, 7) and convs[0].out_channels == 64
    assert [c.out_channels for c in convs[1:3]] == [128, 256] and all(c.stride == (2, 2) for c in convs[1:3])
    assert convs[-1].kernel_size == (7, 7) and convs[-1].out_channels == 1
    blocks = [m for m in g.main if type(m).__name__ == "ResidualBlock"]
    assert len(blocks) == 6
    assert any(isinstance(m, nn.InstanceNorm2d) for m in blocks[0].modules())
    ups = [m for m in g.main if isinstance(m, nn.ConvTranspose2d)]
    assert [u.out_channels for u in ups] == [128, 64]


def test_widths_are_configurable():
    small = sum(p.numel() for p in BrainomalyGenerator(conv_dim=8, num_res_blocks=1).parameters())
    big = sum(p.numel() for p in BrainomalyGenerator(conv_dim=16, num_res_blocks=1).parameters())
    assert big > 3 * small


def test_critic_patch_scores_shape_and_layers():
    d = PatchCritic(channels=1, conv_dim=8, num_layers=3)
    out = d(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 1, 4, 4)
    acts = [m for m in d.main if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 3 and all(a.negative_slope == 0.01 for a in acts)
    last = d.main[-1]
    assert isinstance(last, nn.Conv2d) and last.kernel_size == (3, 3) and last.out_channels == 1
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in d.modules())  # WGAN-GP critic


def test_sizes_not_divisible_are_config_errors():
    with pytest.raises(ConfigError, match="divisible by 4"):
        BrainomalyGenerator(conv_dim=8, num_res_blocks=1)(torch.zeros(1, 1, 30, 30))
    with pytest.raises(ConfigError, match="num_layers"):
        PatchCritic(conv_dim=8, num_layers=4)(torch.zeros(1, 1, 24, 24))
    with pytest.raises(ConfigError, match="conv_dim"):
        BrainomalyGenerator(conv_dim=0)
