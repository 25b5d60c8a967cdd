"""Tell the run machinery that training really started: :class:`RunStarted`."""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch import Callback, LightningModule, Trainer


class RunStarted(Callback):
    """Calls ``fn()`` once, at ``on_train_start``: after Lightning restored ``ckpt_path`` (weights, optimizer, loops),
    before the first batch. ``meddiff.runs.job`` writes ``status.json`` from there, so a resume whose restore fails
    leaves the earlier run's record as it was."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self._called = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._called:
            self._called = True
            self.fn()
