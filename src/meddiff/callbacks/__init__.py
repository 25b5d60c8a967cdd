"""The project's Lightning callbacks (the run machinery's side inside the Trainer).

- :class:`LastCheckpoint`: ``last.ckpt`` every epoch / N steps / on signal / on an exception, with RNG states;
- :class:`StoreConfigInCheckpoint`: the experiment config inside every checkpoint;
- :class:`RunStarted`: a hook once training really started (the checkpoint restored);
- :class:`ConfiguredOptimizer`: optimizer / LR-schedule overrides take effect on resume.

:func:`instantiate_callbacks` builds the ``callbacks`` config group.
"""

from __future__ import annotations

import hydra
from lightning.pytorch import Callback
from omegaconf import DictConfig

from meddiff.callbacks.last_checkpoint import LastCheckpoint
from meddiff.callbacks.optimizer_overrides import ConfiguredOptimizer
from meddiff.callbacks.run_started import RunStarted
from meddiff.callbacks.store_config import StoreConfigInCheckpoint, config_for_checkpoint

__all__ = ["ConfiguredOptimizer", "LastCheckpoint", "RunStarted", "StoreConfigInCheckpoint", "config_for_checkpoint", "instantiate_callbacks"]


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """One callback per entry of the ``callbacks`` group that has a ``_target_``."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]
