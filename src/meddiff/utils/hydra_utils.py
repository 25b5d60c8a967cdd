"""Instantiating callbacks and loggers from config; resume handling; the config stored in checkpoints."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from meddiff.utils.io import atomic_write_text

log = logging.getLogger(__name__)

CKPT_CONFIG_KEY = "meddiff_config"
WANDB_ID_FILE = "wandb_id.txt"


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


def instantiate_loggers(cfg: DictConfig | None, output_dir: str | Path) -> list[Logger]:
    """Build loggers; wandb goes offline unless credentials exist and reuses the run id kept in the run dir."""
    if not cfg:
        return []
    loggers: list[Logger] = []
    for _name, lg in cfg.items():
        if not isinstance(lg, DictConfig) or "_target_" not in lg:
            continue
        if "Wandb" in lg._target_:
            lg = lg.copy()
            with open_dict(lg):
                if str(lg.get("offline", "auto")) == "auto":
                    lg.offline = not _wandb_online()
                id_file = Path(output_dir) / WANDB_ID_FILE
                if lg.get("id") is None and id_file.is_file():
                    lg.id = id_file.read_text().strip()
                    lg.resume = "allow"
            logger = hydra.utils.instantiate(lg)
            atomic_write_text(id_file, str(logger.version))
            loggers.append(logger)
        else:
            loggers.append(hydra.utils.instantiate(lg))
    return loggers


def resume_overrides(argv: list[str]) -> list[str]:
    """Extra overrides so that a resume continues in the original run dir.

    ``resume=<run_dir>`` becomes ``ckpt_path=<run_dir>/checkpoints/last.ckpt hydra.run.dir=<run_dir>``;
    ``ckpt_path=<run_dir>/checkpoints/x.ckpt`` of a train run also reuses ``<run_dir>`` (Lightning's
    ``ckpt_path="last"`` only looks in the current run dir, which Hydra makes anew each time).
    """
    args = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    extra: list[str] = []
    run_dir: Path | None = None
    if args.get("resume") not in (None, "null"):
        run_dir = Path(args["resume"]).expanduser().resolve()
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            sys.exit(f"resume={args['resume']}: no checkpoints/last.ckpt in that folder; pass the run dir of a train run.")
        if "ckpt_path" not in args:
            extra.append(f"ckpt_path={ckpt}")
    elif args.get("ckpt_path") not in (None, "null"):
        ckpt = Path(args["ckpt_path"]).expanduser().resolve()
        if ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / ".hydra").is_dir():
            run_dir = ckpt.parent.parent
    if run_dir is not None and "hydra.run.dir" not in args:
        extra.append(f"hydra.run.dir={run_dir}")
    return extra


def config_for_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved experiment config (data, schedule, net, model) saved inside every checkpoint."""
    full = OmegaConf.to_container(cfg, resolve=True)
    return {k: full[k] for k in ("data", "schedule", "net", "model", "eval", "seed", "task_name") if k in full}


class StoreConfigInCheckpoint(Callback):
    """Puts the experiment config into each checkpoint so ``meddiff-eval ckpt_path=...`` needs nothing else."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = config_for_checkpoint(cfg)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_CONFIG_KEY] = self.config
