"""The experiment config inside every checkpoint, so ``meddiff-eval ckpt_path=...`` needs nothing else."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf

from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY


def config_for_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved experiment config (data, schedule, net, model) saved inside every checkpoint (plain containers,
    so checkpoints load with ``torch.load(weights_only=True)``)."""
    full = OmegaConf.to_container(cfg, resolve=True)
    return {k: full[k] for k in ("data", "schedule", "net", "model", "eval", "seed", "task_name") if k in full}


class StoreConfigInCheckpoint(Callback):
    """Puts the experiment config into each checkpoint so ``meddiff-eval ckpt_path=...`` needs nothing else."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = config_for_checkpoint(cfg)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_CONFIG_KEY] = self.config
