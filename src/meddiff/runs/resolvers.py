"""The OmegaConf resolvers meddiff's configs use, registered explicitly by :func:`register_resolvers`.

Both entry points (``meddiff.train.main``, ``meddiff.eval.main``) call it before Hydra composes a config; so does
anything that composes the project's configs itself (tests, notebooks). Registering is idempotent.

- ``${meddiff.run_dir:<base>[,unique]}``: a fresh run dir under ``<base>`` (:func:`meddiff.runs.run_dir.resolve_run_dir`);
- ``${meddiff.add:a,b}`` = a + b (integers): a resumed Optuna sweep numbers its new job dirs after the trials already
  in the study (``hydra.sweep.subdir='${meddiff.add:${hydra.job.num},<trials so far>}'``), so job dir == trial
  number and no earlier job dir is overwritten;
- ``${meddiff.help:train}``: the ``--help`` page (:mod:`meddiff.runs.cli_help`);
- ``${meddiff.eval_dir:<ckpt_path>,<eval_name>,<preset>,<fallback base>}``: where ``meddiff-eval`` writes
  (:func:`eval_dir`): ``<run_dir>/evals/<name>/`` beside the training run the checkpoint belongs to, so
  ``meddiff-compare <run_dir>`` finds it;
- ``${meddiff.num_workers:[cap[,on_cpu]]}``: DataLoader workers from the machine (:func:`num_workers`): ``min(cap,
  usable cores)`` where a CUDA GPU runs the model, ``on_cpu`` (default 0) on CPU-only machines;
- ``${meddiff.per_device:<cpu value>,<gpu value>}``: one of two values by the device the run will use
  (:func:`per_device`), e.g. the pDDPM scoring chunk ``model.sampling.max_batch: ${meddiff.per_device:16,128}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from meddiff.errors import ConfigError
from meddiff.runs.cli_help import HELP_RESOLVER, help_text
from meddiff.runs.run_dir import RESOLVER as RUN_DIR
from meddiff.runs.run_dir import resolve_run_dir, unique_name

ADD = "meddiff.add"
EVAL_DIR = "meddiff.eval_dir"
NUM_WORKERS = "meddiff.num_workers"
PER_DEVICE = "meddiff.per_device"
EVALS = "evals"  # <run_dir>/evals/<name>/: the evaluations of a training run's checkpoints


def training_run_of(ckpt_path: str | Path) -> Path | None:
    """The training run dir a checkpoint sits in (``<run_dir>/checkpoints/.../<file>.ckpt`` with ``<run_dir>``
    holding ``.hydra/`` or ``status.json``), None for a checkpoint elsewhere."""
    path = Path(str(ckpt_path)).expanduser().resolve()
    for parent in path.parents:
        if parent.name == "checkpoints":
            run = parent.parent
            return run if (run / ".hydra").is_dir() or (run / "status.json").is_file() else None
    return None


def eval_dir(ckpt_path: str, name: str | None, preset: str | None, fallback: str) -> str:
    """``<run_dir>/evals/<name>`` for a checkpoint of a training run (``name`` default: ``<preset>_<timestamp>``,
    preset ``stored`` when the checkpoint's own eval options are used), else a fresh ``<fallback>/<timestamp>``.
    A given name that already holds an evaluation is a ConfigError (evaluations never overwrite one another)."""
    run = training_run_of(ckpt_path) if ckpt_path not in (None, "???") else None
    if run is None:
        return resolve_run_dir(fallback, "unique")
    if name in (None, "", "None", "null"):
        name = f"{preset if preset not in (None, '', 'None', 'null') else 'stored'}_{unique_name()}"
    out = run / EVALS / str(name)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"eval_name={name}: {out} already holds an evaluation. Choose another eval_name= (or leave "
                          "it out for <preset>_<timestamp>), or delete that folder.")
    return str(out)


def _add(a: str, b: str) -> int:
    return int(a) + int(b)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a SLURM allocation, taskset), not the whole node's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def num_workers(cap: Any = 8, on_cpu: Any = 0) -> int:
    """DataLoader workers: ``min(cap, usable cores)`` when a CUDA GPU computes (loading must keep it fed: an H100
    consumes more patches/s than one core decodes), ``min(on_cpu, usable cores - 1)`` (default 0) on a CPU-only
    machine, where the model needs the cores and in-process loading of in-memory datasets is fastest."""
    cap = 8 if cap in (None, "") else int(cap)
    if _cuda():
        return max(1, min(cap, usable_cores()))
    return max(0, min(int(on_cpu or 0), usable_cores() - 1))


def per_device(cpu_value: Any, gpu_value: Any) -> Any:
    """``gpu_value`` when a CUDA GPU is available, else ``cpu_value`` (resolved once, when the config is)."""
    return gpu_value if _cuda() else cpu_value


def register_resolvers() -> None:
    """Register every ``meddiff.*`` resolver of the module docstring (idempotent)."""
    if not OmegaConf.has_resolver(RUN_DIR):
        # cached: Hydra may resolve run.dir more than once, and it must name one folder
        OmegaConf.register_new_resolver(RUN_DIR, resolve_run_dir, use_cache=True)
    if not OmegaConf.has_resolver(ADD):
        OmegaConf.register_new_resolver(ADD, _add)
    if not OmegaConf.has_resolver(EVAL_DIR):
        OmegaConf.register_new_resolver(EVAL_DIR, eval_dir, use_cache=True)  # one folder however often resolved
    if not OmegaConf.has_resolver(NUM_WORKERS):
        OmegaConf.register_new_resolver(NUM_WORKERS, num_workers)
    if not OmegaConf.has_resolver(PER_DEVICE):
        OmegaConf.register_new_resolver(PER_DEVICE, per_device)
    if not OmegaConf.has_resolver(HELP_RESOLVER):
        OmegaConf.register_new_resolver(HELP_RESOLVER, help_text)
