"""The leaderboards of a benchmark sweep as ``wandb.Table`` s, in a wandb run of the sweep's own (optional).

One run per sweep (``job_type="leaderboard"``, files under ``<sweep_dir>/wandb``), one table per task logged under
``leaderboard/<task>`` with the columns of the CSV (:data:`meddiff.benchmark.leaderboard.COLUMNS`). Mode: the
environment's ``WANDB_MODE`` when set, else ``offline`` (``wandb sync <sweep_dir>/wandb/offline-run-*`` uploads it);
``WANDB_MODE=disabled``, or wandb not installed, skips it with one log line. Never raises.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meddiff.benchmark.leaderboard import COLUMNS

__all__ = ["log_leaderboards"]

log = logging.getLogger(__name__)


def _cell(v: Any) -> Any:
    """A table cell: numbers and strings as they are, None kept, anything else as text."""
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def log_leaderboards(boards: Mapping[str, Sequence[Mapping[str, Any]]], sweep_dir: str | Path,
                     project: str = "meddiff", group: str | None = None, name: str = "leaderboard") -> bool:
    """Log ``{task: rows}`` (:func:`~meddiff.benchmark.leaderboard.build_leaderboards`) as one table per task in a new
    wandb run under ``sweep_dir``; returns whether it was logged."""
    if not boards:
        return False
    mode = os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        log.info("leaderboard not logged to wandb: WANDB_MODE=disabled.")
        return False
    try:
        import wandb
    except ImportError:
        log.info("leaderboard not logged to wandb: wandb is not installed (pip install wandb).")
        return False
    try:
        run = wandb.init(project=project, group=group, name=name, job_type="leaderboard", dir=str(sweep_dir),
                         mode=mode, tags=["benchmark_uad", "leaderboard"])
        try:
            tables = {f"leaderboard/{task}": wandb.Table(columns=list(COLUMNS),
                                                         data=[[_cell(r.get(c)) for c in COLUMNS] for r in rows],
                                                         allow_mixed_types=True)
                      for task, rows in boards.items()}
            run.log(tables)
        finally:
            run.finish()
    except Exception as e:  # noqa: BLE001 - a table must never fail the sweep
        log.warning("leaderboard not logged to wandb: %s: %s", type(e).__name__, e)
        return False
    log.info("Leaderboards (%s) logged to wandb (%s, %s).", ", ".join(boards), mode, sweep_dir)
    return True
