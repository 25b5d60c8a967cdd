"""Exponential moving average of a network's weights, kept inside the LightningModule.

Kept as a plain submodule (not Lightning's ``EMAWeightAveraging`` callback) so that it is saved in every
checkpoint's ``state_dict``, restored on resume, used by evaluation straight from a checkpoint, and pickles
under ``ddp_spawn`` (the callback does not).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``shadow = decay * shadow + (1 - decay) * online`` after every optimizer step.

    ``warmup``: the effective decay is ``min(decay, (1 + n) / (10 + n))`` for update ``n`` so early averages are
    not dominated by the random initialisation (as in the DDPM reference implementations).
    """

    def __init__(self, net: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            from meddiff.errors import ConfigError

            raise ConfigError(f"model.ema_decay={decay} must be in [0, 1); use 0.999 (or 0 to disable EMA).")
        self.decay = decay
        self.warmup = warmup
        self.shadow = copy.deepcopy(net)
        self.shadow.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        n = int(self.num_updates)
        decay = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        online = [p.detach() for p in net.parameters()]
        shadow = list(self.shadow.parameters())
        torch._foreach_lerp_(shadow, online, 1.0 - decay)
        for b_s, b_o in zip(self.shadow.buffers(), net.buffers()):
            b_s.copy_(b_o)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
