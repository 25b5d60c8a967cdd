"""Checkpoints you can trust: loaded weights-only, written atomically and verified, ``last.ckpt`` kept current.

Loading (:func:`load_checkpoint`): ``torch.load(weights_only=True)`` only, so a file from elsewhere cannot run code
(a pickled ``__reduce__`` payload is refused, not executed). Checkpoints written by meddiff 0.1 hold OmegaConf
containers; the exact OmegaConf/typing classes they need (:data:`LEGACY_SAFE_GLOBALS`, rebuilt by setting
attributes only) are allowed for that one load. An empty, truncated, foreign or unsafe file is a
:class:`~meddiff.errors.DataError` naming it. The config stored in a checkpoint (:func:`stored_config`) passes the
target allow-list of :mod:`meddiff.utils.safety` before anything is built from it.

Saving (:class:`AtomicCheckpointIO`, the Trainer's checkpoint IO in ``meddiff.train``): every checkpoint Lightning
writes (``last.ckpt``, the best one, SLURM's ``hpc_ckpt_*.ckpt``) is first turned into plain containers, written to
a temporary file, re-opened and checked (keys, every state-dict tensor), and only then renamed over the target with
:func:`meddiff.utils.io.atomic_write`: a crash mid-save leaves the previous checkpoint intact. Trainer resume
(``trainer.fit(ckpt_path=...)``) reads through the same IO, hence through :func:`load_checkpoint`.

:class:`LastCheckpoint` writes ``last.ckpt`` after every training epoch, every ``every_n_train_steps`` optimizer
steps, on SIGUSR1 (at the next batch boundary; inside a SLURM job it then requeues the job, in place of Lightning's
handler, which would save from inside the signal handler in the middle of a step), and when training stops on an
exception (SIGTERM, Ctrl-C, a crash in a training step). It also stores the RNG states (torch, CUDA, numpy, python),
restored on resume, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import random
import signal
import subprocess
import typing
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from meddiff.errors import ConfigError, DataError
from meddiff.utils.io import atomic_write
from meddiff.compat import translate_stored_config
from meddiff.utils.safety import check_config_targets

log = logging.getLogger(__name__)

#: key of the experiment config (data, schedule, net, model, eval) stored in every checkpoint meddiff-train writes
CKPT_CONFIG_KEY = "meddiff_config"
LAST_NAME = "last.ckpt"


def _legacy_safe_globals() -> list[Any]:
    """The globals a meddiff 0.1 checkpoint (OmegaConf containers in its hyper-parameters) needs, and no more.

    Each is rebuilt from plain data (``__setstate__`` / dataclass fields), none calls anything from the file.
    """
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, collections.defaultdict, dict, list, int,
            typing.Any]


LEGACY_SAFE_GLOBALS = _legacy_safe_globals()


# ----------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint weights-only. Missing file: :class:`ConfigError`; empty, truncated, foreign or
    unsafe file: :class:`DataError` naming it. ``mmap=True`` maps tensor data instead of reading it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"Checkpoint {path} does not exist; pass a .ckpt written by meddiff-train "
                          "(<run_dir>/checkpoints/last.ckpt or the best one beside it).")
    if path.stat().st_size == 0:
        raise DataError(f"Checkpoint {path} is empty (0 bytes): its write never completed. Use another checkpoint "
                        "(e.g. the best one beside it) or retrain.")
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if text.startswith("Weights only load failed"):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "WeightsUnpickler" in ln),
                          lines[-1] if lines else "")
            raise DataError(
                f"Checkpoint {path} holds objects other than tensors and plain containers ({detail}); "
                "meddiff refuses to load it because unpickling them could run code. Checkpoints written by "
                "meddiff-train never need that: if this file is not yours, do not use it."
            ) from e
        raise DataError(f"Checkpoint {path} is corrupt (not a readable torch file: {text.splitlines()[0]}).") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"Checkpoint {path} is truncated or not a torch checkpoint ({type(e).__name__}: {first}). "
                        "Use another checkpoint (e.g. the best one beside it) or retrain.") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise DataError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry; it holds "
                        f"{type(ckpt).__name__}{' with keys ' + str(sorted(ckpt)[:8]) if isinstance(ckpt, dict) else ''}).")
    return ckpt


def stored_config(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The experiment config stored in a checkpoint, as plain containers, after the target allow-list check."""
    if CKPT_CONFIG_KEY not in ckpt:
        raise DataError(f"{path} holds no meddiff config (key {CKPT_CONFIG_KEY!r}); it was not written by "
                        "meddiff-train. Rebuild the model from your experiment config and load its state_dict.")
    cfg = plain_containers(ckpt[CKPT_CONFIG_KEY])
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: the stored config {CKPT_CONFIG_KEY!r} is a {type(cfg).__name__}, not a mapping.")
    translate_stored_config(cfg)  # older versions' moved targets / renamed keys -> today's, before the trust check
    check_config_targets(cfg, f"{Path(path).name}:{CKPT_CONFIG_KEY}")
    return cfg


def plain_containers(obj: Any) -> Any:
    """``obj`` with every OmegaConf container (anywhere inside dicts/lists/tuples) turned into plain dicts/lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: plain_containers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain_containers(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(plain_containers(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------------------ saving
def verify_checkpoint(path: str | Path, expected_state_keys: set[str], name: str | Path | None = None) -> None:
    """Re-open a written checkpoint (weights-only, tensor data mapped) and check that every state-dict tensor is
    there; a :class:`DataError` naming ``name`` (default: ``path``) otherwise."""
    name = name or path
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except (DataError, ConfigError) as e:
        raise DataError(f"Saving checkpoint {name} failed verification: {e}") from e
    missing = expected_state_keys - set(ckpt["state_dict"])
    if missing:
        raise DataError(f"Saving checkpoint {name} failed verification: {len(missing)} state-dict entries missing "
                        f"(e.g. {sorted(missing)[:3]}).")


def save_checkpoint_file(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temp file, fsync, verify, rename); plain containers only."""
    checkpoint = plain_containers(checkpoint)
    expected = set(checkpoint.get("state_dict", {}))

    def _write(tmp: Path) -> None:
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        verify_checkpoint(tmp, expected, name=path)

    return atomic_write(path, _write)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, atomic and verified on save, weights-only and checked on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options.")
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always True here, whatever the caller asks: the file may come from anywhere
        ckpt = load_checkpoint(path, map_location=map_location or "cpu")
        if CKPT_CONFIG_KEY in ckpt:
            stored_config(ckpt, path)  # the allow-list check, also on trainer resume
        return ckpt


# ----------------------------------------------------------------------------------------------- resume helpers
def logging_step_after_resume(ckpt: dict[str, Any]) -> int:
    """The logger step at which a run resumed from ``ckpt`` logs next; CSV rows at or after it are redone.

    Lightning restores ``_batches_that_stepped`` and adds one when the checkpoint was written in
    ``on_train_batch_end`` (batch processed but not yet counted as completed).
    """
    fit = ckpt.get("loops", {}).get("fit_loop", {})
    step = int(fit.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", ckpt.get("global_step", 0)))
    total = fit.get("epoch_loop.batch_progress", {}).get("total", {})
    if total and total.get("started") == total.get("ready") and total.get("processed") == total.get("started") \
            and total.get("completed") == total.get("processed", 0) - 1:
        step += 1
    return step


def newest_checkpoint(candidates: list[Path]) -> Path | None:
    """Of the readable checkpoints among ``candidates``, the one with the highest global step (unreadable ones are
    skipped with a warning)."""
    best: tuple[int, float, Path] | None = None
    for p in candidates:
        if not p.is_file():
            continue
        try:
            step = int(load_checkpoint(p, mmap=True).get("global_step", 0))
        except (DataError, ConfigError) as e:
            log.warning("Skipping unreadable checkpoint: %s", e)
            continue
        key = (step, p.stat().st_mtime, p)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


# ------------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and plain containers (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- LastCheckpoint
#: marker of the resumable training loader's state (``meddiff.data.resumable``): its position is set to the batches
#: completed when a checkpoint is written at a batch boundary
LOADER_STATE_MARKER = "meddiff_resumable_loader"


class LastCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt`` current (see the module docstring for when it is written).

    A Lightning ``Checkpoint`` so that Lightning runs it after the other callbacks, in particular after the
    ``ModelCheckpoint`` that keeps the best checkpoint: ``last.ckpt`` then holds that callback's updated state.

    Args:
        dirpath: the checkpoint folder; checked for writability when fitting starts (a :class:`ConfigError` naming
            it, never a run that ends with exit code 0 and no checkpoint).
        every_n_train_steps: also write every this many optimizer steps (None or 0: only at epoch ends).
        slurm_requeue: inside a SLURM job, requeue it (``scontrol requeue``) after the checkpoint that SIGUSR1 asked
            for (SLURM's ``--signal=USR1@<seconds>`` warning before the time limit).
        save_on_exception: write when training stops on an exception. Only a state at a batch boundary is
            written: an exception after the optimizer step of a batch (the state is half-way through that batch)
            or during validation keeps the previous ``last.ckpt``, as do non-finite weights.
        filename: default ``last.ckpt``.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None, save_on_exception: bool = True,
                 slurm_requeue: bool = True, filename: str = LAST_NAME) -> None:
        if every_n_train_steps is not None and (isinstance(every_n_train_steps, bool)
                                                or not isinstance(every_n_train_steps, int) or every_n_train_steps < 0):
            raise ConfigError(f"checkpoint_every_n_steps={every_n_train_steps!r} must be null or an integer >= 0 "
                              "(0 / null: last.ckpt only at epoch ends).")
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.every_n_train_steps = every_n_train_steps or 0
        self.save_on_exception = save_on_exception
        self.slurm_requeue = slurm_requeue
        self._last_saved_step = -1
        self._step_at_batch_start = -1
        self._at_batch_boundary = False  # the save in progress is at a batch boundary (progress to normalise)
        self._signal_requested = False
        self._previous_usr1: Any = None
        self._logging_step_on_resume: int | None = None  # see on_load_checkpoint

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    @property
    def state_key(self) -> str:
        # fixed, so the RNG state is restored even when every_n_train_steps changes on resume
        return "LastCheckpoint"

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.fast_dev_run:
            return
        if trainer.is_global_zero:
            from meddiff.utils.run_dir import check_writable

            check_writable(self.dirpath, "checkpoint folder")
        # Installed before Lightning registers its signal handlers (it then leaves SIGUSR1 to us): Lightning's SLURM
        # handler would write hpc_ckpt_<n>.ckpt from inside the signal handler, i.e. wherever training happens to
        # be (e.g. between the optimizer step and the EMA update); ours waits for the next batch boundary.
        if hasattr(signal, "SIGUSR1"):
            try:
                self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)
            except ValueError:  # not the main thread
                self._previous_usr1 = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a resumed run starts at the step its checkpoint holds: nothing new to write at that step
        self._last_saved_step = trainer.global_step if trainer.global_step > 0 else -1

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_usr1 is not None:
            try:
                signal.signal(signal.SIGUSR1, self._previous_usr1)
            except ValueError:
                pass
            self._previous_usr1 = None

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self._signal_requested = True
        if callable(self._previous_usr1):
            self._previous_usr1(signum, frame)

    def _signal_pending(self, trainer: Trainer) -> bool:
        """Whether any process received SIGUSR1 (all processes must agree: the save is collective)."""
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
            log.info("SIGUSR1: writing %s at step %d.", self.path, step)
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


def normalise_batch_boundary(checkpoint: dict[str, Any]) -> None:
    """Mark a checkpoint written between two batches as "all fetched batches completed".

    Written at the start of batch k+1 (or when batch k+1 failed before its optimizer step), Lightning's progress says
    batch k+1 is ready but not completed; restored as is, Lightning would shift its logging step by one. The weights,
    optimizer and EMA are exactly those after batch k, so the progress is set to that: ready = started = processed =
    completed, and a resumable loader's position to the completed batches.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = fit.get("epoch_loop.batch_progress")
    if not progress:
        return
    for part in ("total", "current"):
        counts = progress.get(part)
        if counts:
            for key in ("ready", "started", "processed"):
                counts[key] = counts["completed"]
    progress["is_last_batch"] = False
    done = progress.get("current", {}).get("completed")
    for state in fit.get("state_dict", {}).get("combined_loader", []) or []:
        if isinstance(state, dict) and state.get(LOADER_STATE_MARKER) and done is not None:
            state["batches_done"] = int(done)


def mark_finished_epoch_completed(checkpoint: dict[str, Any]) -> bool:
    """Make a checkpoint written at the end of an epoch resume at the start of the next one, exactly once.

    Written in ``on_train_epoch_end`` / after validation, the progress says the epoch was processed but not yet
    completed (Lightning increments ``completed`` after the epoch-end hooks) and the epoch's batch counters are full.
    Without ``max_steps`` Lightning 2.6 handles that itself; with ``max_steps`` set (iteration-based training, e.g.
    the demo's fixed budget) it treats the resume as a restart inside the finished epoch: the epoch loop sees its
    batch budget used up, runs no batch, the epoch is counted processed a second time, and a resume that raised
    ``max_epochs`` by one stops at once ("max_epochs reached") having trained nothing. Here the state is put where
    Lightning's own epoch boundary puts it: the epoch completed, the per-epoch batch/step counters (``current``) at
    zero, the per-epoch validation count reset; totals (global step, logging step) are untouched. Checkpoints written
    mid-epoch or at a batch end are left alone. Returns whether the checkpoint was changed.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = fit.get("epoch_progress")
    batches = fit.get("epoch_loop.batch_progress") or {}
    if not epochs or not batches.get("is_last_batch"):
        return False
    if not all(c["ready"] == c["started"] == c["processed"] == c["completed"] + 1 for c in epochs.values()):
        return False
    for c in epochs.values():
        c["completed"] = c["processed"]
    batches["is_last_batch"] = False
    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress"):
        progress = fit.get(key) or {}
        for name in progress.get("current", {}):
            progress["current"][name] = 0
    optim = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
    for progress in optim.values():
        for name in progress.get("current", {}):
            progress["current"][name] = 0
    val = fit.get("epoch_loop.val_loop.batch_progress") or {}
    for name in val.get("total", {}):
        val["total"][name] = 0
    return True
