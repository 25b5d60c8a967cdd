"""NoiseSchedule: tables and forward-process math against diffusers, dtype/device handling, validation."""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402

from meddiff.diffusion import NoiseSchedule  # noqa: E402
from meddiff.errors import ConfigError  # noqa: E402

SCHEDULES = [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]


@pytest.mark.parametrize("ours,theirs", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 50])
def test_tables_match_diffusers(ours, theirs, T):
    s = NoiseSchedule(T, ours)
    d = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs)
    assert torch.equal(s.betas, d.betas)  # betas are built exactly as diffusers does
    torch.testing.assert_close(s.alphas, d.alphas, rtol=0, atol=1e-7)
    torch.testing.assert_close(s.alphas_cumprod, d.alphas_cumprod, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(s.sqrt_alphas_cumprod, d.alphas_cumprod.sqrt(), rtol=2e-6, atol=1e-7)
    # diffusers forms 1 - ā in float32 (cancellation near t=0, relative error up to ~1e-4); ours is float64 math
    torch.testing.assert_close(
        s.sqrt_one_minus_alphas_cumprod, (1 - d.alphas_cumprod).sqrt(), rtol=5e-4, atol=1e-7
    )
    ac64 = torch.cumprod(1 - d.betas.double(), 0)
    torch.testing.assert_close(s.alphas_cumprod, ac64.float(), rtol=0, atol=0)
    torch.testing.assert_close(s.sqrt_one_minus_alphas_cumprod, (1 - ac64).sqrt().float(), rtol=0, atol=0)
    for name in ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        buf = getattr(s, name)
        assert buf.dtype == torch.float32 and buf.shape == (T,)


def test_cosine_formula_from_field_notes():
    T = 1000
    s = NoiseSchedule(T, "cosine", beta_start=0.5, beta_end=0.9)  # start/end are ignored by cosine

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    for i in (0, 1, 500, 998):
        expected = min(1 - f((i + 1) / T) / f(i / T), 0.999)
        assert s.betas[i].item() == pytest.approx(expected, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.999)  # the cap is hit at the end
    # ā follows the closed form f(t+1)/f(0) up to float32
    t = torch.tensor([0, 100, 500, 900])
    expected = torch.tensor([f((int(k) + 1) / T) / f(0) for k in t], dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod[t].double(), expected, rtol=1e-5, atol=1e-7)


def test_linear_and_scaled_linear_end_points():
    lin = NoiseSchedule(1000, "linear", beta_start=1e-4, beta_end=0.02)
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    sl = NoiseSchedule(1000, "scaled_linear", beta_start=1e-4, beta_end=0.02)
    mid = ((1e-4**0.5 + 0.02**0.5) / 2) ** 2
    assert sl.betas[0].item() == pytest.approx(1e-4)
    assert sl.betas[-1].item() == pytest.approx(0.02)
    assert sl.betas[499:501].mean().item() == pytest.approx(mid, rel=1e-3)
    assert not torch.allclose(sl.betas, lin.betas)


def test_aliases():
    assert NoiseSchedule(10, "squaredcos_cap_v2").beta_schedule == "cosine"
    for alias, canon in [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction"), ("epsilon", "epsilon")]:
        assert NoiseSchedule(10, prediction_type=alias).prediction_type == canon


def test_custom_betas():
    betas = torch.linspace(1e-3, 0.05, 20).tolist()
    s = NoiseSchedule(20, "custom", trained_betas=betas)
    torch.testing.assert_close(s.betas, torch.tensor(betas, dtype=torch.float32))
    torch.testing.assert_close(
        s.alphas_cumprod.double(), torch.cumprod(1 - torch.tensor(betas).double(), 0), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(ours, theirs):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 2, 5, 5, generator=g)
    noise = torch.randn(6, 2, 5, 5, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    s = NoiseSchedule(1000, ours)
    d = DDPMScheduler(beta_schedule=theirs)
    # tolerance covers diffusers' float32 1 - ā (see test_tables_match_diffusers)
    torch.testing.assert_close(s.q_sample(x0, t, noise), d.add_noise(x0, noise, t), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(s.velocity(x0, noise, t), d.get_velocity(x0, noise, t), rtol=1e-4, atol=2e-5)
    # per-item timesteps really are per item (not one t for the whole batch)
    xt = s.q_sample(x0, t, noise)
    for i in range(6):
        torch.testing.assert_close(xt[i : i + 1], s.q_sample(x0[i : i + 1], t[i : i + 1], noise[i : i + 1]))


@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("sched", ["linear", "scaled_linear", "cosine"])
def test_training_target_and_conversions_roundtrip(pred, sched):
    s = NoiseSchedule(1000, sched, prediction_type=pred)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 950])
    xt = s.q_sample(x0, t, noise)
    target = s.training_target(x0, noise, t)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": s.velocity(x0, noise, t)}[pred]
    assert torch.equal(target, expected)
    # a perfect network output converts back to x0 and eps
    torch.testing.assert_close(s.predict_x0(target, xt, t), x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.predict_eps(target, xt, t), noise, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.predict_v(target, xt, t), s.velocity(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_v_formulas_explicit():
    s = NoiseSchedule(1000, "linear", prediction_type="v")
    x0, eps = torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), -1.2)
    t = torch.tensor([600])
    a = s.alphas_cumprod[600].sqrt()
    b = (1 - s.alphas_cumprod[600]).sqrt()
    v = s.velocity(x0, eps, t)
    assert v.item() == pytest.approx((a * -1.2 - b * 0.3).item(), rel=1e-6)
    xt = s.q_sample(x0, t, eps)
    assert s.predict_x0(v, xt, t).item() == pytest.approx((a * xt - b * v).item(), rel=1e-6)


def test_snr_and_alpha_bar():
    s = NoiseSchedule(1000, "cosine")
    t = torch.arange(1000)
    snr = s.snr(t)
    torch.testing.assert_close(snr, s.alphas_cumprod / (1 - s.alphas_cumprod))
    assert bool((snr[1:] < snr[:-1]).all())
    assert s.alpha_bar(-1).item() == 1.0 == s.final_alpha_cumprod
    ab = s.alpha_bar(torch.tensor([-1, 0, 999]))
    assert ab.dtype == torch.float32
    assert (
        ab[0].item() == 1.0
        and ab[1].item() == s.alphas_cumprod[0].item()
        and ab[2].item() == s.alphas_cumprod[-1].item()
    )
    with pytest.raises(ConfigError, match="1000"):
        s.alpha_bar(1000)


def test_tables_stay_float32_after_bf16_call():
    s = NoiseSchedule(1000, "cosine")
    before = {k: getattr(s, k).clone() for k in s._TABLES}
    x0 = torch.randn(2, 1, 4, 4).bfloat16()
    noise = torch.randn(2, 1, 4, 4).bfloat16()
    t = torch.tensor([3, 700])
    xt = s.q_sample(x0, t, noise)
    assert xt.dtype == torch.bfloat16
    assert s.predict_x0(noise, xt, t).dtype == torch.bfloat16
    assert s.velocity(x0, noise, t).dtype == torch.bfloat16
    for k, v in before.items():
        assert getattr(s, k).dtype == torch.float32
        assert torch.equal(getattr(s, k), v)
    # the bf16 result is the float32 result rounded, not computed from degraded tables
    ref = s.q_sample(x0.float(), t, noise.float())
    torch.testing.assert_close(xt.float(), ref, rtol=2e-2, atol=2e-2)


def test_module_dtype_casts_keep_exact_float32_tables():
    s = NoiseSchedule(1000, "linear")
    ref = s.alphas_cumprod.clone()
    s.to(torch.bfloat16)
    assert s.alphas_cumprod.dtype == torch.float32 and torch.equal(s.alphas_cumprod, ref)
    s.half()
    s.double()
    assert s.sqrt_one_minus_alphas_cumprod.dtype == torch.float32 and torch.equal(s.alphas_cumprod, ref)
    assert (1 - s.alphas_cumprod[0]).item() > 0  # would be 0 in bf16


def test_buffers_move_with_to():
    s = NoiseSchedule(100, "linear")
    names = {n for n, _ in s.named_buffers()}
    assert names == set(s._TABLES)
    s = s.to("meta")
    for n in names:
        assert getattr(s, n).device.type == "meta"
        assert getattr(s, n).dtype == torch.float32
    assert len(s.state_dict()) == 0  # rebuilt from config, not checkpointed


def test_errors():
    with pytest.raises(ConfigError) as e:
        NoiseSchedule(1000, "cosinus")
    msg = str(e.value)
    assert (
        "cosinus" in msg
        and "linear" in msg
        and "scaled_linear" in msg
        and "cosine" in msg
        and "custom" in msg
    )
    with pytest.raises(ConfigError, match="num_train_timesteps=0"):
        NoiseSchedule(0)
    with pytest.raises(ConfigError, match="trained_betas"):
        NoiseSchedule(10, "custom")
    with pytest.raises(ConfigError, match="9 values"):
        NoiseSchedule(10, "custom", trained_betas=[0.01] * 9)
    with pytest.raises(ConfigError, match="custom"):
        NoiseSchedule(10, "linear", trained_betas=[0.01] * 10)
    with pytest.raises(ConfigError, match="nope"):
        NoiseSchedule(10, prediction_type="nope")
    with pytest.raises(ConfigError):
        NoiseSchedule(10, "linear", beta_start=0.5, beta_end=1.5)
    s = NoiseSchedule(1000)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ConfigError, match=r"t=1000 is outside \[0, 1000\)"):
        s.q_sample(x, torch.tensor([0, 1000]), x)
    with pytest.raises(ConfigError, match="-1"):
        s.q_sample(x, torch.tensor([-1, 3]), x)
    with pytest.raises(ConfigError, match="integers"):
        s.q_sample(x, torch.tensor([0.5, 3.0]), x)
    assert issubclass(ConfigError, ValueError)
