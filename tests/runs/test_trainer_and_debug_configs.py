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
                                              ("overfit", "overfit_batches", 3),
                                              ("profiler", "profiler", "simple")])
def test_debug_presets(preset, key, value):
    t = _trainer(f"debug={preset}")
    assert t[key] == value
    assert t["accelerator"] == "cpu" and t["devices"] == 1  # all build on debug/default
