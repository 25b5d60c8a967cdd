"""Hydra callback for every multirun (registered in ``configs/hydra/default.yaml``).

Before the first job (``on_multirun_start``):
- writes ``<sweep_dir>/sweep.json``: sweep id, the swept keys (jobs use them for their wandb name, tags and
  TensorBoard hparams), the optimized metric;
- for an Optuna sweep with a stored study (``<sweep_dir>/optuna.db``): marks trials left ``RUNNING`` by a killed
  sweep as failed, runs only the trials still missing from the budget ``hydra.sweeper.n_trials`` (completed trials
  count), and numbers new job dirs after the trials already in the study (job dir name == trial number).

After each job (``on_job_end``) and after the last one (``on_multirun_end``): ``summary.csv``, ``summary.md``, ``summary.png`` in the sweep dir, and
for Optuna ``optimization_results.yaml`` with the best trial's job dir and checkpoint.

Hydra 1.3's basic sweeper re-raises the first failed job's exception after its batch (which would skip this
summary), so a train job inside a multirun records its failure in ``status.json`` and returns instead of raising
(``meddiff.runs.job``); Optuna counts it as a failed trial (the presets allow any failure rate).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

import meddiff.runs.resolvers as resolvers
from meddiff.runs.identity import swept_keys, write_sweep_info

log = logging.getLogger(__name__)

DEFAULT_SUBDIR = "${hydra.job.num}"


@dataclass(frozen=True)
class SweepOutcome:
    """What a finished multirun left: its folder, jobs, jobs not ``ok`` and the summary file (None if unwritten)."""

    sweep_dir: Path
    jobs: int
    not_ok: int
    summary: Path | None


#: the outcome of each multirun this process ran (``meddiff.train.main`` exits non-zero when a job failed)
SWEEP_OUTCOMES: list[SweepOutcome] = []


def job_states(sweep_dir: Path, since: float = 0.0) -> list[str]:
    """The ``status.json`` state of every job dir of a sweep launched at or after ``since`` (a time stamp: the jobs
    of this launch, not those of an earlier, killed launch of a resumed Optuna sweep); ``"missing"`` when a job left
    no status."""
    from meddiff.runs.status import read_status

    states = []
    for d in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        launched = max((f.stat().st_mtime for f in (d / ".hydra").iterdir()), default=0.0)
        if launched >= since:
            states.append(str((read_status(d) or {}).get("state", "missing")))
    return states


def is_optuna(config: DictConfig) -> bool:
    return "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).lower()


def optuna_db_path(config: DictConfig) -> Path | None:
    """The SQLite file of the sweeper's study storage (None: in memory or not SQLite)."""
    storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    if storage is None:
        return None
    if isinstance(storage, DictConfig):
        path = storage.get("path")
        return Path(str(path)).expanduser().resolve() if path else None
    text = str(storage)
    return Path(text[len("sqlite:///"):]).expanduser().resolve() if text.startswith("sqlite:///") else None


class SweepSummary(Callback):
    """Writes ``sweep.json`` before and the summary table after every multirun (see the module docstring)."""

    def __init__(self, enabled: bool = True, resume_optuna: bool = True) -> None:
        self.enabled = enabled
        self.resume_optuna = resume_optuna
        self._started_at = 0.0  # on_multirun_start: the jobs launched from then on are this sweep's
        # job processes of remote launchers (submitit, joblib) build this callback before they resolve the job's
        # hydra.sweep.subdir (${meddiff.add:...}) and never pass through meddiff.train.main
        resolvers.register_resolvers()

    # ------------------------------------------------------------------ start
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started_at = time.time() - 1.0  # file times may be rounded down
        if not self.enabled:
            return
        try:
            self._start(config)
        except Exception as e:  # bookkeeping must never stop a sweep
            log.warning("Sweep bookkeeping (sweep.json / Optuna resume) failed: %s", e)

    def _start(self, config: DictConfig) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if isinstance(params, DictConfig) else {}
        info: dict[str, Any] = {
            "sweep_id": sweep_dir.name,
            "swept": swept_keys(list(config.hydra.overrides.task), params),
            "sweeper": str(config.hydra.sweeper.get("_target_", "")),
            "optimized_metric": config.get("optimized_metric"),
        }
        if is_optuna(config):
            info["optuna"] = self._optuna_start(config, sweep_dir)
        write_sweep_info(sweep_dir, info)

    def _optuna_start(self, config: DictConfig, sweep_dir: Path) -> dict[str, Any]:
        sweeper = config.hydra.sweeper
        db = optuna_db_path(config)
        study_name = sweeper.get("study_name")
        out: dict[str, Any] = {"db": str(db) if db else None, "study_name": study_name, "trial_offset": 0,
                               "direction": str(sweeper.get("direction", "maximize"))}
        if db is None:
            log.warning("Optuna study kept in memory: a killed sweep starts over. The hparams_search presets store it "
                        "in <sweep_dir>/optuna.db (hydra.sweeper.storage).")
            return out
        if study_name is None:
            log.warning("hydra.sweeper.study_name is null: optuna names the study at random and a rerun cannot resume "
                        "it. Set hydra.sweeper.study_name.")
            return out
        if not self.resume_optuna or not db.is_file():
            return out
        import optuna

        from meddiff.runs.sweep.optuna_storage import sqlite_storage

        storage = sqlite_storage(db)
        try:
            study = optuna.load_study(study_name=str(study_name), storage=storage)
        except KeyError:
            return out
        states = optuna.trial.TrialState
        trials = study.get_trials(deepcopy=False)
        stale = [t for t in trials if t.state == states.RUNNING]
        for t in stale:  # left by a killed sweep (one sweeper process per study is assumed)
            if hasattr(storage, "set_trial_state_values"):
                storage.set_trial_state_values(t._trial_id, states.FAIL)
            else:
                storage.set_trial_state(t._trial_id, states.FAIL)
        complete = sum(t.state == states.COMPLETE for t in trials)
        budget = int(sweeper.n_trials)
        remaining = max(0, budget - complete)
        out.update(trial_offset=len(trials), n_trials=budget, complete_before=complete)
        with read_write(config), open_dict(config):
            config.hydra.sweeper.n_trials = remaining
            seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed", default=None)
            if seed is not None and len(trials):
                # a sampler restarted with its old seed would suggest the first trials' values again
                config.hydra.sweeper.sampler.seed = int(seed) + len(trials)
            if len(trials) and OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") == DEFAULT_SUBDIR:
                # job configs are recomposed from these overrides: new job dirs continue after the last trial
                config.hydra.overrides.hydra.append(
                    f"hydra.sweep.subdir='${{{resolvers.ADD}:${{hydra.job.num}},{len(trials)}}}'")
        log.info("Resuming Optuna study %r in %s: %d trials so far (%d complete, %d stale running -> failed); "
                 "running %d more to reach n_trials=%d.", study_name, db, len(trials), complete, len(stale),
                 remaining, budget)
        return out

    # -------------------------------------------------------------------- end
    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        """After each job of a sweep: refresh the summary (progress of a long sweep; a table even if the sweeper
        itself dies later, e.g. Optuna's ``best_trial`` when every trial failed)."""
        from hydra.types import RunMode

        if not self.enabled or OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        try:
            write_sweep_summary(Path(str(config.hydra.sweep.dir)).resolve(), quiet=True)
        except Exception as e:
            log.debug("Sweep summary after a job failed: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        summary = None
        try:
            summary = write_sweep_summary(sweep_dir).get("md")
        except Exception as e:
            log.warning("Could not write the sweep summary in %s: %s (meddiff-compare %s builds it too)",
                        sweep_dir, e, sweep_dir)
        states = job_states(sweep_dir, since=self._started_at) if sweep_dir.is_dir() else []
        SWEEP_OUTCOMES.append(SweepOutcome(sweep_dir, len(states), sum(s != "ok" for s in states), summary))
        if is_optuna(config):
            try:
                write_optimization_results(config, sweep_dir)
            except Exception as e:
                log.warning("Could not complete optimization_results.yaml: %s", e)


def write_sweep_summary(sweep_dir: str | Path, quiet: bool = False) -> dict[str, Path]:
    """Read every job of ``sweep_dir`` and write ``summary.csv/.md/.png`` there."""
    from meddiff.runs.sweep.run_summary import find_runs, read_run
    from meddiff.runs.sweep.table import build_table, write_summary

    sweep_dir = Path(sweep_dir)
    records = [read_run(d) for d in find_runs([sweep_dir]) if d != sweep_dir]
    df = build_table(records)
    written = write_summary(df, sweep_dir, title=f"Sweep {sweep_dir.name}")
    n_bad = int((df["status"] != "ok").sum()) if len(df) else 0
    msg = f"Sweep summary: {written['md']} ({len(df)} jobs" + (f", {n_bad} not ok)" if n_bad else ")")
    if not quiet:
        (log.warning if n_bad else log.info)(msg)
    return written


def write_optimization_results(config: DictConfig, sweep_dir: Path) -> Path | None:
    """Complete Hydra's ``optimization_results.yaml`` (best params and value) with the best trial's number, job dir,
    checkpoint, the study and its trial counts."""
    from meddiff.runs.sweep.optuna_storage import JOB_DIR_ATTR, load_trials
    from meddiff.runs.sweep.run_summary import find_runs, read_run
    from meddiff.utils.io import atomic_write_text

    db = optuna_db_path(config)
    path = sweep_dir / "optimization_results.yaml"
    results: dict[str, Any] = {}
    if path.is_file():
        results = OmegaConf.to_container(OmegaConf.load(path)) or {}
    runs = {r.trial: r for r in (read_run(d) for d in find_runs([sweep_dir]) if d != sweep_dir) if r.trial is not None}
    if db is None or not db.is_file():
        return None
    import optuna

    study_name, trials = load_trials(db, config.hydra.sweeper.get("study_name"))
    states = optuna.trial.TrialState
    complete = [t for t in trials if t.state == states.COMPLETE and t.value is not None]
    results.update(study_name=study_name, storage=str(db), n_trials=len(trials), n_complete=len(complete),
                   n_failed=sum(t.state == states.FAIL for t in trials))
    if complete:
        maximize = "max" in str(config.hydra.sweeper.get("direction", "maximize")).lower()
        best = (max if maximize else min)(complete, key=lambda t: t.value)
        run = runs.get(best.number)
        job_dir = best.user_attrs.get(JOB_DIR_ATTR) or (str(run.run_dir) if run else None)
        results.update(name="optuna", best_params=dict(best.params), best_value=float(best.value),
                       best_trial=best.number, best_job_dir=job_dir,
                       best_checkpoint=run.best_checkpoint if run else None,
                       objective=run.monitor if run else config.get("optimized_metric"))
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(results)))
    return path
