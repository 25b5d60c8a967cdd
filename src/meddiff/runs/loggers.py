"""The loggers of a run, built from the ``logger`` config group: a CSV history that continues on resume, a wandb run
that keeps its id across resumes (``wandb_id.txt``), and whatever else the group names."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict

from meddiff.utils.io import atomic_write_text

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id.txt"
_LIGHTNING_CSV = "lightning.pytorch.loggers.CSVLogger"
_HISTORY_CSV = "meddiff.runs.csv_history.CSVHistoryLogger"


def _wandb_online() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


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

    - CSV: Lightning's ``CSVLogger`` is built as ``meddiff.runs.csv_history.CSVHistoryLogger`` (same arguments), which
      on a resume (``resume_step`` given) keeps the earlier rows of ``metrics.csv`` and continues the file.
    - wandb: offline unless credentials exist; the run id kept in ``<output_dir>/wandb_id.txt`` is reused
      (``resume="allow"``, online and offline), and written there once the wandb run exists; name, group and tags
      left null in the config come from ``identity`` (:class:`meddiff.runs.identity.RunIdentity`).
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
