"""Partial-diffusion options used by the demo: the noise-draw ensemble (sampling.draws), the network's precision, and
the model's cheaper per-epoch validation reconstruction (model.val_sampling)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from meddiff.diffusion.partial import PartialSampling, partial_reconstruct
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


def test_draws_average_independent_draws(schedule):
    """n draws cost n times the calls and shrink the spread of a noisy estimate by ~sqrt(n)."""
    x = _x()
    one, many = Recorder(), Recorder()
    r1 = partial_reconstruct(one, schedule, x, PartialSampling(t_start=60, patch_size=None))
    r16 = partial_reconstruct(many, schedule, x, PartialSampling(t_start=60, patch_size=None, draws=16))
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
    partial_reconstruct(rec, schedule, x, PartialSampling(t_start=30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        partial_reconstruct(rec, schedule, x, PartialSampling(t_start=30))
    assert rec.autocast == [False, True]


@pytest.mark.parametrize("name, expected", [("bf16", True), ("bf16-mixed", True), ("32", False), ("32-true", False)])
def test_precision_sets_autocast_around_the_network_only(schedule, name, expected):
    x = _x()
    rec = Recorder()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not expected):  # the opposite outside
        out = partial_reconstruct(rec, schedule, x, PartialSampling(t_start=30, precision=name))
    assert set(rec.autocast) == {expected}
    assert out.dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_native(schedule, native):
    rec = Recorder()
    partial_reconstruct(rec, schedule, _x(), PartialSampling(t_start=30, precision="auto"), native_bf16=native)
    assert set(rec.autocast) == {native}


@pytest.mark.parametrize("native", [True, False])
def test_the_model_measures_native_bf16_for_auto(tiny_net_cfg, schedule, monkeypatch, native):
    import meddiff.models.unconditional as unc
    import meddiff.utils.cpu as cpu

    monkeypatch.setattr(cpu, "bf16_support", lambda flags=None: {"native_bf16": native, "flags": []})
    monkeypatch.setattr(unc, "bf16_support", cpu.bf16_support)
    unc.native_cpu_bf16.cache_clear()
    try:
        model = _model(tiny_net_cfg, schedule, sampling={"t_start": 30, "precision": "auto"}).eval()
        seen = []
        monkeypatch.setattr(unc, "partial_reconstruct", lambda *a, native_bf16=False, **k: seen.append(native_bf16)
                            or a[2])
        model.reconstruct({"image": torch.zeros(1, 1, 16, 16)})
        assert seen == [native]
    finally:
        unc.native_cpu_bf16.cache_clear()


def test_bf16_reconstruction_is_close_to_float32(tiny_net_cfg, schedule):
    torch.manual_seed(0)
    net = build_net(tiny_net_cfg).eval()
    for p in net.parameters():  # MONAI zero-initialises the output layer: give the net a non-trivial output
        torch.nn.init.normal_(p, std=0.05)
    fn = lambda xt, t, idx: net(xt, t)  # noqa: E731
    x = _x().repeat(1, 1, 2, 2)  # 16 x 16
    cfg = PartialSampling(t_start=40, patch_size=8, stride=4, draws=2)
    r32 = partial_reconstruct(fn, schedule, x, replace(cfg, precision="32"))
    rbf = partial_reconstruct(fn, schedule, x, replace(cfg, precision="bf16"))
    assert rbf.dtype == torch.float32
    assert not torch.equal(r32, rbf)  # it really ran in bf16 ...
    torch.testing.assert_close(rbf, r32, atol=0.05, rtol=0)  # ... and stays close (same noise draws)
    torch.testing.assert_close(partial_reconstruct(fn, schedule, x, cfg), r32)  # None outside autocast = float32


def test_bad_precision_is_a_config_error(schedule):
    with pytest.raises(ConfigError, match=r"sampling.precision='fp8'"):
        partial_reconstruct(Recorder(), schedule, _x(), PartialSampling(t_start=30, precision="fp8"))


def _model(tiny_net_cfg, schedule, **kw) -> UnconditionalDiffusion:
    return UnconditionalDiffusion(net=build_net(tiny_net_cfg), schedule=schedule, ema_decay=0, **kw)


def test_val_sampling_changes_only_the_validation_reconstruction(tiny_net_cfg, schedule, monkeypatch):
    model = _model(tiny_net_cfg, schedule, patch_size=8, sampling={"t_start": 30, "draws": 4},
                   val_sampling={"draws": 1, "t_start": 20})
    seen: list[PartialSampling | None] = []
    monkeypatch.setattr(model, "reconstruct", lambda batch, sampling=None: seen.append(sampling) or batch["image"])
    batch = {"image": torch.zeros(4, 1, 16, 16), "label": torch.tensor([0, 1, 0, 1])}
    model.eval()
    with torch.no_grad():
        model.validation_step(batch, 0)
    assert seen[-1] == replace(model.sampling, draws=1, t_start=20)
    # the evaluation's reconstruction is untouched, and keeps the training patch the model filled in
    assert (model.sampling.draws, model.sampling.t_start, model.sampling.patch_size) == (4, 30, 8)
    assert seen[-1].patch_size == 8


def test_val_sampling_default_is_the_model_sampling(tiny_net_cfg, schedule):
    model = _model(tiny_net_cfg, schedule, sampling={"t_start": 30, "draws": 3})
    assert model.validation_sampling() is model.sampling


@pytest.mark.parametrize("val_sampling, match", [({"n_draws": 1}, "unknown keys"), ({"t_start": 500}, "outside"),
                                                 ([1], "must be a mapping")])
def test_bad_val_sampling_fails_at_construction(tiny_net_cfg, schedule, val_sampling, match):
    with pytest.raises(ConfigError, match=match):
        _model(tiny_net_cfg, schedule, sampling={"t_start": 30}, val_sampling=val_sampling)
