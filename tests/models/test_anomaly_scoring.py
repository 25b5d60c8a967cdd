"""Anomaly scoring is a component the anomaly families hold (no mixin chain, no `log` override), not base state."""

from __future__ import annotations

import ast
import inspect
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import meddiff.models.base as base_module
from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError
from meddiff.models import (
    CoarseGenerator,
    ConditionalDiffusion,
    DiffusionModule,
    GuidedDiffusion,
    RefinerDiffusion,
    UnconditionalDiffusion,
)
from meddiff.models.base import _index_batch
from meddiff.models.validation import AnomalyValidation
from meddiff.nets import build_net


def _net(in_channels: int = 1, **kw) -> nn.Module:
    return build_net(dict(in_channels=in_channels, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                          num_res_blocks=1, norm_num_groups=8, num_head_channels=8, **kw))


def test_only_scoring_models_carry_the_anomaly_validation_component():
    s = NoiseSchedule(50)
    cond = ConditionalDiffusion(net=_net(2), schedule=s, sampling={"steps": 5})
    assert not hasattr(cond, "anomaly_val") and cond.eval_protocol == "denoise"
    unc = UnconditionalDiffusion(net=_net(), schedule=s, sampling={"t_start": 10}, scoring={"reduction": "max"})
    assert isinstance(unc.anomaly_val, AnomalyValidation) and unc.eval_protocol == "anomaly"
    assert unc.sampling.t_start == 10 and unc.anomaly_val.scoring.reduction == "max"
    guided = GuidedDiffusion(net=_net(num_class_embeds=6), schedule=s, sampling={"t_start": 20, "steps": 2})
    assert isinstance(guided.anomaly_val, AnomalyValidation) and guided.anomaly_val.scoring.reduction == "mean"
    # one vocabulary: protocols read model.sampling and model.anomaly_val.scoring, no second name for either
    old_names = ("recon_cfg", "scoring_cfg", "translate_cfg")
    assert not any(hasattr(m, old) for m in (cond, unc, guided) for old in old_names)
    from meddiff.models.cddpm import ConditionedDDPM
    from meddiff.models.coarse_gan import CoarseGenerator
    from meddiff.models.dae import DenoisingAutoencoder
    from meddiff.models.refiner import RefinerDiffusion

    families = (CoarseGenerator, RefinerDiffusion, DenoisingAutoencoder, ConditionedDDPM)
    assert not any(hasattr(cls, old) for cls in families for old in old_names)
    assert not hasattr(cond, "denoise")  # the denoise protocol calls reconstruct(batch, sampling) like the others
    assert DiffusionModule.eval_protocol is None  # each model class names its protocol


@pytest.mark.parametrize("cls", [UnconditionalDiffusion, GuidedDiffusion, RefinerDiffusion, CoarseGenerator,
                                 ConditionalDiffusion])
def test_families_are_composed_not_chained(cls):
    """One base each (DiffusionModule, or LightningModule for the GAN), no mixin, no override of log()."""
    bases = [b for b in cls.__mro__ if b not in (object,) and b.__module__.startswith("meddiff.")]
    assert bases[0] is cls and all(b in (cls, DiffusionModule) for b in bases), bases
    assert cls.log is L.LightningModule.log


def test_the_base_knows_no_anomaly_code_and_no_batch_keys_of_other_models():
    tree = ast.parse(Path(inspect.getfile(base_module)).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith(("meddiff.anomaly", "meddiff.protocols", "torchmetrics", "meddiff.models.validation"))
                   for m in imported)
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not {"cond", "coarse", "brain_mask", "class_label", "pool", "known_healthy"} & strings


def test_model_fn_gathers_only_the_declared_conditioning_keys():
    batch = {"image": torch.arange(3.0), "cond": torch.arange(3.0) * 10, "other": torch.arange(3.0)}
    idx = torch.tensor([2, 2, 0])
    out = _index_batch(batch, idx, ("cond",))
    assert out["cond"].tolist() == [20.0, 20.0, 0.0] and out["other"] is batch["other"]
    assert ConditionalDiffusion.conditioning_keys == ("cond",) and UnconditionalDiffusion.conditioning_keys == ()


def test_reconstruct_takes_an_explicit_config_and_never_stores_it():
    torch.manual_seed(0)
    model = UnconditionalDiffusion(net=_net(), schedule=NoiseSchedule(50), sampling={"t_start": 10}).eval()
    x = {"image": torch.rand(2, 1, 16, 16) * 2 - 1}
    deeper = replace(model.sampling, t_start=40)
    a, b = model.reconstruct(x), model.reconstruct(x, deeper)
    assert not torch.allclose(a, b) and model.sampling.t_start == 10
    assert torch.equal(model.reconstruct(x, replace(model.sampling)), a)


@pytest.mark.parametrize("cls, kw, field", [
    (ConditionalDiffusion, dict(net_in=2, sampling={"steps": 5, "t_start": 10}), "t_start"),
    (GuidedDiffusion, dict(net_in=1, sampling={"t_start": 20, "steps": 2, "draws": 3}), "draws"),
    (GuidedDiffusion, dict(net_in=1, sampling={"t_start": 20, "steps": 2}, val_sampling={"eta": 0.5}), "eta"),
])
def test_sampling_fields_a_family_does_not_use_are_config_errors(cls, kw, field):
    net_in = kw.pop("net_in")
    net_kw = {"num_class_embeds": 6} if cls is GuidedDiffusion else {}
    with pytest.raises(ConfigError, match=rf"sampling\.{field}=.* is not used by"):
        cls(net=_net(net_in, **net_kw), schedule=NoiseSchedule(50), **kw)


def test_old_sampling_keys_are_not_accepted_as_aliases():
    with pytest.raises(TypeError, match="recon"):
        UnconditionalDiffusion(net=_net(), schedule=NoiseSchedule(50), recon={"t_start": 10})
