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

import meddiff.sweeps.resolvers  # noqa: F401  (${meddiff.help:...} and ${meddiff.add:...} in configs/hydra)
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


def is_rank_zero() -> bool:
    """False in the extra processes of a DDP run (they re-run the entry point and must not write run files)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def new_wandb_id() -> str:
    """A fresh wandb run id (chosen before the run starts, so ``wandb_id.txt`` holds the real id at once)."""
    try:
        from wandb.sdk.lib.runid import generate_id

        return generate_id()
    except ImportError:  # pragma: no cover - other wandb versions
        import secrets
        import string

        return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _stored_wandb_id(id_file: Path) -> str | None:
    if not id_file.is_file():
        return None
    text = id_file.read_text().strip()
    return None if text in ("", "None", "null") else text  # older runs wrote the text None


def instantiate_loggers(cfg: DictConfig | None, output_dir: str | Path, identity: Any = None) -> list[Logger]:
    """Build loggers. wandb: offline unless credentials exist; the run id comes from ``<run_dir>/wandb_id.txt``
    (a resume continues that run) or is chosen now and written there; name, group and tags left null in the config
    come from ``identity`` (:class:`meddiff.sweeps.identity.RunIdentity`)."""
    if not cfg:
        return []
    loggers: list[Logger] = []
    for _name, lg in cfg.items():
        if not isinstance(lg, DictConfig) or "_target_" not in lg:
            continue
        if "Wandb" in lg._target_:
            lg = lg.copy()
            id_file = Path(output_dir) / WANDB_ID_FILE
            with open_dict(lg):
                if str(lg.get("offline", "auto")) == "auto":
                    lg.offline = not _wandb_online()
                if lg.get("id") is None:
                    stored = _stored_wandb_id(id_file)
                    lg.id = stored or new_wandb_id()
                    if stored:
                        lg.resume = "allow"
                if identity is not None:
                    for key in ("name", "group", "tags"):
                        if lg.get(key) is None:
                            lg[key] = getattr(identity, key)
            logger = hydra.utils.instantiate(lg)
            if is_rank_zero():
                atomic_write_text(id_file, f"{lg.id}\n")
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
