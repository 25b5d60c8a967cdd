"""ConditionalDiffusion: concatenation conditioning, sampling through the scheduler core, config errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError, DataError
from meddiff.models.conditional import ConditionalDiffusion, CondSkip
from meddiff.nets import build_net


def tiny_net(in_channels: int = 2) -> nn.Module:
    return build_net(dict(in_channels=in_channels, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                          num_res_blocks=1, norm_num_groups=8, num_head_channels=8))


class CondOracle(nn.Module):
    """An 'x0 predictor' that returns the conditioning channel and counts its calls."""

    in_channels = 2

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))  # something for the optimizer / EMA
        self.calls: list[int] = []

    def forward(self, x, t, class_labels=None):
        self.calls.append(int(t[0]))
        return x[:, 1:] + 0 * self.w


def batch(b: int = 3, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 1, size, size, generator=g) * 1.6 - 0.8
    return {"image": image, "cond": image + 0.1 * torch.randn(b, 1, size, size, generator=g)}


def test_net_input_concatenates_x_t_and_cond():
    m = ConditionalDiffusion(net=tiny_net(), schedule=NoiseSchedule(20), sampling={"steps": 5})
    b = batch()
    x_t = torch.randn_like(b["image"])
    inp = m.net_input(x_t, b)
    assert inp.shape == (3, 2, 16, 16)
    assert torch.equal(inp[:, :1], x_t) and torch.equal(inp[:, 1:], b["cond"])
    with pytest.raises(DataError, match="batch\\['cond'\\]"):
        m.net_input(x_t, {"image": b["image"]})


def test_reconstruct_samples_with_the_configured_sampler_conditioned_on_cond():
    oracle = CondOracle()
    sched = NoiseSchedule(30, prediction_type="sample")
    m = ConditionalDiffusion(net=oracle, schedule=sched, ema_decay=0, sampling={"sampler": "ddim", "steps": 5}).eval()
    b = batch()
    out = m.reconstruct(b)
    # an x0 predictor that returns cond makes every step's x0 estimate = cond: the chain must end at cond
    assert torch.allclose(out, b["cond"].clamp(-1, 1), atol=1e-5)
    assert oracle.calls == [24, 18, 12, 6, 0]  # make_timesteps(30, 5, "leading")
    oracle.calls.clear()
    full = m.reconstruct(b, replace(m.sampling, sampler="ddpm", steps=None))
    assert oracle.calls == list(range(29, -1, -1))  # the full ancestral chain
    assert torch.allclose(full, b["cond"].clamp(-1, 1), atol=1e-5)


def test_reconstruct_is_seeded_by_the_sampling_copy_and_averages_draws():
    m = ConditionalDiffusion(net=tiny_net(), schedule=NoiseSchedule(20), sampling={"steps": 3, "eta": 1.0}).eval()
    cond = batch()["cond"]
    a = m.reconstruct({"cond": cond}, replace(m.sampling, seed=1))
    b = m.reconstruct({"cond": cond}, replace(m.sampling, seed=1))
    c = m.reconstruct({"cond": cond}, replace(m.sampling, seed=2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == cond.shape and a.abs().max() <= 1.0
    assert m.sampling.seed == 0  # the copies were used as given, never stored
    # the same as sampling with a generator seeded by sampling.seed
    assert torch.equal(a, m.sample_posterior(cond, replace(m.sampling, seed=1), torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(1)
    two = m.sample_posterior(cond, replace(m.sampling, draws=2), generator=g)
    g = torch.Generator().manual_seed(1)
    one = replace(m.sampling, draws=1)
    s1, s2 = m.sample_posterior(cond, one, generator=g), m.sample_posterior(cond, one, generator=g)
    assert torch.allclose(two, (s1 + s2) / 2, atol=1e-6)
    with pytest.raises(ConfigError, match="sampling.t_start=5 is not used"):  # a copy is validated like the config
        m.reconstruct({"cond": cond}, replace(m.sampling, t_start=5))


def test_cond_skip_adds_the_noisy_image_to_the_output():
    net = tiny_net()
    m = ConditionalDiffusion(net=net, schedule=NoiseSchedule(20, prediction_type="sample"), cond_skip=True,
                             sampling={"steps": 5})
    b = batch()
    x = m.net_input(torch.randn_like(b["image"]), b)
    t = torch.zeros(3, dtype=torch.long)
    assert isinstance(m.denoiser, CondSkip)
    assert torch.allclose(m.denoiser(x, t), net(x, t) + b["cond"])
    m.eval()
    assert m.denoiser.net is m.ema.shadow  # EMA weights in eval mode, still wrapped
    assert not any("_skips" in k for k in m.state_dict())  # the wrapper adds no weights


def test_training_reduces_loss_and_validation_logs_psnr():
    torch.manual_seed(0)
    m = ConditionalDiffusion(net=tiny_net(), schedule=NoiseSchedule(20, prediction_type="sample"), loss="l1",
                             cond_skip=True, ema_decay=0, val_sampling={"steps": 2}, sampling={"steps": 5},
                             optimizer=lambda params: torch.optim.Adam(params, lr=3e-3))
    opt = m.configure_optimizers()
    b = batch(8)
    first = m.diffusion_loss(b, generator=torch.Generator().manual_seed(0)).item()
    for i in range(30):
        loss = m.diffusion_loss(b, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.diffusion_loss(b, generator=torch.Generator().manual_seed(0)).item() < 0.7 * first
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    m.eval()
    m.on_validation_epoch_start()
    m.validation_step(b, 0)
    m.on_validation_epoch_end()  # val/loss: once per epoch, over every loader
    assert {"val/loss", "val/psnr", "val/ssim", "val/psnr_noisy"} <= set(logged)
    assert 0 < logged["val/psnr"] < 100
    logged.clear()
    m.on_validation_epoch_start()
    m.validation_step(b, 1)  # beyond val_batches=1: the loss only
    m.on_validation_epoch_end()
    assert set(logged) == {"val/loss"}
    assert m.eval_protocol == "denoise" and not hasattr(m, "anomaly_val")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(net_channels=1), r"net.in_channels=1 .*model.image_channels.*model.cond_channels.*set net.in_channels=2"),
        (dict(net_channels=3, cond_channels=1), "set net.in_channels=2"),
        (dict(sampling={"sampler": "euler"}), "model.sampling.sampler='euler'"),
        (dict(sampling={"steps": 21}), r"model.sampling.steps=21 is outside \[1, 20\]"),
        (dict(sampling={"spacing": "random"}), "model.sampling.spacing"),
        (dict(sampling={"eta": -1.0}), "model.sampling.eta"),
        (dict(cond_skip=True), "prediction_type='epsilon'"),
        (dict(sampling={"draws": 0}), "model.sampling.draws"),
        (dict(sampling={"sampler": "one_step", "t_start": 5}), "model.sampling.sampler='one_step' is unknown here"),
        (dict(val_sampling={"steps": 0}), "model.val_sampling.steps"),
    ],
)
def test_bad_config_raises_a_clear_config_error(kw, match):
    net = tiny_net(kw.pop("net_channels", 2))
    with pytest.raises(ConfigError, match=match):
        ConditionalDiffusion(net=net, schedule=NoiseSchedule(20), **{"sampling": {"steps": 5}, **kw})


def test_cond_with_wrong_channels_is_a_data_error():
    m = ConditionalDiffusion(net=tiny_net(), schedule=NoiseSchedule(20), sampling={"steps": 5}).eval()
    with pytest.raises(DataError, match=r"\[B, 1, H, W\]"):
        m.reconstruct({"cond": torch.zeros(2, 2, 16, 16)})


def test_hydra_config_builds_the_model():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from meddiff.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train.yaml", overrides=["experiment=cdm4mi_denoise", "net.channels=[8,16]",
                                               "net.attention_levels=[false,true]", "net.norm_num_groups=8",
                                               "net.num_res_blocks=1", "net.num_head_channels=8"])
    assert cfg.net.in_channels == 2 and cfg.schedule.num_train_timesteps == 1000
    assert cfg.model.optimizer.lr == 2e-6 and cfg.schedule.prediction_type == "epsilon"
    model = instantiate(cfg.model)
    assert isinstance(model, ConditionalDiffusion) and model.sampling.sampler == "ddim" and model.val_sampling["steps"] == 25 and model.val_batches == 2
