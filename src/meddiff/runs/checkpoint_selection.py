"""Finding the checkpoints a run's selection rules picked (reading goes through ``meddiff.runs.checkpoint_io``).

- :func:`load_weights_only`: ``torch.load(weights_only=True)`` (tensors and plain containers only) with an error
  that names the file and the fix.
- :func:`selection_checkpoints`: which checkpoint of a run each selection rule picked. Every ``ModelCheckpoint``
  records in ``last.ckpt`` the metric it monitors and its best file, so the rules are read from what the run did:
  ``aucp`` (best ``val/aucp``: label-free), ``labelled_validation`` (best ``val/auroc``: needs labels) and ``last``.
- :func:`checkpoint_to_evaluate`: the checkpoint ``meddiff-train`` evaluates after fitting, and the rule that chose
  it: the best checkpoint of the ``ModelCheckpoint`` that monitors ``optimized_metric``; never another
  ``ModelCheckpoint`` kept beside it (e.g. a label-selected one kept for comparison); ``last.ckpt`` when no
  callback monitors ``optimized_metric`` or none has a file yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meddiff.errors import ConfigError

#: selection rule -> the validation metric whose best checkpoint it is (``last`` needs none)
RULE_METRICS = {"aucp": "val/aucp", "aucp_debiased": "val/aucp_debiased", "labelled_validation": "val/auroc"}
#: rules that use labels of images (the others use pool membership only)
RULES_NEEDING_LABELS = ("labelled_validation",)


def load_weights_only(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A meddiff checkpoint read weights-only (:func:`meddiff.runs.checkpoint_io.load_checkpoint`: a missing, damaged
    or unsafe file is an error naming it); ConfigError when it holds no ``state_dict``."""
    from meddiff.runs.checkpoint_io import load_checkpoint

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist.")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{what} {str(path)!r} holds no 'state_dict'; pass a .ckpt written by meddiff-train.")
    return ckpt


def checkpoint_dir_of(path: str | Path) -> Path:
    """The ``checkpoints/`` folder of a run dir (``<run>/checkpoints``), or ``path`` itself when it is one."""
    path = Path(path).expanduser()
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def selection_checkpoints(ckpt_dir: str | Path) -> dict[str, Path]:
    """``{rule: checkpoint path}`` for the rules a run's callbacks implemented (files that exist only).

    Reads the ``ModelCheckpoint`` states stored in ``<ckpt_dir>/last.ckpt``; ``last`` is ``last.ckpt`` itself.
    A relative best path is resolved against ``ckpt_dir`` (runs may have moved).
    """
    ckpt_dir = checkpoint_dir_of(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    if not last.is_file():
        return {}
    out: dict[str, Path] = {"last": last}
    ckpt = load_weights_only(last, "last checkpoint")
    for key, state in (ckpt.get("callbacks") or {}).items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, dict):
            continue
        monitor, best = state.get("monitor"), state.get("best_model_path")
        if not monitor or not best:
            continue
        for rule, metric in RULE_METRICS.items():
            if monitor == metric:
                p = Path(best)
                if not p.is_file():
                    p = ckpt_dir / p.name  # the run dir moved since
                if p.is_file():
                    out[rule] = p
    return out


def checkpoint_to_evaluate(trainer: Any, optimized_metric: str | None) -> tuple[str | None, str]:
    """``(path or None, rule)``: the checkpoint selected by ``optimized_metric`` (see the module docstring)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = list(getattr(trainer, "callbacks", []))
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and optimized_metric and cb.monitor == optimized_metric \
                and cb.best_model_path and Path(cb.best_model_path).is_file():
            return cb.best_model_path, f"best {optimized_metric} ({cb.mode}) on validation (optimized_metric)"
    last = last_checkpoint_of(trainer)
    why = (f"no checkpoint monitors optimized_metric={optimized_metric}" if optimized_metric
           else "optimized_metric is null")
    return (None if last is None else str(last)), f"last ({why})"


def last_checkpoint_of(trainer: Any) -> Path | None:
    """The run's ``last.ckpt`` as its keeper reports it (a callback with a ``last_checkpoint_path``, i.e.
    :class:`meddiff.callbacks.LastCheckpoint`; read by attribute, so the run machinery does not import callbacks),
    when the file exists."""
    for cb in getattr(trainer, "callbacks", []):
        path = getattr(cb, "last_checkpoint_path", None)
        if path is not None and Path(path).is_file():
            return Path(path)
    return None
