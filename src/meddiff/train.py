"""Hydra entry point: ``python -m meddiff.train experiment=...`` (console script ``meddiff-train``).

Trains, keeps ``last.ckpt`` + the best checkpoint by ``optimized_metric`` (a validation metric), then evaluates the
best checkpoint with the honest protocol (``meddiff.anomaly.evaluate``): post-processing and thresholds are chosen
on validation data and the test split is touched once. Returns the kept checkpoint's ``optimized_metric``
(validation) for Optuna sweeps.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from meddiff.sweeps.identity import run_identity
from meddiff.sweeps.job import run_job, selection_summary
from meddiff.sweeps.loggers import log_run_config, log_run_outputs
from meddiff.utils.hydra_utils import (
    StoreConfigInCheckpoint,
    instantiate_callbacks,
    instantiate_loggers,
    resume_overrides,
)
from meddiff.utils.io import atomic_write_text

log = logging.getLogger("meddiff.train")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (optionally resuming), then evaluate the best checkpoint. Returns the metrics."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    atomic_write_text(out_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks")) + [StoreConfigInCheckpoint(cfg)]
    identity = run_identity(cfg)
    loggers = instantiate_loggers(cfg.get("logger"), out_dir, identity)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_run_config(loggers, cfg, model, datamodule)

    metrics: dict[str, Any] = {}
    if cfg.get("train", True):
        # our own checkpoints carry config containers (OmegaConf) in hparams: load them in full
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    metrics["selection"] = selection_summary(trainer, cfg.get("optimized_metric"))
    report: dict[str, Any] = {}

    if cfg.get("evaluate", True) and trainer.is_global_zero and not trainer.fast_dev_run:
        from meddiff.eval import evaluate_checkpoint

        ckpt = _best_checkpoint(trainer) or cfg.get("ckpt_path")
        if ckpt is None:
            log.warning("No checkpoint to evaluate (checkpointing disabled?); evaluating the in-memory weights.")
        report = evaluate_checkpoint(
            ckpt, out_dir, eval_cfg=cfg.get("eval"), model=model if ckpt is None else None, datamodule=datamodule,
            loggers=loggers,
        )
        metrics.update({f"test/{k}": v for k, v in report.get("summary", {}).items()})
    if trainer.is_global_zero:
        log_run_outputs(loggers, out_dir, identity.hparams, metrics["selection"], report.get("summary"),
                        step=trainer.global_step)
    _finish_wandb(loggers)
    return metrics


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    if cb is None:
        return None
    return cb.best_model_path or cb.last_model_path or None


def _finish_wandb(loggers: list) -> None:
    """Between multirun jobs each wandb run must be closed or the next job logs into it."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def _hydra_main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    # status.json, failures that do not stop a multirun, objective = best checkpoint's validation score
    return run_job(cfg, train)


def main() -> None:
    """Console script: handles the ``resume=`` shortcut before Hydra picks the run dir."""
    sys.argv.extend(resume_overrides(sys.argv[1:]))
    _hydra_main()


if __name__ == "__main__":
    main()
