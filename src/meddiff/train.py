"""Hydra entry point: ``python -m meddiff.train experiment=...`` (console script ``meddiff-train``).

Trains, keeps ``last.ckpt`` + the best checkpoint by ``optimized_metric`` (a validation metric), then evaluates the
checkpoint ``optimized_metric`` selected (``meddiff.runs.checkpoint_selection.checkpoint_to_evaluate``; the rule is
recorded as ``report["checkpoint_rule"]``) with the model's protocol (``meddiff.protocols``, via ``meddiff.eval.evaluate_checkpoint``): settings
and thresholds are chosen on validation data and the test split is touched once. Returns the kept checkpoint's
``optimized_metric`` (validation) for Optuna sweeps; under multirun a failed job is recorded (``status.json``) and
does not stop the sweep (``meddiff.runs.job``), and the sweep then exits non-zero naming the failures and its summary.

A run dir is one you can trust (``meddiff.runs``, ``meddiff.callbacks``):

- unique name, a lock file while the run is live (only its holder writes ``status.json``), writability checked
  before training;
- nothing written before the checks pass: on a resume, the config's targets are trusted classes, the changes are
  allowed, and the checkpoint's weights fit the model; ``status.json`` becomes ``running`` only once the checkpoint
  was restored, so a failed or refused resume leaves ``last.ckpt``, the best checkpoint and ``status.json`` as
  they were; optimizer / LR-schedule overrides on resume take effect (``meddiff.callbacks.ConfiguredOptimizer``);
- ``checkpoints/last.ckpt`` after every epoch, every ``checkpoint_every_n_steps`` steps, on the preemption signal (USR2 under submitit, USR1 under plain sbatch), and when
  training stops on SIGTERM / Ctrl-C / an exception; every checkpoint written atomically and verified, read
  weights-only;
- ``resume=<run_dir>`` continues the run under its own config (command-line overrides on top, the difference
  recorded in ``resume-<k>/``), its CSV history, RNG states and wandb run; a requeued SLURM job continues by itself;
- a failed run's traceback is in its ``train.log``.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from meddiff.callbacks import (
    ConfiguredOptimizer,
    LastCheckpoint,
    RunStarted,
    StoreConfigInCheckpoint,
    instantiate_callbacks,
)
from meddiff.compat import translate_stored_config
from meddiff.errors import ConfigError
from meddiff.runs.checkpoint_io import (
    LAST_NAME,
    AtomicCheckpointIO,
    check_weights_fit,
    load_checkpoint,
    newest_checkpoint,
)
from meddiff.runs.checkpoint_selection import checkpoint_to_evaluate
from meddiff.runs.identity import run_identity
from meddiff.runs.job import run_job, selection_summary
from meddiff.runs.log_outputs import log_run_config, log_run_outputs
from meddiff.runs.loggers import instantiate_loggers
from meddiff.runs.loop_state import logging_step_after_resume
from meddiff.runs.memory_budget import check_first_batch_fits
from meddiff.runs.resolvers import register_resolvers
from meddiff.runs.resume import (
    RESOLVED_NAME,
    check_resume_config,
    check_resumed_config,
    command_line_keys,
    restore_stored_values,
    resume_argv,
    stored_config,
)
from meddiff.runs.run_dir import RunDirInUse, RunLock, is_slurm_requeue
from meddiff.utils.io import atomic_write_text, remove_stale_tmp

log = logging.getLogger("meddiff.train")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


@dataclass(frozen=True)
class Start:
    """Where a run starts: the checkpoint to continue from (or None), where this launch's config snapshot goes, and
    the logger step the CSV history continues from."""

    ckpt_path: str | None
    snapshot_dir: Path
    resume_step: int | None


def train(cfg: DictConfig, started: Callable[[], None] | None = None) -> dict[str, Any]:
    """Fit (optionally resuming), then evaluate the best checkpoint. Returns the metrics.

    ``started()`` is called once training really started (on a resume: after the checkpoint was restored), or
    before evaluation when nothing is trained; ``meddiff.runs.job.run_job`` (which holds the run dir's lock) records
    ``status.json`` from there. Nothing in the run dir is written before the checks pass and the weights fit.
    """
    out_dir = Path(cfg.paths.output_dir)
    started = started or (lambda: None)
    ckpt_dir = out_dir / "checkpoints"
    start = _start(cfg, out_dir)
    if cfg.get("train", True):
        check_first_batch_fits(cfg)  # before anything is allocated: a ConfigError naming the settings to lower
    L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    if start.ckpt_path is not None and cfg.get("train", True):
        # before anything is written: a checkpoint that does not fit is one clear error, and the run's files stay
        check_weights_fit(model, load_checkpoint(start.ckpt_path, mmap=True), start.ckpt_path,
                          strict=bool(getattr(model, "strict_loading", True)))
    if rank_zero_only.rank == 0:
        for folder in (out_dir, ckpt_dir):  # temporary files of saves a kill -9 interrupted
            remove_stale_tmp(folder)
        atomic_write_text(start.snapshot_dir / RESOLVED_NAME, OmegaConf.to_yaml(cfg, resolve=True))
        if cfg.get("print_config", False):  # the composed config as a tree (configs/train.yaml: print_config)
            from meddiff.runs.config_tree import print_config

            print_config(cfg)

    callbacks = instantiate_callbacks(cfg.get("callbacks")) + [StoreConfigInCheckpoint(cfg), ConfiguredOptimizer(),
                                                                 RunStarted(started)]
    if cfg.trainer.get("enable_checkpointing", True) is False:
        log.warning("trainer.enable_checkpointing=false: no last.ckpt; this run cannot be resumed.")
    else:
        callbacks.append(LastCheckpoint(ckpt_dir, every_n_train_steps=cfg.get("checkpoint_every_n_steps")))
    identity = run_identity(cfg)
    loggers = instantiate_loggers(cfg.get("logger"), out_dir, identity, resume_step=start.resume_step)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 plugins=[AtomicCheckpointIO()])
    log_run_config(loggers, cfg, model, datamodule)

    metrics: dict[str, Any] = {}
    try:
        if cfg.get("train", True):
            # checkpoints load weights-only through AtomicCheckpointIO (stored configs pass the allow-list)
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=start.ckpt_path, weights_only=True)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    except SystemExit as e:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(e, SIGTERMException):
            # preemption: last.ckpt was written on the way out; a non-zero code tells the scheduler
            log.warning("Stopped by SIGTERM at step %d; continue with: python -m meddiff.train resume=%s",
                        trainer.global_step, out_dir)
            _finish_wandb(loggers)
            raise SystemExit(128 + signal.SIGTERM) from e
        raise
    started()  # nothing trained (train=false, fast_dev_run): the run still starts here
    metrics["selection"] = selection_summary(trainer, cfg.get("optimized_metric"))
    report: dict[str, Any] = {}

    if cfg.get("evaluate", True) and trainer.is_global_zero and not trainer.fast_dev_run:
        from meddiff.eval import evaluate_checkpoint

        ckpt, rule = checkpoint_to_evaluate(trainer, cfg.get("optimized_metric"))
        if ckpt is None and start.ckpt_path is not None:
            ckpt, rule = start.ckpt_path, "the checkpoint this run continued from (nothing newer was written)"
        if ckpt is None:
            rule = "in-memory weights (no checkpoint written: checkpointing disabled?)"
            log.warning("No checkpoint to evaluate (checkpointing disabled?); evaluating the in-memory weights.")
        log.info("Evaluating %s: %s.", ckpt or "the in-memory weights", rule)
        report = evaluate_checkpoint(
            ckpt, out_dir, eval_cfg=cfg.get("eval"), model=model if ckpt is None else None, datamodule=datamodule,
            loggers=loggers, checkpoint_rule=rule,
        )
        metrics.update({f"test/{k}": v for k, v in report.get("summary", {}).items()})
    if trainer.is_global_zero:
        log_run_outputs(loggers, out_dir, identity.hparams, metrics["selection"], report.get("summary"),
                        step=trainer.global_step)
    _finish_wandb(loggers)
    return metrics


def _start(cfg: DictConfig, out_dir: Path) -> Start:
    """Resume checks: the config against the run's own (``resume=``), a requeued SLURM job's checkpoint, and no
    silent overwrite of a run dir that already holds a run."""
    ckpt_path = cfg.get("ckpt_path")
    snapshot_dir = out_dir
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume)).expanduser().resolve()
        if run_dir != out_dir.resolve():
            raise ConfigError(f"resume={run_dir} continues that run in its own folder, but this run's folder is "
                              f"{out_dir}; resume with `python -m meddiff.train resume={run_dir}` (meddiff-train).")
        snapshot_dir = _snapshot_dir(out_dir)
        stored = stored_config(out_dir)
        if stored is not None:
            translate_stored_config(stored)  # moved classes / renamed keys of older versions: today's names
        # the run's own recipe, not today's YAMLs: values changed in configs/ since the run are put back (every rank)
        ignored = restore_stored_values(cfg, stored, _command_line_keys(out_dir))
        current = OmegaConf.to_container(cfg, resolve=True)
        check_resumed_config(current, out_dir)  # every group, callbacks/logger/trainer included
        if rank_zero_only.rank == 0:
            check_resume_config(stored, current, out_dir, snapshot_dir, force=bool(cfg.get("resume_force", False)),
                                yaml_ignored=ignored)
        ckpt_path = ckpt_path or str(out_dir / "checkpoints" / LAST_NAME)
    elif ckpt_path is None:
        previous = [*sorted((out_dir / "checkpoints").glob(LAST_NAME)), *sorted(out_dir.glob("hpc_ckpt_*.ckpt"))]
        if previous and is_slurm_requeue():
            found = newest_checkpoint(previous)
            if found is not None:
                log.warning("Requeued SLURM job: continuing %s from %s.", out_dir, found)
                ckpt_path = str(found)
        elif previous and cfg.get("train", True) and rank_zero_only.rank == 0:
            raise ConfigError(
                f"{out_dir} already holds a run ({previous[0]}); training anew there would overwrite it. Continue it "
                f"with `python -m meddiff.train resume={out_dir}`, or choose another hydra.run.dir.")
    resume_step = None
    if ckpt_path is not None and cfg.get("train", True):
        resume_step = logging_step_after_resume(load_checkpoint(ckpt_path, mmap=True))
    return Start(ckpt_path=None if ckpt_path is None else str(ckpt_path), snapshot_dir=snapshot_dir,
                 resume_step=resume_step)


def _command_line_keys(out_dir: Path) -> list[str]:
    """The keys this resume set on its command line (the run's replayed overrides excluded)."""
    import yaml
    from hydra.core.hydra_config import HydraConfig

    from meddiff.runs.resume import LAUNCH_KEYS, latest_snapshot

    try:
        merged = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra: no command line
        return []
    _, folder = latest_snapshot(out_dir)
    old = yaml.safe_load((folder / "overrides.yaml").read_text()) if (folder / "overrides.yaml").is_file() else []
    return [k for k in command_line_keys(old or [], merged) if k not in LAUNCH_KEYS]


def _snapshot_dir(out_dir: Path) -> Path:
    """This launch's snapshot folder: ``hydra.output_subdir`` (``resume-<k>``, set by :func:`main`), else the next
    free ``resume-<k>`` (a programmatic call), so the run's original snapshot is never overwritten."""
    from meddiff.runs.resume import SNAPSHOT_PREFIX, next_snapshot_name

    try:
        from hydra.core.hydra_config import HydraConfig

        sub = HydraConfig.get().output_subdir
    except ValueError:  # not under Hydra
        sub = None
    if sub and str(sub).startswith(SNAPSHOT_PREFIX):
        return out_dir / str(sub)
    return out_dir / next_snapshot_name(out_dir)


def _finish_wandb(loggers: list) -> None:
    """Between multirun jobs each wandb run must be closed or the next job logs into it."""
    from meddiff.runs.log_outputs import kind

    if any(kind(lg) == "wandb" for lg in loggers):
        import wandb

        wandb.finish()


def resolve_cpu_settings(cfg: DictConfig) -> None:
    """``torch_threads`` (an int, or ``auto``: the cores the load average leaves free) and
    ``trainer.precision: auto`` (CPU: bf16-mixed where the CPU has native bf16, else 32-true; GPU: bf16-mixed where
    supported, else 16-mixed) become concrete values before anything is built, so the resolved config, the
    checkpoints and the report record what actually ran."""
    from omegaconf import open_dict

    from meddiff.utils.cpu import apply_threads, choose_precision

    if cfg.get("torch_threads") is not None:
        threads = cfg.torch_threads
        apply_threads(threads if str(threads) == "auto" else int(threads))
    trainer = cfg.get("trainer")
    if trainer is not None and str(trainer.get("precision")) == "auto":
        if str(trainer.get("accelerator", "auto")) == "cpu" or not torch.cuda.is_available():
            precision = choose_precision("auto")
        else:
            precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        with open_dict(cfg):
            cfg.trainer.precision = precision


def _log_failure(exc: BaseException) -> None:
    """The traceback into the run's log files (``train.log``); Hydra prints it on stderr itself."""
    record = logging.LogRecord("meddiff.train", logging.ERROR, __file__, 0, "Run failed:\n%s", (
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(),), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        torch.set_float32_matmul_precision("high")
        resolve_cpu_settings(cfg)
        # status.json, failures that do not stop a multirun, objective = best checkpoint's validation score
        return run_job(cfg, train)
    except BaseException as e:
        # a process refused by another run's lock must not write into that run's train.log either
        if not (isinstance(e, SystemExit) and e.code in (0, None)) and not isinstance(e, RunDirInUse):
            _log_failure(e)
        raise


def main() -> None:
    """Console script: handles the ``resume=`` shortcut (and checks an explicit run dir) before Hydra starts."""
    argv = sys.argv[1:]
    try:
        register_resolvers()  # ${meddiff.run_dir:...}, ${meddiff.add:...}, ${meddiff.help:...}
        new_argv = resume_argv(argv, rank=getattr(rank_zero_only, "rank", 0) or 0)
        _check_explicit_run_dir(new_argv)
    except ConfigError as e:
        sys.exit(f"meddiff-train: {e}")
    sys.argv[1:] = new_argv
    _hydra_main()
    _exit_if_a_sweep_job_failed()


def _exit_if_a_sweep_job_failed() -> None:
    """A multirun whose jobs did not all end ``ok`` exits non-zero, naming the failures and the summary (each failed
    job recorded its error and went on so that the others ran and the summary was written)."""
    from meddiff.runs.sweep.callback import SWEEP_OUTCOMES

    bad = [o for o in SWEEP_OUTCOMES if o.not_ok]
    if not bad:
        return
    lines = [f"meddiff-train: {o.not_ok} of {o.jobs} sweep jobs did not finish ok in {o.sweep_dir}; see "
             f"{o.summary or o.sweep_dir / 'summary.md'} (status and first error line per job) and each failed "
             "job's train.log." for o in bad]
    sys.exit("\n".join(lines))


def _check_explicit_run_dir(argv: list[str]) -> None:
    """An explicit ``hydra.run.dir`` (``hydra.sweep.dir`` with ``-m``): can it be made, and is no live run using it?
    Checked before Hydra writes there."""
    from meddiff.runs.run_dir import check_creatable

    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    dirs = [a.split("=", 1)[1] for a in argv if a.startswith(key)]
    if not dirs:
        return
    folder = Path(dirs[-1].strip("\"'")).expanduser()
    check_creatable(folder, "sweep dir" if multirun else "run dir")
    if not multirun and rank_zero_only.rank == 0:
        RunLock(folder).check()


if __name__ == "__main__":
    main()
