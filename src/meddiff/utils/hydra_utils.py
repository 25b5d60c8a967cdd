"""Instantiating callbacks and loggers from config; the config stored in checkpoints; the ``resume=`` shortcut.

Resume logic lives in ``meddiff.utils.resume``, checkpoint loading/saving in ``meddiff.utils.checkpoint``; the names
below that come from there are re-exported for the entry points.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

import meddiff.sweeps.resolvers  # noqa: F401  (${meddiff.help:...} and ${meddiff.add:...} in configs/hydra)
from meddiff.utils import run_dir as _run_dir  # noqa: F401  (registers ${meddiff.run_dir:...} for Hydra)
from meddiff.utils.checkpoint import CKPT_CONFIG_KEY
from meddiff.utils.io import atomic_write_text
from meddiff.utils.resume import resume_argv

__all__ = ["CKPT_CONFIG_KEY", "WANDB_ID_FILE", "StoreConfigInCheckpoint", "config_for_checkpoint",
           "instantiate_callbacks", "instantiate_loggers", "resume_overrides"]

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id.txt"
_LIGHTNING_CSV = "lightning.pytorch.loggers.CSVLogger"
_HISTORY_CSV = "meddiff.utils.csv_history.CSVHistoryLogger"


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def _wandb_online() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def is_rank_zero() -> bool:
    """False in the extra processes of a DDP run (they re-run the entry point and must not write run files)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def new_wandb_id() -> str:
    """A fresh wandb run id (for runs whose id must be known before they start, e.g. a standalone eval run)."""
    try:
        from wandb.sdk.lib.runid import generate_id

        return generate_id()
    except ImportError:  # pragma: no cover - other wandb versions
        import secrets
        import string

        return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _stored_wandb_id(id_file: Path) -> str | None:
    """The run id kept in ``wandb_id.txt``; None when absent or the text ``None`` meddiff <= 0.1 wrote there."""
    if not id_file.is_file():
        return None
    text = id_file.read_text().strip()
    return None if text in ("", "None", "null") else text


def instantiate_loggers(cfg: DictConfig | None, output_dir: str | Path, identity: Any = None,
                        resume_step: int | None = None) -> list[Logger]:
    """Build loggers.

    - CSV: Lightning's ``CSVLogger`` is built as ``meddiff.utils.csv_history.CSVHistoryLogger`` (same arguments), which
      on a resume (``resume_step`` given) keeps the earlier rows of ``metrics.csv`` and continues the file.
    - wandb: offline unless credentials exist; the run id kept in ``<output_dir>/wandb_id.txt`` is reused
      (``resume="allow"``, online and offline), and written there once the wandb run exists; name, group and tags
      left null in the config come from ``identity`` (:class:`meddiff.sweeps.identity.RunIdentity`).
    """
    if not cfg:
        return []
    loggers: list[Logger] = []
    for _name, lg in cfg.items():
        if not isinstance(lg, DictConfig) or "_target_" not in lg:
            continue
        if lg._target_ in (_LIGHTNING_CSV, _HISTORY_CSV):
            lg = lg.copy()
            with open_dict(lg):
                lg._target_ = _HISTORY_CSV
                lg.resume_step = resume_step
            loggers.append(hydra.utils.instantiate(lg))
        elif "Wandb" in lg._target_:
            loggers.append(_wandb_logger(lg, Path(output_dir), identity))
        else:
            loggers.append(hydra.utils.instantiate(lg))
    return loggers


def _wandb_logger(lg: DictConfig, output_dir: Path, identity: Any = None) -> Logger:
    lg = lg.copy()
    id_file = output_dir / WANDB_ID_FILE
    with open_dict(lg):
        if str(lg.get("offline", "auto")) == "auto":
            lg.offline = not _wandb_online()
        if lg.get("id") is None and (stored := _stored_wandb_id(id_file)):
            lg.id = stored
        lg.resume = "allow"
        if identity is not None:
            for key in ("name", "group", "tags"):
                if lg.get(key) is None:
                    lg[key] = getattr(identity, key)
    logger = hydra.utils.instantiate(lg)
    run = logger.experiment  # creates (or resumes) the run on rank 0; a dummy elsewhere
    run_id = getattr(run, "id", None)
    if isinstance(run_id, str) and run_id:
        atomic_write_text(id_file, run_id + "\n")
    return logger


def resume_overrides(argv: list[str], rank: int = 0) -> list[str]:
    """The command line after the ``resume=`` shortcut (``meddiff.utils.resume.resume_argv``)."""
    return resume_argv(argv, rank=rank)


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
