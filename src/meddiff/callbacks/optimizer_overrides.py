"""The optimizer and LR-schedule settings of the config that runs, also after a resume: :class:`ConfiguredOptimizer`.

Lightning restores ``optimizer.param_groups`` (lr, weight decay, betas, ...) and the LR schedulers' ``base_lrs``
from the checkpoint, so ``resume=<run> model.optimizer.lr=1e-5`` would be recorded in the config and the checkpoint
and yet train at the old lr (and a run stopped by NaN would NaN again at the same step). This callback notes the
settings the config built (``on_fit_start``: after ``configure_optimizers``, before the restore) and, once training
starts from a checkpoint (``on_train_start``: after the restore), puts every configured setting that differs back:

- a changed base learning rate replaces ``initial_lr`` and the schedulers' ``base_lrs``, and the current ``lr`` is
  scaled by new/old base (exact for multiplicative schedules such as warm-up/cosine ``LambdaLR``), so the schedule
  continues at its restored position with the new base;
- any other hyper-parameter of a param group (``weight_decay``, ``betas``, ``eps``, ...) takes the configured value.

The optimizer's moment estimates and the schedule position stay those of the checkpoint. Each change is logged.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)

_SCHEDULE_KEYS = ("params", "lr", "initial_lr")


def _base_lr(group: dict[str, Any]) -> float:
    return float(group.get("initial_lr", group["lr"]))


class ConfiguredOptimizer(Callback):
    """Applies the configured optimizer / LR-schedule settings over those restored from a checkpoint."""

    def __init__(self) -> None:
        self._configured: list[list[dict[str, Any]]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._configured = [[{k: v for k, v in g.items() if k != "params"} | {"base_lr": _base_lr(g)}
                             for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is None or not self._configured:
            return
        changes = apply_configured(trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs],
                                   self._configured)
        for text in changes:
            log.warning("Resumed with the configured optimizer setting %s (the checkpoint's value is replaced).",
                        text)


def apply_configured(optimizers: list[Any], schedulers: list[Any], configured: list[list[dict[str, Any]]]) -> list[str]:
    """Put ``configured`` (per optimizer, per param group) into the restored ``optimizers`` / ``schedulers``;
    returns a description of each change."""
    changes: list[str] = []
    for i, (opt, groups) in enumerate(zip(optimizers, configured)):
        for j, (group, want) in enumerate(zip(opt.param_groups, groups)):
            old_base, new_base = _base_lr(group), float(want["base_lr"])
            scheduled = [s for s in schedulers if getattr(s, "optimizer", None) is opt]
            if old_base != new_base and "initial_lr" not in group and scheduled:
                # a scheduler without a base (e.g. ReduceLROnPlateau) lowered lr itself: not an override to apply
                log.warning("optimizer %d group %d: lr %g restored by a scheduler without a base lr; a configured "
                            "lr of %g cannot be told apart from its own reductions and is not applied.", i, j,
                            old_base, new_base)
            elif old_base != new_base:
                group["lr"] = group["lr"] * new_base / old_base if old_base else new_base
                if "initial_lr" in group:
                    group["initial_lr"] = new_base
                for sched in scheduled:
                    if hasattr(sched, "base_lrs"):
                        sched.base_lrs[j] = new_base
                        if hasattr(sched, "_last_lr"):
                            sched._last_lr[j] = group["lr"]
                changes.append(f"optimizer {i} group {j} lr: base {old_base:g} -> {new_base:g}")
            for key, value in want.items():
                if key in _SCHEDULE_KEYS or key == "base_lr" or key not in group:
                    continue
                if group[key] != value:
                    changes.append(f"optimizer {i} group {j} {key}: {group[key]!r} -> {value!r}")
                    group[key] = value
    return changes
