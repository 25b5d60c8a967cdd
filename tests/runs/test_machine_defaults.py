"""GPU-first defaults that follow the machine: DataLoader workers, per-device values, trainer=gpu precision."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from meddiff.runs import resolvers
from meddiff.runs.cli_help import CONFIG_DIR


@pytest.fixture
def machine(monkeypatch):
    def set_(cuda: bool, cores: int) -> None:
        monkeypatch.setattr(resolvers, "_cuda", lambda: cuda)
        monkeypatch.setattr(resolvers, "usable_cores", lambda: cores)
    return set_


def test_num_workers_from_the_machine(machine):
    machine(cuda=True, cores=32)
    assert resolvers.num_workers(8) == 8
    machine(cuda=True, cores=4)
    assert resolvers.num_workers(8) == 4
    machine(cuda=False, cores=32)
    assert resolvers.num_workers(8) == 0 and resolvers.num_workers(8, 2) == 2
    machine(cuda=False, cores=2)
    assert resolvers.num_workers(8, 2) == 1  # one core stays with the model


def test_per_device(machine):
    machine(cuda=False, cores=2)
    assert resolvers.per_device(16, 128) == 16
    machine(cuda=True, cores=2)
    assert resolvers.per_device(16, 128) == 128


def test_num_workers_resolves_in_a_config(machine):
    resolvers.register_resolvers()
    cfg = OmegaConf.create({"data": {"num_workers": "${meddiff.num_workers:8}", "cpu2": "${meddiff.num_workers:8,2}"}})
    machine(cuda=True, cores=16)
    assert cfg.data.num_workers == 8 and cfg.data.cpu2 == 8
    machine(cuda=False, cores=16)
    assert cfg.data.num_workers == 0 and cfg.data.cpu2 == 2


def test_trainer_gpu_precision_is_auto():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=gpu"])
    assert cfg.trainer.precision == "auto" and cfg.trainer.accelerator == "gpu"
