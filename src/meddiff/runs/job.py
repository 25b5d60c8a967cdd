"""One train job as a sweep sees it: status in ``status.json``, failures that do not stop a multirun, and the value
returned to the sweeper.

The objective handed to Optuna is the validation score of the checkpoint model selection keeps
(``ModelCheckpoint.best_model_score`` for ``optimized_metric``), not the last epoch's value.

Pruning: Hydra's Optuna sweeper asks for trials, launches jobs with their overrides and only reads the returned
value; it never hands the ``optuna.Trial`` to the job, so a job cannot report intermediate values or be pruned.
Cut hopeless trials with the training budget instead (``trainer.max_epochs``, ``trainer.max_time``,
``limit_train_batches``) or a Lightning ``EarlyStopping`` callback on the same metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from meddiff.runs.identity import RunIdentity, read_sweep_info, run_identity
from meddiff.runs.run_dir import RunLock, check_writable, is_rank_zero
from meddiff.runs.status import FAILED, OK, JobStatus, read_status

log = logging.getLogger("meddiff.job")


def selection_summary(trainer: Any, monitor: str | None) -> dict[str, Any]:
    """What model selection kept: ``monitor``, ``mode``, ``best_score``, ``best_checkpoint``, ``last_checkpoint``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cbs = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, ModelCheckpoint)]
    best_cb = next((c for c in cbs if monitor and c.monitor == monitor), None) or next((c for c in cbs if c.monitor),
                                                                                        None)
    from meddiff.runs.checkpoint_selection import last_checkpoint_of

    # last.ckpt is LastCheckpoint's (Lightning's ModelCheckpoint keeps no last file in meddiff runs)
    last = last_checkpoint_of(trainer)
    if last is None:
        last_cb = next((c for c in cbs if c.last_model_path), None)
        last = (last_cb.last_model_path or None) if last_cb is not None else None
    score = None
    if best_cb is not None and best_cb.best_model_score is not None:
        score = float(best_cb.best_model_score)
        score = None if math.isnan(score) else score
    return {
        "monitor": best_cb.monitor if best_cb is not None else monitor,
        "mode": best_cb.mode if best_cb is not None else None,
        "best_score": score,
        "best_checkpoint": (best_cb.best_model_path or None) if best_cb is not None else None,
        "last_checkpoint": None if last is None else str(last),
    }


def optuna_trial_of(identity: RunIdentity) -> dict[str, Any]:
    """``{"optuna_trial": n, ...}`` for a job of a stored Optuna study (trial = trials before this sweep + job num)."""
    if identity.sweep_dir is None or identity.job_num is None:
        return {}
    opt = read_sweep_info(identity.sweep_dir).get("optuna")
    if not opt or not opt.get("db") or not opt.get("study_name"):
        return {}
    return {"optuna_trial": int(opt.get("trial_offset", 0)) + identity.job_num,
            "optuna_study": opt["study_name"], "_optuna_db": opt["db"]}


def run_job(cfg: DictConfig, train_fn: Callable[[DictConfig, Callable[[], None]], dict[str, Any]]) -> float | None:
    """Run ``train_fn(cfg, started)`` under the run dir's lock and record it; returns the objective for the sweeper
    (None when there is none).

    Only the process holding ``<run_dir>/.lock`` (rank 0) writes ``status.json``, and only from the moment
    ``train_fn`` calls ``started()`` (after its checks and, on a resume, after the checkpoint was restored): a second
    process into a locked run dir, or a refused or failed resume, leaves the earlier run's ``status.json`` as it
    was. A job that fails before it started in a fresh run dir is recorded ``failed`` (sweeps list it).
    ``train_fn`` returns its metrics with a ``"selection"`` entry (:func:`selection_summary`). In a multirun a failed
    job is logged with its traceback and returns None, so the sweep goes on; a single run raises.
    """
    out_dir = Path(cfg.paths.output_dir)
    rank0 = is_rank_zero()
    lock = None
    if rank0:
        check_writable(out_dir, "run dir")
        lock = RunLock(out_dir).acquire()  # a live holder: ConfigError, and nothing is written here
    try:
        return _run_locked(cfg, train_fn, out_dir, rank0)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg: DictConfig, train_fn: Callable[..., dict[str, Any]], out_dir: Path, rank0: bool) -> float | None:
    identity = run_identity(cfg)
    status = JobStatus(out_dir)
    previous = read_status(out_dir)
    had_status = previous is not None
    # a resume keeps the first launch's name and group (its own overrides would rename the run; wandb does the same)
    name = (previous or {}).get("name") or identity.name
    group = (previous or {}).get("group") or identity.group
    trial = optuna_trial_of(identity)
    db = trial.pop("_optuna_db", None)

    def started() -> None:
        if not rank0 or status.started:
            return
        status.start(name=name, group=group, **trial)
        if db is not None:
            _record_trial(db, trial, out_dir, identity)

    try:
        metrics = train_fn(cfg, started)
    except Exception as e:
        if rank0:
            if status.started:
                status.end(FAILED, error=e)
            elif not had_status:
                started()  # a fresh run dir: record the failure (sweep summaries list it)
                status.end(FAILED, error=e)
            else:
                log.error("%s: the earlier run's status.json is left as it was (this attempt never started).",
                          out_dir)
        _close_wandb_run()  # or the next job of the sweep would log into this run
        if identity.sweep_dir is None:
            raise
        log.exception("Job %s failed; the sweep goes on (status.json, summary.csv).", out_dir)
        return None
    started()  # a run that trained nothing (train=false, fast_dev_run) is still recorded
    selection = dict(metrics.get("selection") or {})
    if rank0:
        status.end(OK, **selection)
    value = selection.get("best_score")
    if value is None:
        last = metrics.get(cfg.get("optimized_metric", ""))
        if last is not None:
            log.warning("No checkpoint monitors %s: the objective is the last epoch's value.",
                        cfg.get("optimized_metric"))
            value = float(last)
    return None if value is None else float(value)


def _close_wandb_run() -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=1)
        except Exception as e:  # pragma: no cover
            log.warning("wandb.finish failed: %s", e)


def _record_trial(db: str, trial: dict[str, Any], out_dir: Path, identity: RunIdentity) -> None:
    try:
        from meddiff.runs.sweep.optuna_storage import record_job_dir

        record_job_dir(db, trial["optuna_study"], trial["optuna_trial"], str(out_dir.resolve()),
                       params=identity.overrides)
    except Exception as e:  # bookkeeping must never fail a trial
        log.warning("Could not record the job dir in the Optuna study: %s", e)
