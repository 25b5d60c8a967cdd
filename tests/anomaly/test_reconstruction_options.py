"""Reconstruction options used by the demo: the noise-draw ensemble (n_noise), the network's precision, and the
model's cheaper per-epoch validation reconstruction (model.val_recon)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from meddiff.anomaly.reconstruction import ReconstructionConfig, reconstruct
from meddiff.errors import ConfigError
from meddiff.models import UnconditionalDiffusion
from meddiff.nets import build_net


class Recorder:
    """x0-predicting stand-in for a network: returns the noisy input and records how it was called."""

    def __init__(self) -> None:
        self.autocast: list[bool] = []
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return x_t.clone()


def _x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(2, 1, 8, 8) * 2 - 1


def test_n_noise_averages_independent_draws(schedule):
    """n draws cost n times the calls and shrink the spread of a noisy estimate by ~sqrt(n)."""
    x = _x()
    one, many = Recorder(), Recorder()
    r1 = reconstruct(one, schedule, x, ReconstructionConfig(t_start=60, patch_size=None))
    r16 = reconstruct(many, schedule, x, ReconstructionConfig(t_start=60, patch_size=None, n_noise=16))
    assert many.calls == 16 * one.calls
    # the stand-in returns x_t = sqrt(a) x + sqrt(1 - a) eps (clamped): the average over draws is much closer to its
    # mean sqrt(a) x than one draw is
    a = schedule.alphas_cumprod[60].sqrt()
    err1 = (r1 - (a * x).clamp(-1, 1)).abs().mean()
    err16 = (r16 - (a * x).clamp(-1, 1)).abs().mean()
    assert err16 < 0.5 * err1


def test_precision_none_leaves_the_callers_context(schedule):
    x = _x()
    rec = Recorder()
    reconstruct(rec, schedule, x, ReconstructionConfig(t_start=30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reconstruct(rec, schedule, x, ReconstructionConfig(t_start=30))
    assert rec.autocast == [False, True]


@pytest.mark.parametrize("name, expected", [("bf16", True), ("bf16-mixed", True), ("32", False), ("32-true", False)])
def test_precision_sets_autocast_around_the_network_only(schedule, name, expected):
    x = _x()
    rec = Recorder()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not expected):  # the opposite outside
        out = reconstruct(rec, schedule, x, ReconstructionConfig(t_start=30, precision=name))
    assert set(rec.autocast) == {expected}
    assert out.dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_native(schedule, monkeypatch, native):
    import meddiff.utils.cpu as cpu
    from meddiff.anomaly import reconstruction

    monkeypatch.setattr(cpu, "bf16_support", lambda flags=None: {"native_bf16": native, "flags": []})
    reconstruction.auto_dtype.cache_clear()
    try:
        rec = Recorder()
        reconstruct(rec, schedule, _x(), ReconstructionConfig(t_start=30, precision="auto"))
        assert set(rec.autocast) == {native}
    finally:
        reconstruction.auto_dtype.cache_clear()


def test_bf16_reconstruction_is_close_to_float32(tiny_net_cfg, schedule):
    torch.manual_seed(0)
    net = build_net(tiny_net_cfg).eval()
    for p in net.parameters():  # MONAI zero-initialises the output layer: give the net a non-trivial output
        torch.nn.init.normal_(p, std=0.05)
    fn = lambda xt, t, idx: net(xt, t)  # noqa: E731
    x = _x().repeat(1, 1, 2, 2)  # 16 x 16
    cfg = ReconstructionConfig(t_start=40, patch_size=8, stride=4, n_noise=2)
    r32 = reconstruct(fn, schedule, x, replace(cfg, precision="32"))
    rbf = reconstruct(fn, schedule, x, replace(cfg, precision="bf16"))
    assert rbf.dtype == torch.float32
    assert not torch.equal(r32, rbf)  # it really ran in bf16 ...
    torch.testing.assert_close(rbf, r32, atol=0.05, rtol=0)  # ... and stays close (same noise draws)
    torch.testing.assert_close(reconstruct(fn, schedule, x, cfg), r32)  # None outside autocast = float32


def test_bad_precision_is_a_config_error(schedule):
    with pytest.raises(ConfigError, match=r"recon.precision='fp8'"):
        reconstruct(Recorder(), schedule, _x(), ReconstructionConfig(t_start=30, precision="fp8"))


def _model(tiny_net_cfg, schedule, **kw) -> UnconditionalDiffusion:
    return UnconditionalDiffusion(net=build_net(tiny_net_cfg), schedule=schedule, ema_decay=0, **kw)


def test_val_recon_changes_only_the_validation_reconstruction(tiny_net_cfg, schedule, monkeypatch):
    model = _model(tiny_net_cfg, schedule, patch_size=8, recon={"t_start": 30, "n_noise": 4},
                   val_recon={"n_noise": 1, "t_start": 20})
    seen: list[ReconstructionConfig | None] = []
    monkeypatch.setattr(model, "reconstruct", lambda batch, recon=None: seen.append(recon) or batch["image"])
    batch = {"image": torch.zeros(4, 1, 16, 16), "label": torch.tensor([0, 1, 0, 1])}
    model.eval()
    with torch.no_grad():
        model.validation_step(batch, 0)
    assert seen[-1] == replace(model.recon_cfg, n_noise=1, t_start=20)
    # the evaluation's reconstruction is untouched, and keeps the training patch the model filled in
    assert (model.recon_cfg.n_noise, model.recon_cfg.t_start, model.recon_cfg.patch_size) == (4, 30, 8)
    assert seen[-1].patch_size == 8


def test_val_recon_default_is_the_model_recon(tiny_net_cfg, schedule):
    model = _model(tiny_net_cfg, schedule, recon={"t_start": 30, "n_noise": 3})
    assert model.validation_recon_cfg() is model.recon_cfg


@pytest.mark.parametrize("val_recon, match", [({"n_draws": 1}, "unknown keys"), ({"t_start": 500}, "outside"),
                                              ([1], "must be a mapping")])
def test_bad_val_recon_fails_at_construction(tiny_net_cfg, schedule, val_recon, match):
    with pytest.raises(ConfigError, match=match):
        _model(tiny_net_cfg, schedule, recon={"t_start": 30}, val_recon=val_recon)
