"""``<run_dir>/status.json``: what happened to one job, written atomically at its start and at its end.

Only the process holding the run dir's lock writes it (``meddiff.runs.job``), and a resume rewrites it only once its
checkpoint was restored: a refused or failed attempt leaves the earlier record as it was.

A job that is still ``running`` when nobody runs it was killed (or is on another machine); a ``failed`` job
carries the first line of its error (the full traceback is in the job's log). Fields::

    state: running | ok | failed
    error: "ValueError: ..." (failed only)
    started_at / ended_at: ISO times;  wall_time_s: float
    host, pid
    monitor, mode, best_score: the validation metric model selection keeps and its best value
    best_checkpoint, last_checkpoint: paths (last_checkpoint: LastCheckpoint's last.ckpt)
    optuna_trial: int (Optuna sweeps)
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from meddiff.utils.io import atomic_write_json

STATUS_FILE = "status.json"
RUNNING, OK, FAILED = "running", "ok", "failed"


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The job's status record, or None if it has none (older runs, or not a train job)."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_status(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the status record and write it atomically. Returns the new record."""
    record = read_status(run_dir) or {}
    record.update(fields)
    atomic_write_json(Path(run_dir) / STATUS_FILE, record)
    return record


def first_error_line(exc: BaseException) -> str:
    """``"<ExceptionType>: <first line of the message>"`` (what a table cell can hold).

    Hydra's ``InstantiationException`` only says which target failed; the error that matters is its cause.
    """
    while type(exc).__name__ == "InstantiationException" and exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


class JobStatus:
    """Records a job's start and end in ``status.json``; the wall time is measured here."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._t0 = time.perf_counter()
        self.started = False  # start() was called by this process

    def start(self, **fields: Any) -> None:
        self._t0 = time.perf_counter()
        # a resumed run rewrites the record: no stale error or end time from the previous attempt
        path = self.run_dir / STATUS_FILE
        previous = read_status(self.run_dir) or {}
        record = {"state": RUNNING, "started_at": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                  "attempt": int(previous.get("attempt", 0)) + 1, **fields}
        atomic_write_json(path, record)
        self.started = True

    def end(self, state: str, error: BaseException | None = None, **fields: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {"error": first_error_line(error)} if error is not None else {}
        return write_status(self.run_dir, state=state, ended_at=_now(),
                            wall_time_s=round(time.perf_counter() - self._t0, 3), **extra, **fields)
