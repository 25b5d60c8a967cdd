"""``last.ckpt`` kept current: :class:`LastCheckpoint`.

It writes ``last.ckpt`` after every training epoch, every ``every_n_train_steps`` optimizer steps, on the requeue
signal (at the next batch boundary; inside a SLURM job it then requeues the job with ``scontrol requeue``), and when
training stops on an exception (SIGTERM, Ctrl-C, a crash in a training step) after at least one new optimizer step.

SLURM preemption, one mechanism: the requeue signal (:func:`requeue_signal`) is ``$SUBMITIT_PREEMPT_SIGNAL`` if set,
else USR2 inside a job started by submitit (``launcher=submitit_slurm``: what submitit asks SLURM to send,
``--signal=USR2@<signal_delay_s>``), else USR1 (a plain ``sbatch --signal=USR1@90`` job, Lightning's convention). This
callback holds that signal during fit, in place of submitit's handler (which requeues and exits from inside the
signal handler, wherever training is) and of Lightning's (which saves from inside the handler, mid-step): it saves
at the next batch boundary, then runs ``scontrol requeue <job>``; the requeued attempt (``SLURM_RESTART_COUNT`` >= 1)
reruns the same job, and ``meddiff.train`` continues it from ``last.ckpt``. submitit's own requeue (its
``checkpoint`` hook, ``max_num_timeout``) is not used. It also stores the RNG states
(:mod:`meddiff.runs.rng`), restored on resume. Files go through the Trainer's checkpoint IO
(:class:`meddiff.runs.checkpoint_io.AtomicCheckpointIO`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint

from meddiff.errors import ConfigError
from meddiff.runs.checkpoint_io import LAST_NAME
from meddiff.runs.loop_state import mark_finished_epoch_completed, normalise_batch_boundary
from meddiff.runs.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)


class LastCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt`` current (see the module docstring for when it is written).

    A Lightning ``Checkpoint`` so that Lightning runs it after the other callbacks, in particular after the
    ``ModelCheckpoint`` that keeps the best checkpoint: ``last.ckpt`` then holds that callback's updated state.

    Args:
        dirpath: the checkpoint folder; checked for writability when fitting starts (a :class:`ConfigError` naming
            it, never a run that ends with exit code 0 and no checkpoint).
        every_n_train_steps: also write every this many optimizer steps (None or 0: only at epoch ends).
        slurm_requeue: inside a SLURM job, requeue it (``scontrol requeue``) after the checkpoint the requeue signal
            asked for (SLURM's ``--signal=<sig>@<seconds>`` warning before the time limit or a preemption).
        requeue_signal: ``"USR1"``, ``"USR2"``, ... (None: :func:`requeue_signal`).
        save_on_exception: write when training stops on an exception. Only a state at a batch boundary is
            written: an exception after the optimizer step of a batch (the state is half-way through that batch)
            or during validation keeps the previous ``last.ckpt``, as do non-finite weights.
        filename: default ``last.ckpt``.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None, save_on_exception: bool = True,
                 slurm_requeue: bool = True, filename: str = LAST_NAME, requeue_signal: str | None = None) -> None:
        if every_n_train_steps is not None and (isinstance(every_n_train_steps, bool)
                                                or not isinstance(every_n_train_steps, int) or every_n_train_steps < 0):
            raise ConfigError(f"checkpoint_every_n_steps={every_n_train_steps!r} must be null or an integer >= 0 "
                              "(0 / null: last.ckpt only at epoch ends).")
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.every_n_train_steps = every_n_train_steps or 0
        self.save_on_exception = save_on_exception
        self.slurm_requeue = slurm_requeue
        self.requeue_signal = _signal_of(requeue_signal) if requeue_signal else None
        self._last_saved_step = -1
        self._step_at_batch_start = -1
        self._at_batch_boundary = False  # the save in progress is at a batch boundary (progress to normalise)
        self._signal_requested = False
        self._previous_handler: Any = None
        self._signum: Any = None
        self._logging_step_on_resume: int | None = None  # see on_load_checkpoint
        self._train_started = False  # on_train_start ran: a resume's checkpoint was restored

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    @property
    def last_checkpoint_path(self) -> Path:
        """What the run machinery reads as the run's ``last.ckpt`` (status.json, the wandb ``last`` artifact)."""
        return self.path

    @property
    def state_key(self) -> str:
        # fixed, so the RNG state is restored even when every_n_train_steps changes on resume
        return "LastCheckpoint"

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.fast_dev_run:
            return
        if trainer.is_global_zero:
            from meddiff.runs.run_dir import check_writable

            check_writable(self.dirpath, "checkpoint folder")
        # Installed before Lightning registers its signal handlers (it then leaves this signal to us): Lightning's
        # SLURM handler would write hpc_ckpt_<n>.ckpt from inside the signal handler, i.e. wherever training happens
        # to be (e.g. between the optimizer step and the EMA update), and submitit's would requeue and exit there;
        # ours waits for the next batch boundary.
        signum = self.requeue_signal or requeue_signal()
        if signum is not None:
            try:
                self._previous_handler = signal.signal(signum, self._on_signal)
                self._signum = signum
            except ValueError:  # not the main thread
                self._previous_handler = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a resumed run starts at the step its checkpoint holds: nothing new to write at that step
        self._last_saved_step = trainer.global_step if trainer.global_step > 0 else -1
        self._train_started = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_handler is not None and self._signum is not None:
            try:
                signal.signal(self._signum, self._previous_handler)
            except ValueError:
                pass
            self._previous_handler = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        # the earlier handler is not called: submitit's would requeue and exit here, mid-step (one mechanism: ours)
        self._signal_requested = True

    def _signal_pending(self, trainer: Trainer) -> bool:
        """Whether any process received the requeue signal (all processes must agree: the save is collective)."""
        pending = self._signal_requested
        if trainer.world_size > 1:
            pending = bool(trainer.strategy.reduce_boolean_decision(pending, all=False))
        self._signal_requested = False
        return pending

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Written here, at the start of the next batch, rather than in on_train_batch_end: callbacks run before the
        # LightningModule's on_train_batch_end (the EMA update), so only now is the previous step complete.
        if self._logging_step_on_resume is not None:
            # Lightning's restart from a "saved on last" state may pass once through the epoch loop without a batch
            # (it checks whether validation is pending) and count a logger step for it: the first batch after an
            # end-of-epoch resume logs at the step an uninterrupted run would.
            trainer.fit_loop.epoch_loop._batches_that_stepped = self._logging_step_on_resume
            self._logging_step_on_resume = None
        if trainer.fast_dev_run:
            return
        step = trainer.global_step
        self._step_at_batch_start = step
        n = self.every_n_train_steps
        due = n > 0 and step > 0 and step % n == 0 and step != self._last_saved_step
        signalled = self._signal_pending(trainer)
        if signalled:
            log.info("%s: writing %s at step %d.", getattr(self._signum, "name", "signal"), self.path, step)
        if due or signalled:
            self._save(trainer, at_batch_boundary=True)
        if signalled:
            self._requeue(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        signalled = self._signal_pending(trainer)
        self._save(trainer, at_batch_boundary=False)
        if signalled:
            self._requeue(trainer)

    def _requeue(self, trainer: Trainer) -> None:
        """Inside a SLURM job (``slurm_requeue``): ``scontrol requeue <job>`` after the signal's checkpoint, as
        Lightning's SLURM handler does; the requeued job continues this run (``meddiff.train``)."""
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if not self.slurm_requeue or not trainer.is_global_zero or not SLURMEnvironment.detect():
            return
        array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
        if not job:
            return
        try:
            code = subprocess.call(["scontrol", "requeue", job])
        except OSError as e:
            log.error("Could not requeue SLURM job %s: %s", job, e)
            return
        if code == 0:
            log.info("Requeued SLURM job %s; it continues from %s.", job, self.path)
        else:
            log.error("scontrol requeue %s failed (exit code %d).", job, code)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not self.save_on_exception or trainer.fast_dev_run:
            return
        try:
            self._save_on_exception(trainer, pl_module, exception)
        except Exception as e:  # never hide the original exception
            log.error("Could not write %s after %s: %s", self.path, type(exception).__name__, e)

    def _save_on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        what = type(exception).__name__
        keep = f"{self.path} from step {self._last_saved_step} is kept" if self._last_saved_step >= 0 \
            else f"no {self.filename} is written"
        if not self._train_started:
            # e.g. restoring ckpt_path failed: the model holds fresh weights, the files on disk are the run's work
            log.warning("%s before training started (while restoring or setting up): %s unchanged.", what,
                        self.path if self.path.is_file() else "nothing")
            return
        if not trainer.training or trainer.sanity_checking:
            log.warning("%s outside a training step (validation or setup): %s.", what, keep)
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        at_boundary = progress.ready == progress.completed
        if not at_boundary and trainer.global_step != self._step_at_batch_start:
            log.warning("%s after the optimizer step of a batch (the state is half-way through it): %s.", what, keep)
            return
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            log.warning("%s on one of %d processes: %s.", what, trainer.world_size, keep)
            return
        if trainer.global_step == self._last_saved_step:
            return  # nothing trained since the last save
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            log.warning("%s with non-finite weights: %s.", what, keep)
            return
        log.info("%s at step %d: writing %s.", what, trainer.global_step, self.path)
        self._save(trainer, at_batch_boundary=not at_boundary)

    def _save(self, trainer: Trainer, at_batch_boundary: bool) -> None:
        self._at_batch_boundary = at_batch_boundary
        try:
            trainer.save_checkpoint(self.path, weights_only=False)
        finally:
            self._at_batch_boundary = False
        self._last_saved_step = trainer.global_step

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._at_batch_boundary:
            normalise_batch_boundary(checkpoint)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # runs before Lightning restores its loops from the same dict (checkpoint_connector: callbacks, then loops)
        if mark_finished_epoch_completed(checkpoint):
            fit = checkpoint["loops"]["fit_loop"]
            self._logging_step_on_resume = int(fit.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", 0))

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            set_rng_state(state_dict["rng"])


def _signal_of(name: str | int) -> signal.Signals:
    """``"USR2"`` / ``"SIGUSR2"`` / ``12`` -> ``signal.SIGUSR2``; a ConfigError for an unknown name."""
    if isinstance(name, int):
        return signal.Signals(name)
    text = str(name).upper()
    found = getattr(signal, text if text.startswith("SIG") else f"SIG{text}", None)
    if not isinstance(found, signal.Signals):
        raise ConfigError(f"requeue signal {name!r} is not a signal of this system; use e.g. USR1 or USR2 "
                          "(SUBMITIT_PREEMPT_SIGNAL).")
    return found


def requeue_signal() -> signal.Signals | None:
    """The signal that asks for checkpoint-and-requeue: ``$SUBMITIT_PREEMPT_SIGNAL`` if set (submitit reads the same
    variable when it submits: ``--signal=<it>@<delay>``), else USR2 in a job submitit started (``SUBMITIT_EXECUTOR``
    set; submitit's default), else USR1. None where the system has no such signal (Windows)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL") or ("USR2" if os.environ.get("SUBMITIT_EXECUTOR") else "USR1")
    if not hasattr(signal, f"SIG{name.upper().removeprefix('SIG')}"):
        return None
    return _signal_of(name)
