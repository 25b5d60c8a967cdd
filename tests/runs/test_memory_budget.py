"""A training batch that cannot fit in memory is a ConfigError naming the estimate, the memory available and the
settings to lower, before anything is allocated; the estimate is a lower bound, so no shipped config is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from meddiff.errors import ConfigError
from meddiff.runs.memory_budget import activation_bytes, check_first_batch_fits

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
GB = 2**30


def _compose(overrides: list[str], tmp_path: Path):
    from meddiff.runs.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}", f"paths.work_dir={tmp_path}"])


def test_no_shipped_experiment_is_refused(tmp_path):
    """Every experiment with its defaults fits a 4 GB budget (a small GPU), every CPU demo 1 GB: the estimate never
    refuses what runs today."""
    for experiment in EXPERIMENTS:
        extra = ["net.pretrained_dir=/nonexistent"] if experiment == "rsna_pddpm_pretrained" else []
        cfg = _compose([f"experiment={experiment}", *extra], tmp_path)
        budget = 1 * GB if experiment.startswith("demo") else 4 * GB
        check_first_batch_fits(cfg, available=(budget, "test budget"))


@pytest.mark.parametrize("net", ["unet_tiny", "unet_small", "unet_rsna"])
def test_the_estimate_stays_below_the_activations_training_really_stores(net):
    """Autograd's saved tensors of one forward pass (what the backward pass needs) exceed the estimate >= 2x."""
    from meddiff.nets import MonaiUNet

    cfg = yaml.safe_load((CONFIGS / "net" / f"{net}.yaml").read_text())
    cfg.pop("_target_")
    model = MonaiUNet(**cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, cfg["in_channels"], 64, 64)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(x, torch.zeros(1, dtype=torch.long))
    estimate = activation_bytes(1, cfg["in_channels"], (64, 64), tuple(cfg["channels"]), "32-true")
    assert 2 * estimate <= sum(saved.values())


def test_a_batch_that_cannot_fit_names_the_estimate_the_memory_and_what_to_lower(tmp_path):
    cfg = _compose(["experiment=demo", "data.image_size=4096", "trainer.precision=32-true"], tmp_path)
    with pytest.raises(ConfigError) as err:
        check_first_batch_fits(cfg, available=(16 * GB, "GPU 0"))
    text = str(err.value)
    assert "16.0 GB is available on GPU 0" in text and "needs at least ~" in text
    for setting in ("data.image_size", "data.batch_size", "net.channels"):
        assert setting in text
    assert check_first_batch_fits(_compose(["experiment=demo"], tmp_path), available=(16 * GB, "GPU 0")) > 0


def test_mnist_at_4096_px_fails_fast_on_the_command_line(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "meddiff.train", "experiment=demo", "data.image_size=4096",
                           "logger=csv", f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "ConfigError" in out and "data.image_size" in out and "cannot fit in memory" in out
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()
