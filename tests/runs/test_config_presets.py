"""Config conveniences users of lightning-hydra-template expect: callbacks=early_stopping, the composed config printed
as a tree at start (print_config), machine-specific configs/local/ ignored by git."""

from __future__ import annotations

import shutil
import subprocess

import hydra
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from meddiff.runs.cli_help import CONFIG_DIR
from meddiff.runs.resolvers import register_resolvers


def _cfg(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=demo", *overrides])


def test_early_stopping_preset_watches_the_selected_metric():
    cfg = _cfg("callbacks=early_stopping", "callbacks.early_stopping.patience=7")
    es = hydra.utils.instantiate(cfg.callbacks.early_stopping)
    assert es.monitor == cfg.optimized_metric == "val/auroc"
    assert es.mode == cfg.callbacks.model_checkpoint.mode == "max" and es.patience == 7
    assert "model_checkpoint" in cfg.callbacks  # built on the default callbacks


def test_config_tree_printed_with_every_group_and_switchable(capsys):
    from meddiff.runs.config_tree import print_config

    cfg = _cfg()
    assert cfg.print_config is True and _cfg("print_config=false").print_config is False
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain["paths"] = {k: "/tmp/run" for k in ("root_dir", "data_dir", "log_dir", "output_dir", "work_dir")}
    print_config(OmegaConf.create(plain))  # outside Hydra's run: paths made concrete
    out = capsys.readouterr().out
    for branch in ("data", "model", "trainer", "callbacks", "(top level)"):
        assert branch in out
    assert "max_steps: 1650" in out and "optimized_metric: val/auroc" in out


def test_local_configs_are_optional_and_ignored_by_git():
    train = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())
    assert {"optional local": "default"} in train["defaults"]
    assert (CONFIG_DIR / "local" / "example.yaml").is_file()
    _cfg("local=example")  # the committed template composes
    if shutil.which("git") is None:
        pytest.skip("no git")
    root = CONFIG_DIR.parent
    ignored = subprocess.run(["git", "check-ignore", "-q", "configs/local/default.yaml"], cwd=root)
    kept = subprocess.run(["git", "check-ignore", "-q", "configs/local/example.yaml"], cwd=root)
    assert ignored.returncode == 0 and kept.returncode == 1
