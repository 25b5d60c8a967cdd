"""A CSV logger whose history survives a resume.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it starts, so a resumed run kept only the rows logged after
the resume. :class:`CSVHistoryLogger` (same arguments, plus ``resume_step``) keeps the earlier rows: those logged
before the logger step at which the resumed run continues (``meddiff.runs.loop_state.logging_step_after_resume``);
rows at or after it were logged after the checkpoint was written (e.g. before a ``kill -9``) and are logged again by
the resumed run. Steps continue in the same file.
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from meddiff.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def read_history(path: Path, before_step: int) -> tuple[list[str], list[dict[str, str]], int]:
    """``(header, rows with step < before_step, number of rows dropped)`` of a metrics.csv (empty when missing)."""
    if not path.is_file():
        return [], [], 0
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    kept = [r for r in rows if _step(r) < before_step]
    return header, kept, len(rows) - len(kept)


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "-inf")
    except ValueError:
        return float("-inf")


class CSVHistoryLogger(CSVLogger):
    """``CSVLogger`` that continues an existing ``metrics.csv`` when ``resume_step`` is given (see the module
    docstring); without it, it behaves like Lightning's (a fresh file)."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        header: list[str] = []
        rows: list[dict[str, str]] = []
        path = Path(self.log_dir) / "metrics.csv"
        if self.resume_step is not None:
            header, rows, dropped = read_history(path, self.resume_step)
            if rows or dropped:
                log.info("Continuing %s: %d earlier rows kept, %d rows logged after the checkpoint dropped "
                         "(they are logged again).", path, len(rows), dropped)
        with warnings.catch_warnings():
            if self.resume_step is not None:  # "previous log files will be deleted": not here, they are kept
                warnings.filterwarnings("ignore", message=".*will be deleted when the new ones are saved.*")
            experiment = super().experiment  # Lightning's writer deletes metrics.csv here
        if header:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(path, buf.getvalue())
            experiment.metrics_keys = sorted(header)
        return experiment
