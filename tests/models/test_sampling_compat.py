"""meddiff 0.1's four spellings of sampling settings in stored configs are translated to model.sampling on load
(meddiff.compat.translate_sampling_keys), and a current config passes through unchanged."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from meddiff.compat import KEY_TRANSLATORS, translate_sampling_keys, translate_stored_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))

OLD = {
    "unconditional (0.1 fixture)": (
        {"_target_": "meddiff.models.UnconditionalDiffusion", "patch_size": 14,
         "recon": {"method": "one_step", "t_start": 550, "num_steps": 10, "patch_size": None, "stride": None,
                   "noise": "gaussian", "max_batch": 256, "seed": 0, "n_noise": 1},
         "val_recon": {"n_noise": 1}},
        {"_target_": "meddiff.models.UnconditionalDiffusion", "patch_size": 14,
         "sampling": {"sampler": "one_step", "t_start": 550, "steps": 10, "patch_size": None, "stride": None,
                      "noise": "gaussian", "max_batch": 256, "seed": 0, "draws": 1},
         "val_sampling": {"draws": 1}}),
    "guided": (
        {"_target_": "meddiff.models.guided.GuidedDiffusion", "recon": None, "val_score_batches": 3,
         "translate": {"t_start": 400, "num_steps": 5, "guidance_scale": 3.0, "invert": True, "target_class": 0,
                       "seed": 0}},
        {"_target_": "meddiff.models.guided.GuidedDiffusion", "val_batches": 3,
         "sampling": {"sampler": "ddim", "t_start": 400, "steps": 5, "guidance_scale": 3.0, "invert": True,
                      "target_class": 0, "seed": 0}}),
    "conditional": (
        {"_target_": "meddiff.models.conditional.ConditionalDiffusion", "recon": None, "sampler": "ddim",
         "sample_steps": 25, "eta": 0.0, "timestep_spacing": "leading", "clip_sample": True, "num_samples": 1,
         "sample_seed": 0, "cond_skip": True, "val_psnr_batches": 2, "val_sample_steps": 10},
        {"_target_": "meddiff.models.conditional.ConditionalDiffusion", "cond_skip": True, "val_batches": 2,
         "sampling": {"sampler": "ddim", "steps": 25, "eta": 0.0, "spacing": "leading", "clip": True, "draws": 1,
                      "seed": 0},
         "val_sampling": {"sampler": "ddim", "steps": 10, "eta": 0.0, "draws": 1}}),
    "refiner": (
        {"_target_": "meddiff.models.refiner.RefinerDiffusion", "residual_scale": "auto", "sampler": "ddim",
         "num_steps": 10, "eta": 0.0, "t_start": None, "timestep_spacing": "trailing", "sample_seed": 0,
         "val_num_steps": 4, "val_score_batches": None},
        {"_target_": "meddiff.models.refiner.RefinerDiffusion", "residual_scale": "auto", "val_batches": None,
         "sampling": {"sampler": "ddim", "steps": 10, "eta": 0.0, "t_start": None, "spacing": "trailing", "seed": 0},
         "val_sampling": {"steps": 4}}),
}


@pytest.mark.parametrize("family", sorted(OLD))
def test_old_spellings_become_model_sampling(family):
    old, new = OLD[family]
    cfg = {"model": copy.deepcopy(old), "eval": {"t_start": [1, 2]}}
    translate_stored_config(cfg)
    assert cfg == {"model": new, "eval": {"t_start": [1, 2]}}
    assert translate_sampling_keys in KEY_TRANSLATORS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_current_configs_pass_unchanged(experiment, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.root_dir={tmp_path}",
                                          "net.pretrained_dir=/x"] if "pretrained" in experiment else
                      [f"experiment={experiment}", f"paths.root_dir={tmp_path}"])
    plain = OmegaConf.to_container(cfg, resolve=False)
    before = copy.deepcopy(plain)
    translate_sampling_keys(plain)
    assert plain == before
