"""Sampler behaviour: partial reconstruction, one-step x0, DDIM inversion, guidance, validation, dtypes."""

import pytest
import torch

from meddiff.diffusion import (
    NoiseSchedule,
    cfg_combine,
    ddim_invert,
    ddim_step,
    ddpm_step,
    make_noise,
    make_partial_timesteps,
    make_timesteps,
    one_step_x0,
    reconstruct_from,
    sample,
)
from meddiff.errors import ConfigError


def _x0(seed=0, shape=(2, 1, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


class Recorder:
    """model_fn wrapper recording the (x_t, t) it was called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.fn(x, t)


# ------------------------------------------------------------------------------------------------ timesteps
def test_make_partial_timesteps():
    assert make_partial_timesteps(999, 10).tolist() == make_timesteps(1000, 10, "trailing").tolist()
    assert make_partial_timesteps(499, None).tolist() == list(range(499, -1, -1))
    assert make_partial_timesteps(0).tolist() == [0]
    ts = make_partial_timesteps(250, 7)
    assert ts[0].item() == 250 and len(ts) == 7 and bool((ts[1:] < ts[:-1]).all()) and ts[-1].item() >= 0
    gaps = (ts[:-1] - ts[1:]).tolist()
    assert max(gaps) - min(gaps) <= 1  # evenly spaced
    with pytest.raises(ConfigError, match="num_steps=12"):
        make_partial_timesteps(10, 12)


# ------------------------------------------------------------------------------------------------ reconstruct_from
@pytest.mark.parametrize("t_start,num_steps", [(0, None), (1, None), (10, None), (500, 5), (999, 10)])
def test_reconstruct_from_calls_model_on_partial_chain(t_start, num_steps):
    s = NoiseSchedule(1000, "linear")
    x0 = _x0()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    rec = Recorder(lambda x, t: 0.1 * x)
    out = reconstruct_from(rec, s, x0, t_start, num_steps=num_steps, noise=noise)
    expected_ts = make_partial_timesteps(t_start, num_steps).tolist()
    assert [int(t[0]) for _, t in rec.calls] == expected_ts
    for _, t in rec.calls:
        assert t.dtype == torch.long and t.shape == (2,) and bool((t == t[0]).all())
    # the chain starts from q_sample(x0, t_start, noise)
    torch.testing.assert_close(rec.calls[0][0], s.q_sample(x0, torch.full((2,), t_start), noise))
    # and is exactly the documented composition
    manual = sample(
        lambda x, t: 0.1 * x,
        s,
        s.q_sample(x0, torch.full((2,), t_start), noise),
        make_partial_timesteps(t_start, num_steps),
        sampler="ddim",
    )
    torch.testing.assert_close(out, manual)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("t_start", [0, 3, 250, 999])
def test_reconstruct_from_with_x0_oracle_returns_x0(sampler, t_start):
    s = NoiseSchedule(1000, "cosine", prediction_type="x0")
    x0 = _x0()
    out = reconstruct_from(
        lambda x, t: x0,
        s,
        x0,
        t_start,
        num_steps=min(4, t_start + 1),
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    # a network that predicts zeros does not reconstruct
    bad = reconstruct_from(lambda x, t: torch.zeros_like(x), s, x0, t_start, num_steps=1, sampler=sampler)
    assert (bad - x0).abs().max() > 0.1


@pytest.mark.parametrize("num_steps", [None, 1, 3])
def test_reconstruct_from_ddim_with_noise_oracle(num_steps):
    """DDIM eta=0 with an eps-model that knows the noise returns x0 from any depth and any respacing."""
    s = NoiseSchedule(1000, "linear")
    x0 = _x0()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    out = reconstruct_from(lambda x, t: noise, s, x0, 300, num_steps=num_steps, noise=noise)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    wrong = reconstruct_from(lambda x, t: -noise, s, x0, 300, num_steps=num_steps, noise=noise)
    assert (wrong - x0).abs().max() > 0.1


def test_reconstruct_from_is_seeded():
    s = NoiseSchedule(100, "linear")
    x0 = _x0()
    a = reconstruct_from(
        lambda x, t: 0.1 * x, s, x0, 50, sampler="ddpm", generator=torch.Generator().manual_seed(3)
    )
    b = reconstruct_from(
        lambda x, t: 0.1 * x, s, x0, 50, sampler="ddpm", generator=torch.Generator().manual_seed(3)
    )
    c = reconstruct_from(
        lambda x, t: 0.1 * x, s, x0, 50, sampler="ddpm", generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize(
    "sampler,eta,expected_calls", [("ddpm", 0.0, 1 + 3), ("ddim", 0.0, 1), ("ddim", 0.5, 1 + 4)]
)
def test_reconstruct_from_noise_fn(sampler, eta, expected_calls):
    """AnoDDPM: simplex noise for the forward jump and for every noisy reverse step."""
    s = NoiseSchedule(1000, "linear")
    x0 = _x0()
    g = torch.Generator().manual_seed(0)
    calls = []

    def noise_fn(x):
        calls.append(x.shape)
        return make_noise("simplex", x, g, octaves=2, frequency=4)

    out = reconstruct_from(
        lambda x, t: 0.1 * x, s, x0, 400, num_steps=4, sampler=sampler, eta=eta, noise_fn=noise_fn
    )
    assert len(calls) == expected_calls and all(c == x0.shape for c in calls)
    g2 = torch.Generator().manual_seed(0)
    again = reconstruct_from(
        lambda x, t: 0.1 * x,
        s,
        x0,
        400,
        num_steps=4,
        sampler=sampler,
        eta=eta,
        noise_fn=lambda x: make_noise("simplex", x, g2, octaves=2, frequency=4),
    )
    torch.testing.assert_close(out, again)
    gauss = reconstruct_from(
        lambda x, t: 0.1 * x,
        s,
        x0,
        400,
        num_steps=4,
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(0),
    )
    assert not torch.allclose(out, gauss)


# ------------------------------------------------------------------------------------------------ one-step x0
@pytest.mark.parametrize("sched", ["linear", "cosine"])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_one_step_x0_with_oracle_returns_x0(pred, sched):
    s = NoiseSchedule(1000, sched, prediction_type=pred)
    x0 = _x0()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    rec = Recorder(lambda x, t: s.training_target(x0, noise, t))  # knows x0 and the noise
    out = one_step_x0(rec, s, x0, 499, noise=noise)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    assert len(rec.calls) == 1  # one forward pass (pDDPM)
    x_t, t = rec.calls[0]
    assert t.tolist() == [499, 499]
    torch.testing.assert_close(x_t, s.q_sample(x0, t, noise))
    # an eps-model that outputs zeros gets x_t / sqrt(ā), not x0
    if pred == "epsilon":
        zero = one_step_x0(lambda x, t: torch.zeros_like(x), s, x0, 499, noise=noise)
        assert (zero - x0).abs().max() > 0.1


def test_one_step_x0_keeps_grad_mode():
    s = NoiseSchedule(100, "linear")
    w = torch.tensor(0.5, requires_grad=True)
    out = one_step_x0(lambda x, t: w * x, s, _x0(), 50, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    assert w.grad is not None


# ------------------------------------------------------------------------------------------------ DDIM inversion
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_invert_then_sample_recovers_x0_for_noise_oracle(pred):
    s = NoiseSchedule(1000, "linear", prediction_type=pred)
    s_eps = NoiseSchedule(1000, "linear", prediction_type="epsilon")
    x0 = _x0()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))

    def oracle(x, t):  # its epsilon is always `eps` (expressed in the schedule's parameterisation)
        return eps if pred == "epsilon" else s_eps.predict_v(eps, x, t)

    ts = make_timesteps(1000, 20, "trailing")
    x_T = ddim_invert(oracle, s, x0, ts.flip(0))
    torch.testing.assert_close(x_T, s.q_sample(x0, torch.full((2,), int(ts[0])), eps), rtol=1e-4, atol=1e-4)
    back = sample(oracle, s, x_T, ts, sampler="ddim", eta=0.0)
    torch.testing.assert_close(back, x0, rtol=1e-4, atol=1e-4)


def test_ddim_invert_converges_for_a_smooth_model():
    """For a non-oracle model inversion is only first-order accurate: the error shrinks ~1/steps."""
    s = NoiseSchedule(1000, "linear")
    x0 = _x0()

    def model(x, t):
        return 0.5 * x + 0.1

    errs = []
    for n in (20, 500):
        ts = make_timesteps(1000, n, "leading")
        back = sample(model, s, ddim_invert(model, s, x0, ts.flip(0)), ts, sampler="ddim")
        errs.append((back - x0).abs().max().item())
    assert errs[1] < 0.05 and errs[1] < errs[0] / 10


def test_ddim_invert_validates_order():
    s = NoiseSchedule(100)
    with pytest.raises(ConfigError, match="ascending"):
        ddim_invert(lambda x, t: x, s, _x0(), [50, 10])


# ------------------------------------------------------------------------------------------------ guidance
def test_cfg_combine():
    u, c = torch.full((2,), 1.0), torch.full((2,), 3.0)
    assert torch.equal(cfg_combine(u, c, 0.0), u)
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.equal(cfg_combine(u, c, 3.0), torch.full((2,), 7.0))


# ------------------------------------------------------------------------------------------------ dtype & progress
def test_bf16_sampling_keeps_float32_tables():
    s = NoiseSchedule(1000, "cosine")
    ref = s.alphas_cumprod.clone()
    x = _x0().bfloat16()
    out = sample(
        lambda x, t: 0.1 * x,
        s,
        x,
        make_timesteps(1000, 5),
        sampler="ddpm",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert s.alphas_cumprod.dtype == torch.float32 and torch.equal(s.alphas_cumprod, ref)
    x_prev, x0_pred = ddim_step(s, 0.1 * x, 500, 400, x)
    assert x_prev.dtype == torch.bfloat16 and x0_pred.dtype == torch.bfloat16


def test_progress_bar_same_result(capsys):
    s = NoiseSchedule(100)
    x = _x0()
    a = sample(lambda x, t: 0.1 * x, s, x, make_timesteps(100, 5), sampler="ddim", progress=True)
    b = sample(lambda x, t: 0.1 * x, s, x, make_timesteps(100, 5), sampler="ddim", progress=False)
    assert torch.equal(a, b)


def test_sample_runs_without_grad():
    s = NoiseSchedule(100)
    w = torch.tensor(0.5, requires_grad=True)
    out = sample(lambda x, t: w * x, s, _x0(), make_timesteps(100, 3), sampler="ddim")
    assert not out.requires_grad


def test_ddpm_last_step_adds_no_noise_and_inner_steps_do():
    s = NoiseSchedule(1000)
    x = _x0()
    out = 0.1 * x
    a, _ = ddpm_step(s, out, 0, -1, x, generator=torch.Generator().manual_seed(0))
    b, _ = ddpm_step(s, out, 0, -1, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c, _ = ddpm_step(s, out, 10, 0, x, generator=torch.Generator().manual_seed(0))
    d, _ = ddpm_step(s, out, 10, 0, x, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(c, d)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    e, _ = ddpm_step(s, out, 10, 0, x, noise=z)
    torch.testing.assert_close(e, c)


def test_clip_sample_clamps_x0():
    s = NoiseSchedule(1000, prediction_type="x0")
    x = torch.randn(1, 1, 4, 4)
    big = torch.full_like(x, 5.0)
    _, x0 = ddim_step(s, big, 500, 400, x, clip_sample=True)
    assert x0.max().item() == 1.0
    _, x0 = ddim_step(s, big, 500, 400, x, clip_sample=2.5)
    assert x0.max().item() == 2.5
    _, x0 = ddpm_step(s, big, 500, 400, x, clip_sample=None, generator=torch.Generator().manual_seed(0))
    assert x0.max().item() == 5.0


# ------------------------------------------------------------------------------------------------ errors
def test_errors():
    s = NoiseSchedule(1000)
    x = _x0()

    def m(x, t):
        return x

    with pytest.raises(ConfigError) as e:
        reconstruct_from(m, s, x, 1000)
    assert "t_start=1000 is outside [0, 1000)" in str(e.value) and "choose" in str(e.value)
    with pytest.raises(ConfigError, match="t_start=-1"):
        one_step_x0(m, s, x, -1)
    with pytest.raises(ConfigError, match="t_start=1000"):
        one_step_x0(m, s, x, 1000)
    with pytest.raises(ConfigError, match="'euler'"):
        sample(m, s, x, [10, 0], sampler="euler")
    with pytest.raises(ConfigError, match="'euler'"):
        reconstruct_from(m, s, x, 10, sampler="euler")
    with pytest.raises(ConfigError, match="'middle'.*leading"):
        make_timesteps(1000, 10, "middle")
    with pytest.raises(ConfigError, match="num_inference_steps=0"):
        make_timesteps(1000, 0)
    with pytest.raises(ConfigError, match="num_inference_steps=1001"):
        make_timesteps(1000, 1001)
    with pytest.raises(ConfigError, match="descending"):
        sample(m, s, x, [0, 10])
    with pytest.raises(ConfigError, match="1000"):
        sample(m, s, x, [1000, 10])
    with pytest.raises(ConfigError, match="prev_t=10"):
        ddpm_step(s, x, 10, 10, x)
    with pytest.raises(ConfigError, match="fixed_small"):
        ddpm_step(s, x, 10, 9, x, variance_type="learned")
    with pytest.raises(ConfigError, match="clip_sample=-1"):
        ddim_step(s, x, 10, 9, x, clip_sample=-1.0)
    with pytest.raises(ConfigError, match="eta=-0.5"):
        ddim_step(s, x, 10, 9, x, eta=-0.5)
    with pytest.raises(ConfigError, match="not both"):
        ddpm_step(s, x, 10, 9, x, noise=x, generator=torch.Generator())
