"""What the anomaly protocol reads from a model and a datamodule (structural types: nothing to subclass).

Any model with a scorer config and a healthy estimate is evaluated the same way; any datamodule with the
validation and test loaders (and, for the healthy-set baselines, a training loader over a map-style dataset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from meddiff.anomaly.scoring import ScoringConfig

__all__ = ["AnomalyData", "AnomalyModel", "ReconFn", "ScorerHolder"]

#: a method's healthy estimate of a batch: ``batch -> [B, C, H, W]`` in ``[-1, 1]``
ReconFn = Callable[[Mapping[str, Any]], torch.Tensor]


class ScorerHolder(Protocol):
    """The model's anomaly-validation component (``model.anomaly_val``), read for its ``scoring`` only."""

    scoring: ScoringConfig


@runtime_checkable
class AnomalyModel(Protocol):
    """``anomaly_val.scoring`` (the configured scorer, a :class:`~meddiff.anomaly.scoring.ScoringConfig` held by the
    model's anomaly-validation component) and ``reconstruct(batch[, sampling]) -> [B, C, H, W]`` in ``[-1, 1]``.

    Optional: ``sampling`` (``model.sampling``: a dataclass with ``t_start`` and ``validate(num_train_timesteps)``)
    and ``schedule`` (``num_train_timesteps``), for ``eval.t_start`` depths; ``reconstruct`` then takes the copy
    to use as ``sampling``.
    """

    anomaly_val: ScorerHolder

    def reconstruct(self, batch: Mapping[str, Any], *args: Any) -> torch.Tensor: ...


@runtime_checkable
class AnomalyData(Protocol):
    """Loaders of dict batches (``image``, optional ``label``, ``mask``, ``brain_mask``, ``subject``, ``id`` and
    add-on fields such as ``subtypes``). Optional: ``val_labelled_dataloader()`` (the labelled validation items
    alone), ``train_dataloader()`` (``.dataset`` map-style: the healthy-set baselines), column names of add-on
    fields (``subtype_names``)."""

    def val_dataloader(self) -> Iterable: ...

    def test_dataloader(self) -> Iterable: ...
