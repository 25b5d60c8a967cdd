"""The DAE family's own pieces: coarse noise is coarse, the net is one forward at t=0, sampling fields refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError
from meddiff.models.dae import DenoisingAutoencoder, coarse_noise


def test_coarse_noise_has_the_shape_std_and_smoothness_asked_for():
    x = torch.zeros(64, 1, 32, 32)
    n = coarse_noise(x, 8, 0.2, torch.Generator().manual_seed(0))
    assert n.shape == x.shape
    assert 0.1 < float(n.std()) < 0.25  # bilinear interpolation lowers the per-pixel std a little
    # neighbouring pixels are strongly correlated (white noise would give ~0)
    corr = torch.corrcoef(torch.stack([n[..., :-1].flatten(), n[..., 1:].flatten()]))[0, 1]
    assert corr > 0.9
    again = coarse_noise(x, 8, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(n, again)
    assert coarse_noise(torch.zeros(2, 1, 5, 7), 16, 0.2).shape == (2, 1, 5, 7)  # coarser than the image


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen_t: list[torch.Tensor] = []
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t, class_labels=None):
        self.seen_t.append(t)
        return self.w * x


def test_reconstruct_is_one_clamped_forward_at_t0_and_sampling_fields_are_refused():
    net = _Net()
    model = DenoisingAutoencoder(net, NoiseSchedule(num_train_timesteps=100), ema_decay=0.0).eval()
    x = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    out = model.reconstruct({"image": x})
    assert torch.equal(out, (2 * x).clamp(-1, 1)) and len(net.seen_t) == 1 and int(net.seen_t[0].abs().sum()) == 0
    with pytest.raises(ConfigError, match="draws"):
        DenoisingAutoencoder(_Net(), NoiseSchedule(num_train_timesteps=100), sampling={"draws": 4})
    with pytest.raises(ConfigError, match="noise_downsample"):
        DenoisingAutoencoder(_Net(), NoiseSchedule(num_train_timesteps=100), noise_downsample=0)
