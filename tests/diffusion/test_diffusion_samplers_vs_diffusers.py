"""Samplers against diffusers' DDPMScheduler / DDIMScheduler on identical inputs (diffusers-style golden tests)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from meddiff.diffusion import (  # noqa: E402
    NoiseSchedule,
    ddim_step,
    ddpm_step,
    make_timesteps,
    sample,
)

SCHEDULES = [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]


def dummy_sample_deter():
    """diffusers' deterministic 4x3x8x8 test sample: arange(768) / 768, channel-last order."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(x, t):
    """diffusers' dummy network ``x * t / (t + 1)``; accepts an int, a 0-d tensor or a LongTensor [B]."""
    t = torch.as_tensor(t)
    if t.dim() == 1:
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
    t = t.to(x.dtype)
    return x * t / (t + 1)


def _tol(t):
    """diffusers forms 1 - ā in float32; near t = 0 (ā ~ 0.9999) that cancellation costs it ~1e-3 relative
    accuracy (we use float64 there, see test_loops_match_float64_reference), so compare loosely only there."""
    return {"rtol": 1e-4, "atol": 1e-4} if t >= 100 else {"rtol": 2e-3, "atol": 2e-3}


# a loop-level tolerance that covers diffusers' accumulated float32 error (measured <= 3e-4)
LOOP_TOL = {"rtol": 1e-3, "atol": 1e-3}
SUM_REL = 5e-4


def _pair(ours, theirs, pred, cls, clip, **kw):
    s = NoiseSchedule(1000, ours, prediction_type=pred)
    d = cls(beta_schedule=theirs, prediction_type=pred, clip_sample=clip, **kw)
    return s, d


# ------------------------------------------------------------------------------------------------ timesteps
def test_make_timesteps_field_note_values():
    assert make_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert make_timesteps(1000, 10, "trailing").tolist() == list(range(999, 98, -100))
    assert make_timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    for sp in ("leading", "trailing", "linspace"):
        ts = make_timesteps(1000, 10, sp)
        assert ts.dtype == torch.long


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T", [7, 50, 100, 1000])
def test_make_timesteps_match_diffusers(spacing, T):
    quirks = 0
    for n in sorted({1, 2, 3, 5, 6, 10, 13, 29, 31, 50, T // 3, T // 2, T - 1, T} & set(range(1, T + 1))):
        d = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        d.set_timesteps(n)
        ours = make_timesteps(T, n, spacing)
        assert len(ours) == n
        assert bool((ours[1:] < ours[:-1]).all()) and 0 <= int(ours.min()) and int(ours.max()) < T
        if len(d.timesteps) == n:
            assert torch.equal(ours, d.timesteps), (T, n, spacing)
        else:
            # diffusers' float arange sometimes yields n+1 trailing steps ending in the invalid timestep -1;
            # the first n agree
            quirks += 1
            assert spacing == "trailing" and d.timesteps[-1].item() == -1
            assert torch.equal(ours, d.timesteps[:n])
    assert quirks <= 3


# ------------------------------------------------------------------------------------------------ single steps
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_ddpm_single_step_matches_diffusers(ours, theirs, pred, clip):
    s, d = _pair(ours, theirs, pred, DDPMScheduler, clip)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g) * 1.5
    out = torch.randn(2, 3, 8, 8, generator=g)
    clip_arg = 1.0 if clip else None
    # full chain (prev = t - 1) at several t, plus the last step (t = 0)
    for t in (999, 500, 1, 0):
        ref = d.step(out, t, x, generator=torch.Generator().manual_seed(7))
        mine = ddpm_step(
            s, out, t, t - 1, x, generator=torch.Generator().manual_seed(7), clip_sample=clip_arg
        )
        tol = _tol(t)
        torch.testing.assert_close(mine[1], ref.pred_original_sample, **tol)
        torch.testing.assert_close(mine[0], ref.prev_sample, **tol)
    # respaced chain: prev is the next entry of the list (t=500 -> 400), not t-1
    d.set_timesteps(10)
    ref = d.step(out, 500, x, generator=torch.Generator().manual_seed(3))
    mine = ddpm_step(s, out, 500, 400, x, generator=torch.Generator().manual_seed(3), clip_sample=clip_arg)
    torch.testing.assert_close(mine[0], ref.prev_sample, rtol=1e-4, atol=1e-4)
    wrong = ddpm_step(s, out, 500, 499, x, generator=torch.Generator().manual_seed(3), clip_sample=clip_arg)
    assert not torch.allclose(wrong[0], ref.prev_sample, atol=1e-2)


def test_ddpm_explicit_noise_and_fixed_large():
    s = NoiseSchedule(1000, "linear")
    d = DDPMScheduler(clip_sample=False, variance_type="fixed_large")
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = 0.3 * x
    z = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    ref = d.step(out, 600, x, generator=torch.Generator().manual_seed(5)).prev_sample
    mine, _ = ddpm_step(s, out, 600, 599, x, noise=z, variance_type="fixed_large")
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    small, _ = ddpm_step(s, out, 600, 599, x, noise=z)
    assert not torch.allclose(small, mine)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_ddim_single_step_matches_diffusers(ours, theirs, pred, clip, eta):
    s, d = _pair(ours, theirs, pred, DDIMScheduler, clip)
    d.set_timesteps(10)  # diffusers' DDIM uses prev = t - T // n = t - 100
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g) * 1.5
    out = torch.randn(2, 3, 8, 8, generator=g)
    for t in (900, 500, 100, 0):
        ref = d.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(11))
        mine = ddim_step(
            s,
            out,
            t,
            t - 100 if t >= 100 else -1,
            x,
            eta=eta,
            generator=torch.Generator().manual_seed(11),
            clip_sample=clip,
        )
        torch.testing.assert_close(mine[1], ref.pred_original_sample, **_tol(t))
        torch.testing.assert_close(mine[0], ref.prev_sample, **_tol(t))


# ------------------------------------------------------------------------------------------------ whole loops
def _diffusers_loop(d, timesteps, generator=None, eta=None):
    x = dummy_sample_deter()
    for t in timesteps:
        out = dummy_model(x, t)
        kw = {} if eta is None else {"eta": eta}
        x = d.step(out, t, x, generator=generator, **kw).prev_sample
    return x


@pytest.mark.parametrize(
    "pred,golden_sum,golden_mean", [("epsilon", 258.9606, 0.3372), ("v_prediction", 202.0296, 0.2631)]
)
def test_ddpm_full_loop_golden(pred, golden_sum, golden_mean):
    """diffusers' own golden numbers (tests/schedulers/test_scheduler_ddpm.py), linear, clip, 1000 steps."""
    s = NoiseSchedule(1000, "linear", prediction_type=pred)
    x = sample(
        dummy_model,
        s,
        dummy_sample_deter(),
        torch.arange(999, -1, -1),
        sampler="ddpm",
        generator=torch.Generator().manual_seed(0),
        clip_sample=1.0,
    )
    assert abs(x.abs().sum().item() - golden_sum) < 1e-2
    assert abs(x.abs().mean().item() - golden_mean) < 1e-3


@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_ddpm_full_loop_matches_diffusers(ours, theirs, pred):
    s, d = _pair(ours, theirs, pred, DDPMScheduler, True)
    ref = _diffusers_loop(d, range(999, -1, -1), generator=torch.Generator().manual_seed(0))
    x = sample(
        dummy_model,
        s,
        dummy_sample_deter(),
        torch.arange(999, -1, -1),
        sampler="ddpm",
        generator=torch.Generator().manual_seed(0),
        clip_sample=True,
    )
    assert x.abs().sum().item() == pytest.approx(ref.abs().sum().item(), rel=SUM_REL)
    torch.testing.assert_close(x, ref, **LOOP_TOL)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_ddpm_respaced_loop_matches_diffusers(ours, theirs, spacing, clip):
    s = NoiseSchedule(1000, ours)
    d = DDPMScheduler(beta_schedule=theirs, clip_sample=clip, timestep_spacing=spacing)
    d.set_timesteps(10)
    ts = make_timesteps(1000, 10, spacing)
    assert torch.equal(ts, d.timesteps)
    ref = _diffusers_loop(d, d.timesteps, generator=torch.Generator().manual_seed(0))
    x = sample(
        dummy_model,
        s,
        dummy_sample_deter(),
        ts,
        sampler="ddpm",
        generator=torch.Generator().manual_seed(0),
        clip_sample=clip,
    )
    assert x.abs().sum().item() == pytest.approx(ref.abs().sum().item(), rel=SUM_REL)
    torch.testing.assert_close(x, ref, **LOOP_TOL)


@pytest.mark.parametrize(
    "pred,kw,golden_sum,golden_mean",
    [
        ("epsilon", {}, 172.0067, 0.223967),
        ("v_prediction", {}, 52.5302, 0.0684),
        ("epsilon", {"beta_start": 0.01}, 149.8295, 0.1951),
    ],
)
def test_ddim_full_loop_golden(pred, kw, golden_sum, golden_mean):
    """diffusers' own golden numbers (tests/schedulers/test_scheduler_ddim.py): 10 leading steps, eta 0, clip."""
    s = NoiseSchedule(1000, "linear", prediction_type=pred, **kw)
    x = sample(
        dummy_model, s, dummy_sample_deter(), make_timesteps(1000, 10), sampler="ddim", clip_sample=True
    )
    assert abs(x.abs().sum().item() - golden_sum) < 1e-2
    assert abs(x.abs().mean().item() - golden_mean) < 1e-3


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_ddim_loop_matches_diffusers(ours, theirs, pred, spacing, clip, eta):
    # diffusers' DDIM steps to t - T//n, which is the next list entry for leading/trailing with n | T
    s, d = _pair(ours, theirs, pred, DDIMScheduler, clip, timestep_spacing=spacing)
    d.set_timesteps(10)
    ts = make_timesteps(1000, 10, spacing)
    ref = _diffusers_loop(d, d.timesteps, generator=torch.Generator().manual_seed(0), eta=eta)
    x = sample(
        dummy_model,
        s,
        dummy_sample_deter(),
        ts,
        sampler="ddim",
        eta=eta,
        generator=torch.Generator().manual_seed(0),
        clip_sample=clip,
    )
    assert x.abs().sum().item() == pytest.approx(ref.abs().sum().item(), rel=SUM_REL)
    torch.testing.assert_close(x, ref, **LOOP_TOL)
    if eta > 0 and pred != "sample":  # the generator matters (the dummy x0-model maps everything to 0 at t=0)
        other = sample(
            dummy_model,
            s,
            dummy_sample_deter(),
            ts,
            sampler="ddim",
            eta=eta,
            generator=torch.Generator().manual_seed(1),
            clip_sample=clip,
        )
        assert not torch.allclose(other, x, atol=1e-3)


# ------------------------------------------------------------------------------------------------ float64 truth
def _reference_loop64(betas, pred, timesteps, sampler, seed, eta=0.0, clip=1.0):
    """Independent float64 implementation of DDPM (Ho et al. eq. 7) / DDIM (Song et al. eq. 12) over a
    respaced list; noise is drawn in float32 from the same generator stream as the samplers under test."""
    ac = torch.cumprod(1 - betas.double(), 0)
    one = torch.tensor(1.0, dtype=torch.float64)
    x = dummy_sample_deter().double()
    g = torch.Generator().manual_seed(seed)
    ts = [int(t) for t in timesteps]
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, a_s = ac[t], (ac[s] if s >= 0 else one)
        out = dummy_model(x, t)
        if pred == "epsilon":
            x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
        elif pred == "sample":
            x0, eps = out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
        else:
            x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if sampler == "ddpm":
            alpha = a_t / a_s
            x = a_s.sqrt() * (1 - alpha) / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_s) / (1 - a_t) * x
            if s >= 0:
                var = ((1 - a_s) / (1 - a_t) * (1 - alpha)).clamp(min=1e-20)
                x = x + var.sqrt() * torch.randn(x.shape, generator=g).double()
        else:
            sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
            x = a_s.sqrt() * x0 + (1 - a_s - sigma**2).sqrt() * eps
            if eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=g).double()
    return x


LOOP_CASES = [("full", "ddpm", 0.0)] + [
    (sp, sampler, eta)
    for sp in ("leading", "trailing", "linspace")
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0))
]


@pytest.mark.parametrize("spacing,sampler,eta", LOOP_CASES)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_loops_match_float64_reference(ours, theirs, pred, spacing, sampler, eta):
    """Our float32 loops track a float64 computation (also DDIM on linspace, which diffusers' DDIM cannot do:
    it steps to t - T//n instead of the next list entry), and ~100x closer than diffusers' float32 does."""
    s = NoiseSchedule(1000, ours, prediction_type=pred)
    ts = torch.arange(999, -1, -1) if spacing == "full" else make_timesteps(1000, 10, spacing)
    truth = _reference_loop64(s.betas, pred, ts, sampler, seed=0, eta=eta)
    x = sample(
        dummy_model,
        s,
        dummy_sample_deter(),
        ts,
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(0),
        clip_sample=1.0,
    )
    torch.testing.assert_close(x.double(), truth, rtol=1e-5, atol=2e-5)
    if spacing == "full":
        d = DDPMScheduler(beta_schedule=theirs, prediction_type=pred)
        ref = _diffusers_loop(d, range(999, -1, -1), generator=torch.Generator().manual_seed(0))
        assert (x.double() - truth).abs().max() < (ref.double() - truth).abs().max()
