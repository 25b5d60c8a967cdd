"""Shared fixtures: tiny nets and schedules so unit tests run in seconds on a CPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)

# configs name the project's resolvers (${meddiff.num_workers:...}, ...); tests compose them without an entry point
from meddiff.runs.resolvers import register_resolvers  # noqa: E402

register_resolvers()


@pytest.fixture(autouse=True)
def _no_wandb_run_left_open():
    """wandb keeps one global run per process: a test that leaves it open makes the next test's logger reuse it
    (under xdist, whichever test shares the worker). Close it after every test that imported wandb."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@pytest.fixture
def tiny_net_cfg() -> dict:
    return dict(in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                num_res_blocks=1, norm_num_groups=8, num_head_channels=8)


@pytest.fixture
def schedule():
    from meddiff.diffusion import NoiseSchedule

    return NoiseSchedule(num_train_timesteps=100, beta_schedule="linear", beta_start=1e-4, beta_end=0.02 * 10,
                         prediction_type="sample")
