"""Trainer limits are plain config keys (no ``+``); the debug presets compose and set what they promise."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from meddiff.runs.cli_help import CONFIG_DIR


def _trainer(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=demo", *overrides])
    return OmegaConf.to_container(cfg.trainer, resolve=False)


def test_limits_need_no_plus():
    t = _trainer("trainer.limit_train_batches=0.5", "trainer.limit_val_batches=3", "trainer.val_check_interval=7")
    assert (t["limit_train_batches"], t["limit_val_batches"], t["val_check_interval"]) == (0.5, 3, 7)


@pytest.mark.parametrize("preset,key,value", [("fast_dev_run", "fast_dev_run", True),
                                              ("limit", "limit_train_batches", 5),
                                              ("overfit", "overfit_batches", 1),
                                              ("profiler", "profiler", "simple")])
def test_debug_presets(preset, key, value):
    t = _trainer(f"debug={preset}")
    assert t[key] == value
    assert t["accelerator"] == "cpu" and t["devices"] == 1  # all build on debug/default


@pytest.mark.parametrize("experiment", ["demo", "mnist_splotch"])
def test_overfit_preset_schedule_spans_the_run_and_its_warm_up_ends_early(experiment):
    """debug=overfit used to stop at 60 steps inside the demo's 100-step warm-up (LR never at its peak) while the
    cosine ran over the demo's 1,650 steps: the loss fell 0.92 -> 0.31 only."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", "debug=overfit"])
    t = cfg.trainer
    steps = t.overfit_batches * t.max_epochs
    assert t.max_steps == steps >= 200
    sched = OmegaConf.select(cfg, "model.lr_scheduler")
    if sched is not None:
        assert sched.total_steps == steps  # the cosine decays over this run, not the experiment's budget
        assert sched.warmup_steps <= steps // 3  # the peak LR is reached early
    assert cfg.model.fixed_noise_seed == 0  # the same t and noise every step: the loss can reach ~0


@pytest.mark.parametrize("experiment", ["demo", "brainomaly_coarse"])
def test_fixed_noise_only_under_the_overfit_preset(experiment):
    """Normal training resamples t and the noise; a model without the option (the coarse GAN) gets no such key."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        plain = compose(config_name="train", overrides=[f"experiment={experiment}"])
        overfit = compose(config_name="train", overrides=[f"experiment={experiment}", "debug=overfit"])
    if experiment == "demo":
        assert plain.model.fixed_noise_seed is None
    else:
        assert "fixed_noise_seed" not in plain.model and "fixed_noise_seed" not in overfit.model
