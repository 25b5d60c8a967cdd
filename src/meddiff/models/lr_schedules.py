"""Learning-rate schedules a config may name (``model.lr_scheduler``, built with ``_partial_: true``; the model passes
the optimizer): :class:`WarmupCosineLR`.

A class, not a function returning a ``LambdaLR``: a stored config may only build classes
(:mod:`meddiff.utils.safety`), and a ``LambdaLR`` over a closure saves no trace of its schedule. Configs stored before
it became a class name the former function ``meddiff.models.base.warmup_cosine``; :mod:`meddiff.compat` maps it here.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

log = logging.getLogger(__name__)

#: the schedule's settings, kept in its ``state_dict`` beside the position (for the record; the config's win)
SETTINGS = ("warmup_steps", "total_steps", "min_factor")


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warm-up ``(step + 1) / warmup_steps`` to 1, then
    cosine decay to ``min_factor`` at ``total_steps`` (held there after). In ``(0, 1]``."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up to the base LR over ``warmup_steps``, then cosine decay to ``min_factor`` of it at
    ``total_steps`` (:func:`warmup_cosine_factor`); stepped once per optimizer step (``interval: step``).

    Its ``state_dict`` holds plain numbers only (weights-only checkpoints): the position (``last_epoch``,
    ``base_lrs``, ...) and, for the record, the settings. On load the position is restored and the settings stay
    those this scheduler was built with, i.e. the config that runs: ``resume=<run> model.lr_scheduler.total_steps=N``
    takes effect (a change is logged), as optimizer overrides do (:mod:`meddiff.callbacks.optimizer_overrides`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 500, total_steps: int = 100_000,
                 min_factor: float = 0.05, last_epoch: int = -1) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_factor = float(min_factor)
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        """The LR multiplier at ``step`` under this scheduler's settings."""
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.min_factor)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)  # the factor is this class's method: nothing to store
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        stored = {k: state.pop(k) for k in SETTINGS if k in state}
        changed = [f"{k} {v!r} -> {getattr(self, k)!r}" for k, v in stored.items() if v != getattr(self, k)]
        super().load_state_dict(state)
        if changed:
            log.warning("LR schedule resumed with the configured settings (the checkpoint's are replaced): %s.",
                        ", ".join(changed))
            # the restored step's lr under the configured settings, from this step on (Lightning restores the
            # optimizer before its schedulers: the lr set here is the one the next optimizer step uses)
            self._last_lr = [base * self.factor(self.last_epoch) for base in self.base_lrs]
            for group, lr in zip(self.optimizer.param_groups, self._last_lr):
                group["lr"] = lr
