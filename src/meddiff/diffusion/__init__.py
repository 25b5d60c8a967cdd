"""Scheduler core: noise schedule, samplers and noise sources (pure torch; no Lightning, data or anomaly code).

See ``docs/contracts.md`` ("Scheduler core"). Public API::

    NoiseSchedule(num_train_timesteps, beta_schedule, beta_start, beta_end, trained_betas, prediction_type)
    make_timesteps, make_partial_timesteps, ddpm_step, ddim_step, sample, reconstruct_from, one_step_x0,
    ddim_invert, cfg_combine
    gaussian_like, simplex_noise, make_noise
"""

from meddiff.diffusion.noise import NOISE_KINDS, gaussian_like, make_noise, simplex_noise
from meddiff.diffusion.samplers import (
    SAMPLERS,
    SPACINGS,
    VARIANCE_TYPES,
    ModelFn,
    cfg_combine,
    ddim_invert,
    ddim_step,
    ddpm_step,
    make_partial_timesteps,
    make_timesteps,
    one_step_x0,
    reconstruct_from,
    sample,
)
from meddiff.diffusion.schedule import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    NoiseSchedule,
    canonical_prediction_type,
)

__all__ = [
    "BETA_SCHEDULES",
    "NOISE_KINDS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SPACINGS",
    "VARIANCE_TYPES",
    "ModelFn",
    "NoiseSchedule",
    "canonical_prediction_type",
    "cfg_combine",
    "ddim_invert",
    "ddim_step",
    "ddpm_step",
    "gaussian_like",
    "make_noise",
    "make_partial_timesteps",
    "make_timesteps",
    "one_step_x0",
    "reconstruct_from",
    "sample",
    "simplex_noise",
]
