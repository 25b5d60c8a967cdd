"""Integration tests run the real entry points in subprocesses, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A run that takes seconds: tiny UNet, two digit classes, few images.
FAST = [
    "experiment=demo",
    "net=unet_tiny",
    "data.digits=[0,1]",
    "data.val_fraction=0.05",
    "data.test_fraction=0.05",
    "data.max_train=64",
    "data.batch_size=32",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",  # the demo validates every 5th epoch: tiny runs need val/auroc at epoch 1
    "model.sampling.draws=1",              # the demo averages 8 noise draws: one keeps tiny runs fast
    "eval.n_boot=20",
    "eval.median_size=[1]",
]


def run_cli(module: str, args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def fast() -> list[str]:
    return list(FAST)


@pytest.fixture
def run(tmp_path):
    def _run(module: str, *args: str, timeout: int = 600, env: dict | None = None):
        return run_cli(module, list(args), cwd=tmp_path, timeout=timeout, env=env)

    return _run
