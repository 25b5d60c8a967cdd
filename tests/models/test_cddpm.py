"""cDDPM: the denoiser is conditioned on the clean input through the encoder's latent, inside one wrapped net."""

from __future__ import annotations

import pytest
import torch

from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError
from meddiff.models.cddpm import ConditionedDDPM, LatentConditionedNet
from meddiff.nets import MonaiUNet


def _net(in_channels: int) -> MonaiUNet:
    return MonaiUNet(in_channels=in_channels, out_channels=1, channels=[8, 16], attention_levels=[False, False],
                     num_res_blocks=1, norm_num_groups=8, num_head_channels=8)


def test_the_latent_of_the_clean_input_conditions_the_denoiser():
    torch.manual_seed(0)
    model = ConditionedDDPM(_net(5), NoiseSchedule(num_train_timesteps=100), latent_dim=4, encoder_channels=[8],
                            sampling={"sampler": "ddim", "t_start": 20, "steps": 2}, ema_decay=0.0).eval()
    assert isinstance(model.net, LatentConditionedNet)  # EMA and checkpoints see the encoder with the denoiser
    with torch.no_grad():  # MONAI zero-initialises the output layer: give every weight a value
        for p in model.net.parameters():
            p.normal_(0, 0.2)
    x_t = torch.randn(2, 1, 16, 16)
    t = torch.full((2,), 10)
    fn_a = model.model_fn({"image": torch.zeros(2, 1, 16, 16)})
    fn_b = model.model_fn({"image": torch.ones(2, 1, 16, 16)})
    with torch.no_grad():
        assert not torch.allclose(fn_a(x_t, t), fn_b(x_t, t))  # same x_t, other clean input: other prediction
    out = model.reconstruct({"image": torch.rand(2, 1, 16, 16) * 2 - 1})
    assert out.shape == (2, 1, 16, 16) and out.abs().max() <= 1


def test_channel_and_patch_mistakes_are_config_errors():
    with pytest.raises(ConfigError, match="net.in_channels=5"):
        ConditionedDDPM(_net(2), NoiseSchedule(num_train_timesteps=100), latent_dim=4,
                        sampling={"sampler": "ddim", "t_start": 20, "steps": 2})
    with pytest.raises(ConfigError, match="patch_size=null"):
        ConditionedDDPM(_net(5), NoiseSchedule(num_train_timesteps=100), latent_dim=4, patch_size=8,
                        sampling={"sampler": "ddim", "t_start": 20, "steps": 2})
