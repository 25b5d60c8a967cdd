"""Anomaly-scoring state lives with the models that score anomalies, not in the DiffusionModule base."""

from __future__ import annotations

import ast
import inspect
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import meddiff.models.base as base_module
from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError
from meddiff.models import (
    AnomalyScoring,
    ConditionalDiffusion,
    DiffusionModule,
    GuidedDiffusion,
    PartialDiffusionReconstruction,
    UnconditionalDiffusion,
)
from meddiff.models.base import _index_batch
from meddiff.nets import build_net

SCORING_STATE = ("scoring_cfg", "recon_cfg", "val_auroc")


def _net(in_channels: int = 1, **kw) -> nn.Module:
    return build_net(dict(in_channels=in_channels, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                          num_res_blocks=1, norm_num_groups=8, num_head_channels=8, **kw))


def test_only_scoring_models_carry_scoring_state():
    s = NoiseSchedule(50)
    cond = ConditionalDiffusion(net=_net(2), schedule=s, sample_steps=5)
    assert not any(hasattr(cond, a) for a in SCORING_STATE) and not cond.score_in_validation
    assert cond.eval_protocol == "denoise"
    unc = UnconditionalDiffusion(net=_net(), schedule=s, recon={"t_start": 10}, scoring={"reduction": "max"})
    assert isinstance(unc, PartialDiffusionReconstruction) and unc.eval_protocol == "anomaly"
    assert unc.recon_cfg.t_start == 10 and unc.scoring_cfg.reduction == "max" and unc.score_in_validation
    guided = GuidedDiffusion(net=_net(num_class_embeds=6), schedule=s, translate={"t_start": 20, "num_steps": 2})
    assert isinstance(guided, AnomalyScoring) and hasattr(guided, "val_auroc") and hasattr(guided, "scoring_cfg")
    assert not hasattr(guided, "recon_cfg")  # it translates (model.translate); no partial-diffusion settings
    assert DiffusionModule.eval_protocol is None  # each model class names its protocol


def test_the_base_knows_no_anomaly_code_and_no_batch_keys_of_other_models():
    tree = ast.parse(Path(inspect.getfile(base_module)).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith(("meddiff.anomaly", "meddiff.protocols", "torchmetrics")) for m in imported)
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not {"cond", "coarse", "brain_mask", "class_label"} & strings


def test_model_fn_gathers_only_the_declared_conditioning_keys():
    batch = {"image": torch.arange(3.0), "cond": torch.arange(3.0) * 10, "other": torch.arange(3.0)}
    idx = torch.tensor([2, 2, 0])
    out = _index_batch(batch, idx, ("cond",))
    assert out["cond"].tolist() == [20.0, 20.0, 0.0] and out["other"] is batch["other"]
    assert ConditionalDiffusion.conditioning_keys == ("cond",) and UnconditionalDiffusion.conditioning_keys == ()


def test_reconstruct_takes_an_explicit_config_and_never_stores_it():
    torch.manual_seed(0)
    model = UnconditionalDiffusion(net=_net(), schedule=NoiseSchedule(50), recon={"t_start": 10}).eval()
    x = {"image": torch.rand(2, 1, 16, 16) * 2 - 1}
    deeper = replace(model.recon_cfg, t_start=40)
    a, b = model.reconstruct(x), model.reconstruct(x, deeper)
    assert not torch.allclose(a, b) and model.recon_cfg.t_start == 10
    assert torch.equal(model.reconstruct(x, replace(model.recon_cfg)), a)


@pytest.mark.parametrize("cls, kw", [
    (ConditionalDiffusion, dict(net_in=2, sample_steps=5)),
    (GuidedDiffusion, dict(net_in=1, translate={"t_start": 20, "num_steps": 2})),
])
def test_legacy_recon_none_is_accepted_and_a_real_one_rejected(cls, kw):
    net_in = kw.pop("net_in")
    net_kw = {"num_class_embeds": 6} if cls is GuidedDiffusion else {}
    with pytest.warns(DeprecationWarning, match="model.recon"):
        model = cls(net=_net(net_in, **net_kw), schedule=NoiseSchedule(50), recon=None, **kw)
    assert not hasattr(model, "recon_cfg")
    with pytest.raises(ConfigError, match="model.recon is not used"):
        cls(net=_net(net_in, **net_kw), schedule=NoiseSchedule(50), recon={"t_start": 5}, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        cls(net=_net(net_in, **net_kw), schedule=NoiseSchedule(50), **kw)  # no recon: no warning
