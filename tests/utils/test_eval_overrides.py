"""meddiff-eval overrides of net / schedule must fit the trained weights; sampling options apply."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from meddiff.errors import ConfigError
from meddiff.eval import load_from_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "demo_tiny_v0.1.ckpt"


def test_without_overrides_the_stored_model_is_rebuilt():
    model, cfg = load_from_checkpoint(FIXTURE)
    assert cfg.schedule.prediction_type == "sample" and model.schedule.prediction_type == "sample"


@pytest.mark.parametrize("overrides, key", [
    ({"net": {"channels": [8, 32]}}, "net.channels"),            # the weights do not fit
    ({"net": {"num_res_blocks": 2}}, "net.num_res_blocks"),
    ({"schedule": {"prediction_type": "epsilon"}}, "schedule.prediction_type"),  # fits, but means another thing
    ({"schedule": {"beta_schedule": "cosine"}}, "schedule.beta_schedule"),
    ({"model": {"net": {"channels": [8, 32]}}}, "net.channels"),  # the model's own copy
])
def test_overrides_that_do_not_fit_the_weights_are_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=rf"{key}.*(do not fit|does not fit)"):
        load_from_checkpoint(FIXTURE, OmegaConf.create(overrides))


def test_fitting_overrides_apply():
    model, cfg = load_from_checkpoint(FIXTURE, OmegaConf.create(
        {"model": {"sampling": {"t_start": 300, "steps": 4}}, "schedule": {"prediction_type": "sample"},
         "net": {"channels": [8, 16]}}))  # net/schedule equal to the stored ones are no change
    assert model.sampling.t_start == 300 and model.sampling.steps == 4
