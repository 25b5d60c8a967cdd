"""Run directories you can trust: unique names, one live run per directory, clear errors when one cannot be written.

- :func:`run_name`: a name no other run takes: ``YYYY-mm-dd_HH-MM-SS-ffffff_xxxx`` (microseconds plus 4 random hex
  digits). Under SLURM it is ``slurm-<job id>[_<array task>]`` instead: every task of a multi-node job computes the
  same name, and a requeued job (preemption, ``scontrol requeue``) lands in the run dir of its first attempt, where
  ``meddiff.train`` continues from the checkpoint it finds (:func:`is_slurm_requeue`).
- ``${meddiff.run_dir:<base>}`` (the Hydra ``run.dir`` / ``sweep.dir`` of ``configs/hydra/default.yaml``):
  ``<base>/<run_name>``, after checking that ``<base>`` can be created and written (a :class:`ConfigError` naming
  the folder, not a raw ``PermissionError`` from Hydra). ``${meddiff.run_dir:<base>,unique}`` (``configs/eval.yaml``)
  never uses the SLURM job name: evaluations do not resume, and two of them in one job must not share a folder.
- :class:`RunLock`: ``<run_dir>/.lock`` (pid and host) while a run is live; a second run into the same folder fails
  fast naming the holder's pid; the lock of a dead process on this host is taken over with a warning.
- :func:`check_writable`: a folder can be created and written, else a :class:`ConfigError` naming it.
- :func:`is_rank_zero`: whether this process may write run files (False in the extra processes of a DDP run).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import tempfile
from datetime import datetime
from pathlib import Path

from meddiff.errors import ConfigError
from meddiff.utils.io import pid_alive

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RESOLVER = "meddiff.run_dir"  # registered by meddiff.runs.resolvers.register_resolvers

# one name per process: Hydra may resolve run.dir more than once, and run.dir / sweep.dir of one launch match
_NAME: dict[str, str] = {}


def slurm_job_name() -> str | None:
    """``slurm-<job id>[_<array task id>]`` inside a SLURM batch job, else None."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"slurm-{array_job}_{array_task}"
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else None


def is_slurm_requeue() -> bool:
    """Whether this process is a requeued attempt of a SLURM job (``SLURM_RESTART_COUNT`` >= 1)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def run_name() -> str:
    """This process's run name (see the module docstring); the same on every call."""
    if "name" not in _NAME:
        _NAME["name"] = slurm_job_name() or unique_name()
    return _NAME["name"]


def check_writable(folder: str | Path, what: str = "run dir") -> Path:
    """Create ``folder`` (with parents) and write a probe file in it; a :class:`ConfigError` naming it otherwise."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"The {what} {folder} cannot be created or written ({type(e).__name__}: {e.strerror or e}). "
            "Fix its permissions or free space, or choose another folder (hydra.run.dir=... / paths.log_dir=...)."
        ) from e
    return folder


def check_creatable(folder: str | Path, what: str = "run dir") -> Path:
    """Check, without creating anything, that ``folder`` could be made: its nearest existing ancestor is a writable
    folder (or ``folder`` itself is). A :class:`ConfigError` naming the path otherwise."""
    folder = Path(folder).expanduser().absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"The {what} {folder} cannot be created: {probe} is a file, not a folder. "
                          "Choose another folder (hydra.run.dir=... / paths.log_dir=...).")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"The {what} {folder} cannot be created: {probe} is not writable. Fix its permissions or "
                          "choose another folder (hydra.run.dir=... / paths.log_dir=...).")
    return folder


def unique_name() -> str:
    """A fresh ``YYYY-mm-dd_HH-MM-SS-ffffff_xxxx`` name (the same on every call in this process)."""
    if "unique" not in _NAME:
        _NAME["unique"] = f"{datetime.now().strftime('%Y-%m-%d_%H-%M-%S-%f')}_{secrets.token_hex(2)}"
    return _NAME["unique"]


def resolve_run_dir(base: str, mode: str = "run") -> str:
    """``<base>/<name>``: ``mode="run"`` (training) names SLURM runs by their job, ``"unique"`` (evaluation, which
    never resumes: two evaluations in one SLURM job must not share a folder) never does."""
    if mode not in ("run", "unique"):
        raise ConfigError(f"${{{RESOLVER}:<base>,<mode>}}: mode={mode!r} must be 'run' or 'unique'.")
    check_creatable(base, "folder for run dirs")
    return str(Path(base) / (run_name() if mode == "run" else unique_name()))


class RunDirInUse(ConfigError):
    """Another live process holds the run dir's lock: this process must write nothing there (not even its log)."""


class RunLock:
    """``<run_dir>/.lock`` while a run is live: one writer per run dir.

    ``acquire()`` creates the lock file exclusively with this process's pid and host. If it exists: a live holder
    (or a holder on another host, whose liveness cannot be checked) is a :class:`ConfigError` naming the pid; the lock
    of a process that is no longer alive on this host (``kill -9``, a crash) is taken over with a warning.
    ``release()`` removes it if it is still this process's. Use as a context manager.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    @staticmethod
    def _describe() -> str:
        return f"{os.getpid()} {socket.gethostname()} {slurm_job_name() or '-'}\n"

    def holder(self) -> tuple[int, str, str] | None:
        """``(pid, host, slurm job or '-')`` written in the lock file, or None when there is no (readable) lock."""
        try:
            words = self.path.read_text().split()
            return int(words[0]), words[1], (words[2] if len(words) > 2 else "-")
        except (OSError, ValueError, IndexError):
            return None

    def _is_mine(self, holder: tuple[int, str, str]) -> bool:
        return holder[0] == os.getpid() and holder[1] == socket.gethostname()

    def check(self) -> None:
        """Fail fast if another live process holds the lock (without taking it)."""
        holder = self.holder()
        if holder is None or self._is_mine(holder):
            return
        pid, host, job = holder
        if is_slurm_requeue() and job != "-" and job == slurm_job_name():
            return  # an earlier attempt of this same SLURM job: SLURM never runs two attempts at once
        if host != socket.gethostname() or pid_alive(pid):
            raise RunDirInUse(
                f"{self.path.parent} is in use by another run (process {pid} on {host}, lock file {self.path}). "
                "Wait for it to finish or stop it; a run writes into a run dir alone. If that process is gone "
                f"(e.g. it ran on another machine), delete {self.path}."
            )

    def acquire(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self.check()  # a live holder: ConfigError
                holder = self.holder()
                if holder is not None and self._is_mine(holder):
                    self.held = True
                    return self
                log.warning("Taking over the stale lock %s of process %s, which is no longer running.", self.path,
                            holder[0] if holder else "?")
                self.path.unlink(missing_ok=True)
                continue  # another process may take it first: try the exclusive create again
            except OSError as e:
                raise ConfigError(f"Cannot create the lock file {self.path} ({type(e).__name__}: {e.strerror or e}): "
                                  "the run dir is not writable; choose another one.") from e
            with os.fdopen(fd, "w") as fh:
                fh.write(self._describe())
            self.held = True
            return self
        self.check()
        raise ConfigError(f"Could not take the lock {self.path}: other processes keep taking it.")

    def release(self) -> None:
        if not self.held:
            return
        holder = self.holder()
        if holder is not None and self._is_mine(holder):
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_rank_zero() -> bool:
    """False in the extra processes of a DDP run (they re-run the entry point and must not write run files)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
