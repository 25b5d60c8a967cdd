"""The guided protocol on the skeleton: check -> select on validation -> test once -> report (``Protocol.run``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from meddiff.errors import ConfigError
from meddiff.protocols.base import Outcome, Protocol, ValidationView, missing_members

from .interfaces import GuidedModel, VolumeDataModule
from .options import GuidedEvalOptions
from .report import write_outputs
from .select import GuidedSelection, healthy_baselines, select_on_validation
from .test import evaluate_on_test

__all__ = ["GuidedProtocol"]


class GuidedProtocol(Protocol):
    """Healthy counterfactuals by guidance, analysed per volume (see :mod:`meddiff.protocols.guided`)."""

    name = "guided"
    options = GuidedEvalOptions

    def check(self, model: Any, datamodule: Any, opts: GuidedEvalOptions) -> None:
        if missing_members(datamodule, VolumeDataModule):
            raise ConfigError(
                f"the guided protocol reads whole volumes through datamodule.volumes(split) and "
                f"datamodule.input_volumes(spec); {type(datamodule).__name__} has neither. Use data=adni_slices."
            )
        lacking = missing_members(model, GuidedModel)
        if lacking:
            raise ConfigError(
                f"the guided protocol translates with model.healthy_counterfactual(x, sampling) and scores with "
                f"model.anomaly_val.scoring; {type(model).__name__} lacks {lacking}. Use model=guided "
                "(GuidedDiffusion)."
            )

    def select(self, model: Any, data: ValidationView, opts: GuidedEvalOptions,
               device: torch.device) -> GuidedSelection:
        # eval overrides go into a copy of model.sampling (the model's own is never changed)
        sampling = replace(model.sampling, **opts.sampling_overrides()).validate(
            model.schedule.num_train_timesteps, "model.sampling with eval overrides")
        refs = healthy_baselines(data, opts, device)  # the CN reference from the training volumes
        choice, val_skipped = select_on_validation(model, data, sampling, opts, device, refs)
        if refs.note:
            choice["baselines_skipped"] = refs.note
        return GuidedSelection(sampling, refs, choice, val_skipped)

    def test(self, model: Any, datamodule: Any, opts: GuidedEvalOptions, selection: GuidedSelection,
             device: torch.device) -> Outcome:
        return evaluate_on_test(model, datamodule, opts, selection, device)

    def write(self, outcome: Outcome, out_dir: Path) -> None:
        write_outputs(outcome, out_dir)
