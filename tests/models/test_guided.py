"""GuidedDiffusion: null-class dropout, CFG wiring, DDIM inversion round trip, healthy translation, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError, DataError
from meddiff.models.guided import GuidedDiffusion, GuidedSampling
from meddiff.nets import build_net


class ClassOffsetNet(nn.Module):
    """``out = 0.1 x + c[label]`` with ``c = [0, 1, ..., 5]``; records every call's batch size and labels."""

    num_class_embeds = 6

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, class_labels=None):
        self.calls.append(class_labels.clone())
        return 0.1 * x + class_labels.to(x.dtype).view(-1, 1, 1, 1)


class ConstantEpsNet(nn.Module):
    """An epsilon that depends on neither x nor t: DDIM inversion is then exactly undone by DDIM sampling."""

    num_class_embeds = 6

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("eps", eps)

    def forward(self, x, t, class_labels=None):
        return self.eps.expand_as(x).clone()


class DiracOracle(nn.Module):
    """The optimal epsilon for data that is a single image per class: ``x*_c`` (rows of ``points``)."""

    num_class_embeds = 6

    def __init__(self, schedule: NoiseSchedule, points: torch.Tensor) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("points", points)  # [6, C, H, W]

    def forward(self, x, t, class_labels=None):
        a = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1).to(x)
        return (x - a.sqrt() * self.points[class_labels]) / (1 - a).sqrt()


def eps_schedule(T: int = 100) -> NoiseSchedule:
    return NoiseSchedule(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.2,
        prediction_type="epsilon",
    )


def guided(net: nn.Module, schedule: NoiseSchedule | None = None, **kw) -> GuidedDiffusion:
    kw["sampling"] = {"t_start": 60, "steps": 6, **kw.get("sampling", {})}
    return GuidedDiffusion(net=net, schedule=schedule or eps_schedule(), ema_decay=0, **kw)


# ------------------------------------------------------------------------------------------ dropout
def test_null_class_dropout_rate_in_training_only() -> None:
    torch.manual_seed(0)
    model = guided(ClassOffsetNet(), cond_drop_prob=0.2)
    labels = torch.randint(0, 5, (20_000,))
    batch = {"image": torch.zeros(20_000, 1, 1, 1), "class_label": labels}
    out = model.class_labels(batch, train=True)
    dropped = out == model.null_class
    assert model.null_class == 5
    assert abs(dropped.float().mean().item() - 0.2) < 0.015  # binomial sd ~0.003
    assert torch.equal(out[~dropped], labels[~dropped])  # kept labels are untouched
    assert torch.equal(model.class_labels(batch, train=False), labels)  # never dropped outside training
    assert (guided(ClassOffsetNet(), cond_drop_prob=1.0).class_labels(batch, train=True) == 5).all()
    assert torch.equal(guided(ClassOffsetNet(), cond_drop_prob=0.0).class_labels(batch, train=True), labels)


def test_training_loss_feeds_the_dropped_labels_to_the_net() -> None:
    net = ClassOffsetNet()
    model = guided(net, cond_drop_prob=1.0)
    model.train()
    model.diffusion_loss({"image": torch.zeros(4, 1, 8, 8), "class_label": torch.tensor([0, 1, 2, 4])})
    assert torch.equal(net.calls[-1], torch.full((4,), 5))


# ------------------------------------------------------------------------------------------ CFG wiring
@pytest.mark.parametrize("w, expected_offset", [(0.0, 5.0), (1.0, 0.0), (3.0, 5.0 + 3.0 * (0.0 - 5.0))])
def test_cfg_combine_wiring_one_forward_for_both_branches(w: float, expected_offset: float) -> None:
    net = ClassOffsetNet()
    model = guided(net).eval()
    x = torch.randn(3, 1, 4, 4)
    out = model.guided_fn(target_class=0, guidance_scale=w)(x, torch.full((3,), 10))
    # w=0: the null branch (offset 5), w=1: the CN branch (offset 0), w=3: extrapolation away from null
    torch.testing.assert_close(out, 0.1 * x + expected_offset)
    assert len(net.calls) == 1 and torch.equal(net.calls[0], torch.tensor([5, 5, 5, 0, 0, 0]))


def test_guidance_toward_another_target_class() -> None:
    net = ClassOffsetNet()
    out = (
        guided(net)
        .eval()
        .guided_fn(target_class=4, guidance_scale=1.0)(torch.zeros(2, 1, 2, 2), torch.zeros(2).long())
    )
    torch.testing.assert_close(out, torch.full((2, 1, 2, 2), 4.0))


def test_inversion_runs_the_null_class_then_denoising_runs_both_branches() -> None:
    net = ClassOffsetNet()
    model = guided(net).eval()
    model.healthy_counterfactual(torch.zeros(2, 1, 4, 4), GuidedSampling(t_start=60, steps=6))
    assert len(net.calls) == 12  # 6 inversion steps + 6 guided steps
    assert all(torch.equal(c, torch.tensor([5, 5])) for c in net.calls[:6])
    assert all(torch.equal(c, torch.tensor([5, 5, 0, 0])) for c in net.calls[6:])
    net.calls.clear()
    model.healthy_counterfactual(
        torch.zeros(2, 1, 4, 4), GuidedSampling(t_start=60, steps=6, invert=False)
    )
    assert len(net.calls) == 6  # q_sample: no inversion passes


# ------------------------------------------------------------------------------------------ inversion
def test_ddim_inversion_round_trip_with_x_independent_eps_oracle() -> None:
    torch.manual_seed(0)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    model = guided(ConstantEpsNet(torch.randn(1, 1, 8, 8))).eval()
    for w in (0.0, 3.0):
        out = model.healthy_counterfactual(x0, GuidedSampling(t_start=80, steps=8, guidance_scale=w))
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    # q_sample noise (not the oracle's eps) does not come back to x0: the round trip is the inversion's doing
    noised = model.healthy_counterfactual(x0, GuidedSampling(t_start=80, steps=8, invert=False))
    assert (noised - x0).abs().max() > 0.05


def test_translation_with_dirac_oracle_lands_on_the_healthy_image() -> None:
    schedule = eps_schedule()
    g = torch.Generator().manual_seed(1)
    points = torch.rand(6, 1, 8, 8, generator=g) * 1.6 - 0.8  # x*_c for classes 0..4 and null (5)
    model = guided(DiracOracle(schedule, points), schedule).eval()
    x_in = points[5:6].repeat(2, 1, 1, 1)  # the null-class point: inversion is then exact
    cfg = GuidedSampling(t_start=99, steps=10, guidance_scale=1.0)
    torch.testing.assert_close(
        model.healthy_counterfactual(x_in, cfg), points[0:1].expand(2, -1, -1, -1), atol=1e-4, rtol=0
    )
    # w=0 (unconditional) gives the null point back; target_class=3 goes to x*_3
    torch.testing.assert_close(
        model.healthy_counterfactual(x_in, GuidedSampling(t_start=99, steps=10, guidance_scale=0.0)),
        x_in,
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(
        model.healthy_counterfactual(
            x_in, GuidedSampling(t_start=99, steps=10, guidance_scale=1.0, target_class=3)
        ),
        points[3:4].expand(2, -1, -1, -1),
        atol=1e-4,
        rtol=0,
    )


def test_reconstruct_uses_model_sampling_and_validation_scores_few_batches(tiny_net_cfg) -> None:
    torch.manual_seed(0)
    net = build_net({**tiny_net_cfg, "num_class_embeds": 6})
    model = guided(net, val_batches=1, sampling={"t_start": 20, "steps": 2}).eval()
    model.log = lambda *a, **k: None
    batch = {
        "image": torch.rand(4, 1, 16, 16) * 2 - 1,
        "class_label": torch.tensor([0, 0, 4, 4]),
        "label": torch.tensor([0, 0, 1, 1]),
        "brain_mask": torch.ones(4, 1, 16, 16, dtype=torch.bool),
    }
    rec = model.reconstruct(batch)
    assert rec.shape == batch["image"].shape and rec.abs().max() <= 1
    model.validation_step(batch, 0)  # scored (batch 0 of val_batches=1)
    assert sum(p.numel() for p in model.anomaly_val.val_auroc.preds) == 4  # all 4 slices were translated and scored
    model.on_validation_epoch_end()
    model.validation_step(batch, 1)  # loss only
    assert not model.anomaly_val.val_auroc.preds
    # protocols read model.sampling itself (and pass changed copies); the config's fields land there
    assert model.sampling == GuidedSampling(t_start=20, steps=2)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sampling={"guidance_scale": -1.0}), "guidance_scale=-1.0"),
        (dict(sampling={"t_start": 100}), "t_start=100"),
        (dict(sampling={"target_class": 5}), "target_class=5"),
        (dict(sampling={"scale": 3}), "Unknown model.sampling option"),
        (dict(sampling={"sampler": "ddpm"}), "sampler: ddim"),
        (dict(cond_drop_prob=1.5), "cond_drop_prob"),
        (dict(num_classes=4), "net.num_class_embeds=6"),
    ],
)
def test_bad_config_values_raise_config_errors(kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        guided(ClassOffsetNet(), **kw)


def test_net_without_a_null_class_is_rejected(tiny_net_cfg) -> None:
    with pytest.raises(ConfigError, match=r"net.num_class_embeds=None .* needs net.num_class_embeds=6"):
        guided(build_net(tiny_net_cfg))
    with pytest.raises(ConfigError, match=r"net.num_class_embeds=5"):
        guided(build_net({**tiny_net_cfg, "num_class_embeds": 5}))


def test_negative_guidance_at_translation_time_and_bad_labels() -> None:
    model = guided(ClassOffsetNet()).eval()
    with pytest.raises(ConfigError, match="guidance_scale=-0.5"):
        model.healthy_counterfactual(
            torch.zeros(1, 1, 4, 4), dataclasses.replace(model.sampling, guidance_scale=-0.5)
        )
    with pytest.raises(DataError, match=r"class_label values \[7\]"):
        model.class_labels({"image": torch.zeros(1, 1, 4, 4), "class_label": torch.tensor([7])}, train=False)
    with pytest.raises(DataError, match="class_label"):
        model.class_labels({"image": torch.zeros(1, 1, 4, 4)}, train=True)
    assert torch.equal(
        model.class_labels({"image": torch.zeros(2, 1, 4, 4)}, train=False), torch.tensor([5, 5])
    )
