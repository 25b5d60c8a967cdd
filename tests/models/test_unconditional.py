import pytest
import torch

from meddiff.diffusion.partial import PartialSampling, partial_reconstruct
from meddiff.errors import ConfigError
from meddiff.models import UnconditionalDiffusion
from meddiff.nets import build_net
from meddiff.patches import patch_masks


def make_model(tiny_net_cfg, schedule, **kw):
    kw.setdefault("sampling", {"t_start": 30})
    return UnconditionalDiffusion(net=build_net(tiny_net_cfg), schedule=schedule, **kw)


def test_patch_grid_covers_borders():
    m = patch_masks(28, 28, 12, 8)
    assert m.shape[0] == 9  # starts 0, 8, 16 on each axis (16 + 12 = 28 reaches the border)
    assert m.any(0).all()
    with pytest.raises(ConfigError, match="larger than the image"):
        patch_masks(28, 28, 32)


def test_patched_loss_counts_only_the_patch(tiny_net_cfg, schedule):
    model = make_model(tiny_net_cfg, schedule, patch_size=8, loss="l1", ema_decay=0)
    region = model.loss_region(torch.zeros(5, 1, 16, 16))
    assert region.shape == (5, 1, 16, 16) and (region.sum((1, 2, 3)) == 64).all()
    out = torch.zeros(2, 1, 16, 16)
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, :8, :8] = 1.0  # error inside the region only
    r = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    r[:, :, :8, :8] = True
    assert model._reduce_loss(out, target, r).item() == pytest.approx(1.0)
    assert model._reduce_loss(out, target, ~r).item() == pytest.approx(0.0)


def test_training_step_decreases_loss_and_updates_ema(tiny_net_cfg, schedule):
    torch.manual_seed(0)
    model = make_model(tiny_net_cfg, schedule, ema_decay=0.9, loss="l2",
                       optimizer=lambda params: torch.optim.Adam(params, lr=3e-3))
    opt = model.configure_optimizers()
    x = torch.zeros(16, 1, 16, 16)
    x[:, :, 4:12, 4:12] = 0.8
    batch = {"image": x}
    gen = torch.Generator().manual_seed(0)
    model.train()
    first = model.diffusion_loss(batch, generator=torch.Generator().manual_seed(0)).item()
    for _ in range(60):
        loss = model.diffusion_loss(batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.ema.update(model.net)
    last = model.diffusion_loss(batch, generator=torch.Generator().manual_seed(0)).item()
    assert last < 0.5 * first
    online = torch.cat([p.flatten() for p in model.net.parameters()])
    shadow = torch.cat([p.flatten() for p in model.ema.shadow.parameters()])
    assert not torch.equal(online, shadow) and int(model.ema.num_updates) == 60
    model.eval()
    assert model.denoiser is model.ema.shadow


def test_nan_loss_fails_fast(tiny_net_cfg, schedule):
    model = make_model(tiny_net_cfg, schedule, ema_decay=0)
    model.log = lambda *a, **k: None
    with pytest.raises(FloatingPointError, match="lr"):
        model.training_step({"image": torch.full((2, 1, 16, 16), float("nan"))}, 0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sampling={"t_start": 100}), "t_start=100"),
        (dict(sampling={"t_start": -1}), "t_start=-1"),
        (dict(loss="l3"), "model.loss"),
        (dict(t_range=[50, 500]), "t_range"),
        (dict(sampling={"tstart": 5}), "Unknown model.sampling option"),
        (dict(noise="pink"), "pink"),
    ],
)
def test_bad_config_values_fail_at_construction(tiny_net_cfg, schedule, kw, match):
    with pytest.raises(ConfigError, match=match):
        make_model(tiny_net_cfg, schedule, **kw)


class Oracle(torch.nn.Module):
    """Predicts x0 = the healthy image (zeros) whatever the input: a perfect healthy prior."""

    def forward(self, x, t, class_labels=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("method", ["one_step", "ddim", "ddpm"])
@pytest.mark.parametrize("patch", [None, 8])
def test_reconstruction_with_a_perfect_prior_removes_the_anomaly(schedule, method, patch):
    x = torch.zeros(3, 1, 16, 16)
    x[:, :, 5:9, 5:9] = 1.0
    cfg = PartialSampling(sampler=method, t_start=60, steps=5, patch_size=patch, stride=4 if patch else None,
                          max_batch=7)
    recon = partial_reconstruct(lambda xt, t, idx: Oracle()(xt, t), schedule, x, cfg)
    assert recon.shape == x.shape
    torch.testing.assert_close(recon, torch.zeros_like(x), atol=1e-5, rtol=0)


def test_patched_reconstruction_batched_equals_one_patch_at_a_time(tiny_net_cfg, schedule):
    torch.manual_seed(0)
    net = build_net(tiny_net_cfg)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    fn = lambda xt, t, idx: net(xt, t)  # noqa: E731
    a = partial_reconstruct(fn, schedule, x, PartialSampling(t_start=40, patch_size=8, stride=4, max_batch=1000))
    b = partial_reconstruct(fn, schedule, x, PartialSampling(t_start=40, patch_size=8, stride=4, max_batch=1))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fixed_noise_seed_gives_the_same_draws_every_step_and_leaves_the_rng_alone(tiny_net_cfg, schedule):
    """model.fixed_noise_seed (debug=overfit): the same batch gets the same t, noise and patch at every step, so the
    loss of unchanged weights repeats exactly; the global random state goes on as if the step drew nothing."""
    batch = {"image": torch.rand(3, 1, 16, 16) * 2 - 1}
    fixed = make_model(tiny_net_cfg, schedule, patch_size=8, ema_decay=0, fixed_noise_seed=7)
    fixed.log = lambda *a, **k: None
    torch.manual_seed(1)
    expected_next = (torch.rand(1), torch.manual_seed(1))[0]
    a = fixed.training_step(batch, 0).item()
    assert torch.equal(torch.rand(1), expected_next)  # forked: the caller's random stream is untouched
    assert fixed.training_step(batch, 1).item() == a
    free = make_model(tiny_net_cfg, schedule, patch_size=8, ema_decay=0)
    free.load_state_dict(fixed.state_dict())
    free.log = lambda *a, **k: None
    assert len({free.training_step(batch, i).item() for i in range(3)}) > 1  # resampled every step
