"""The refiner-family protocol (``eval_protocol = "refiner"``): inductive, transductive and AUCp, honestly labelled.

On the shared skeleton (:class:`meddiff.protocols.base.Protocol`: ``check``, then inside ``evaluating()``
``select`` and ``test``, then ``write``, then ``report.json`` / ``metrics.csv``):

1. options (:mod:`.options`); ``check``: the model and datamodule offer :mod:`.interfaces`;
2. :func:`.select.select` through ``ValidationView``: baselines from the known-healthy *training* pool, the best
   baseline on labelled validation (``baseline_chosen_on``), Dice thresholds on labelled-validation masks, the
   checkpoint rule derived from the run's checkpoints;
3. :func:`.test.evaluate_test`: one pass per pool, the test split read once; CIs resample subjects where known;
   every saved checkpoint scored in the same passes for the AUCp-selector measurement (:mod:`.selector`);
4. the skeleton writes ``report.json`` / ``metrics.csv``; :meth:`RefinerProtocol.write` adds
   ``refiner_report.md``, ``roc.png`` and ``aucp_selector.png`` (:mod:`.report`).

Models are read through :mod:`.interfaces` (``estimates(batch)``; ``reconstruct`` for any other anomaly model),
data through the pools interface (``ImageFolderAnomalyDataModule``). ``run`` is the registry's entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meddiff.protocols.base import Outcome, Protocol, ValidationView
from meddiff.protocols.refiner.interfaces import check_data, check_model
from meddiff.protocols.refiner.options import RefinerEvalOptions
from meddiff.protocols.refiner.report import write_outputs
from meddiff.protocols.refiner.select import RefinerSelection, select
from meddiff.protocols.refiner.test import evaluate_test

__all__ = ["RefinerEvalOptions", "RefinerProtocol", "run"]


class RefinerProtocol(Protocol):
    """Coarse GAN / residual refiner (or any anomaly model) on Brainomaly / BMAD pools (see the package)."""

    name = "refiner"
    options = RefinerEvalOptions

    def __init__(self, checkpoint_dir: Path | None = None) -> None:
        self._default_ckpt_dir = checkpoint_dir  # <out_dir>/checkpoints unless eval.checkpoint_dir says otherwise

    def check(self, model: Any, datamodule: Any, opts: RefinerEvalOptions) -> None:
        check_data(datamodule)
        check_model(model)

    def select(self, model: Any, data: ValidationView, opts: RefinerEvalOptions,
               device: torch.device) -> RefinerSelection:
        ckpt_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else self._default_ckpt_dir
        return select(model, data, opts, device, ckpt_dir)

    def test(self, model: Any, datamodule: Any, opts: RefinerEvalOptions, selection: RefinerSelection,
             device: torch.device) -> Outcome:
        outcome = evaluate_test(model, datamodule, opts, selection, device)
        if not opts.figures:  # no plot data: write() draws no roc.png / aucp_selector.png
            outcome.figures.pop("curves", None)
            outcome.figures.pop("aucp_selector", None)
        return outcome

    def write(self, outcome: Outcome, out_dir: Path) -> None:
        write_outputs(outcome.report, outcome.figures, out_dir)

    def run(self, model: Any, datamodule: Any, eval_cfg: Any, out_dir: str | Path,
            device: str | torch.device | None = None) -> dict[str, Any]:
        """The skeleton's run; only remembers ``<out_dir>/checkpoints`` as where the run's checkpoints are (the
        selection rule of the evaluated weights is read from them) unless ``eval.checkpoint_dir`` is set."""
        if self._default_ckpt_dir is None:
            self._default_ckpt_dir = Path(out_dir) / "checkpoints"
        return super().run(model, datamodule, eval_cfg, out_dir, device)


def run(model: Any, datamodule: Any, eval_cfg: Any, out_dir: str | Path,
        device: str | torch.device | None = None) -> dict[str, Any]:
    """The registry's entry: evaluate a coarse or refiner model and write its report into ``out_dir``."""
    return RefinerProtocol().run(model, datamodule, eval_cfg, out_dir, device)
