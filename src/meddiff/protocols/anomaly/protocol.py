"""The anomaly protocol on the skeleton: check -> select on validation -> test once -> report (``Protocol.run``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from meddiff.errors import ConfigError
from meddiff.protocols.base import Outcome, Protocol, ValidationView, chosen_on, evaluating, missing_members

from .interfaces import AnomalyData, AnomalyModel
from .options import EvalOptions
from .report import write_outputs
from .select import AnomalySelection, healthy_training_set, select_on_validation
from .test import evaluate_on_test

__all__ = ["AnomalyProtocol", "evaluate_anomaly_detection"]

log = logging.getLogger(__name__)


class AnomalyProtocol(Protocol):
    """The anomaly-detection protocol on a datamodule (:class:`~.interfaces.AnomalyData`: ``val_dataloader``,
    ``test_dataloader``; optional ``val_labelled_dataloader``, ``train_dataloader().dataset`` for the healthy-set
    baselines, ``subtype_names``); writes ``report.json``, ``metrics.csv``, ``roc.png``, ``anomaly_grid.png`` and
    the outputs of the add-ons the test batches switch on (CT: :mod:`meddiff.protocols.anomaly.ct_subtypes`)."""

    name = "anomaly"
    options = EvalOptions

    def check(self, model: Any, datamodule: Any, opts: EvalOptions) -> None:
        lacking = missing_members(model, AnomalyModel)
        if lacking:
            raise ConfigError(f"the anomaly protocol scores model.reconstruct(batch) with model.anomaly_val.scoring; "
                              f"{type(model).__name__} lacks {lacking}. Give the model class another eval_protocol.")
        lacking = missing_members(datamodule, AnomalyData)
        if lacking:
            raise ConfigError(f"the anomaly protocol reads val_dataloader() and test_dataloader(); "
                              f"{type(datamodule).__name__} lacks {lacking}.")

    def select(self, model: Any, data: ValidationView, opts: EvalOptions, device: torch.device) -> AnomalySelection:
        healthy, why_not = healthy_training_set(data, opts)
        if why_not is not None and opts.healthy_baselines():
            log.warning("Healthy-set baselines skipped: %s.", why_not)
        val_loader = None
        if opts.select_on_val:  # only then is the val split read (and recorded in splits_read)
            # the labelled val split alone (with data.aucp_holdout > 0 val_dataloader() also yields the known-healthy
            # pool, which has no labels to select on)
            labelled = getattr(data, "val_labelled_dataloader", None)
            val_loader = labelled() if callable(labelled) else data.val_dataloader()
        selection = select_on_validation(model, val_loader, opts, device, healthy=healthy)
        # what the settings were chosen on, from what selection asked the datamodule for
        compared = selection.record["chosen_on"] == "validation"
        selection.record["chosen_on"] = chosen_on(data.splits_read, compared, "config")
        selection.record["splits_read"] = data.splits_read
        if why_not is not None and opts.healthy_baselines():
            selection.record["baselines_skipped"] = why_not
        return selection

    def test(self, model: Any, datamodule: Any, opts: EvalOptions, selection: AnomalySelection,
             device: torch.device) -> Outcome:
        return evaluate_on_test(model, datamodule.test_dataloader(), opts, selection, device,
                                subtype_names=getattr(datamodule, "subtype_names", None))

    def write(self, outcome: Outcome, out_dir: Path) -> None:
        write_outputs(outcome.report, outcome.figures, out_dir)


def evaluate_anomaly_detection(
    model: Any,
    val_loader: Iterable | None,
    test_loader: Iterable,
    opts: EvalOptions,
    device: torch.device | str = "cpu",
    subtype_names: Sequence[str] | None = None,
    healthy: Any = None,
) -> dict[str, Any]:
    """The protocol's steps on loaders instead of a datamodule (notebooks, tests): :func:`select_on_validation`
    then :func:`evaluate_on_test` inside ``evaluating``; returns the report (JSON-ready) plus ``_figures`` (the
    plot data) and writes nothing. ``model`` needs ``anomaly_val.scoring`` and
    ``reconstruct(batch[, sampling])``.
    ``healthy``: the healthy training set (map-style, items ``{"image": [C, H, W], ...}``) for the nearest-healthy
    and mean-healthy baselines; None = the mean-intensity baseline only.
    """
    device = torch.device(device)
    with evaluating(model, device) as model:
        selection = select_on_validation(model, val_loader, opts, device, healthy=healthy)
        outcome = evaluate_on_test(model, test_loader, opts, selection, device, subtype_names)
    return {**outcome.report, "_figures": outcome.figures}
