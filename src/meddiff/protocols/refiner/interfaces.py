"""What the refiner protocol needs of a model and of the data, as small structural interfaces.

The protocol never imports a model class or a DataModule: it reads any model that offers :class:`HealthyEstimates`
(``estimates(batch) -> {name: healthy estimate}``; a plain anomaly model's ``reconstruct`` counts as one estimate,
``"model"``) and any datamodule that offers :class:`PoolData`. A model that also offers :class:`StepSweepable` gets
the refinement-steps measurement. Capabilities are checked by the attributes an interface names
(:func:`implements`), never by class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from meddiff.errors import ConfigError
from meddiff.protocols.base import missing_members


class HealthyEstimates(Protocol):
    """A model with named healthy estimates, scored with ``anomaly_val.scoring`` (its anomaly-validation
    component's :class:`~meddiff.anomaly.scoring.ScoringConfig`, as in every protocol)."""

    anomaly_val: Any

    def estimates(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{name: [B, C, H, W] in [-1, 1]}``, the primary (headline) estimate last (e.g. coarse, refined)."""
        ...


class Reconstructs(Protocol):
    """Any other anomaly model: one healthy estimate (scored as ``"model"``)."""

    anomaly_val: Any

    def reconstruct(self, batch: Mapping[str, Any]) -> torch.Tensor: ...


class StepSweepable(Protocol):
    """A refiner whose refined estimate can be recomputed with another number of steps (a measurement only).

    ``sampling`` is the model's sampling dataclass (``model.sampling``: ``sampler``, ``steps``, ``eta``, ``t_start``,
    ``spacing``, ...); the sweep runs ``refine_with`` on ``dataclasses.replace(model.sampling, steps=s)`` after
    ``check_sampling`` accepted it."""

    sampling: Any

    def coarse(self, batch: Mapping[str, Any]) -> torch.Tensor: ...

    def refine_with(self, x: torch.Tensor, coarse: torch.Tensor, cfg: Any,
                    generator: torch.Generator | None = None, ids: Sequence[str] | None = None) -> torch.Tensor: ...

    def check_sampling(self, cfg: Any, where: str) -> None: ...


class PoolData(Protocol):
    """A datamodule with named pools (``known_healthy``, ``known_healthy_val``, ``mixed``, ``mixed_labelled``,
    ``labelled_val``) and a test split. ``val_loader_pools()`` names the validation split's pools;
    ``pool_dataset("mixed_labelled").records`` carry ``id`` and ``label``."""

    def val_loader_pools(self) -> list[str]: ...

    def has_pool(self, name: str) -> bool: ...

    def pool_dataset(self, name: str) -> Any: ...

    def pool_loader(self, name: str, shuffle: bool = False, max_items: int | None = None) -> Any: ...

    def test_dataloader(self) -> Any: ...


#: the refinement settings a report records (report key -> ``model.sampling`` field)
REFINEMENT_FIELDS = {"sampler": "sampler", "num_steps": "steps", "t_start": "t_start", "eta": "eta",
                     "timestep_spacing": "spacing"}


def implements(obj: Any, interface: type) -> bool:
    """Whether ``obj`` has every member ``interface`` declares (``base.missing_members``: structural, not by
    class)."""
    return not missing_members(obj, interface)


def check_data(datamodule: Any) -> None:
    """``ConfigError`` unless the datamodule offers the pools the protocol reads."""
    missing = missing_members(datamodule, PoolData)
    if missing:
        raise ConfigError(f"the refiner protocol needs a datamodule with pools (data=image_folder: "
                          f"ImageFolderAnomalyDataModule); {type(datamodule).__name__} lacks {missing}.")


def check_model(model: Any) -> None:
    """``ConfigError`` unless the model has ``estimates`` or ``reconstruct`` and an ``anomaly_val`` (its ``scoring``)."""
    if not (implements(model, HealthyEstimates) or implements(model, Reconstructs)):
        raise ConfigError(f"the refiner protocol scores a model's healthy estimates: {type(model).__name__} lacks "
                          f"{missing_members(model, HealthyEstimates)} (estimates(batch) -> {{name: tensor}}, or "
                          "reconstruct(batch), and anomaly_val.scoring).")


def with_steps(model: Any, steps: int) -> Any:
    """``model.sampling`` with ``steps`` changed (a copy; the model's own sampling is never modified)."""
    return dataclasses.replace(model.sampling, steps=int(steps))


def estimates_of(model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's named healthy estimates of ``batch`` (``{"model": reconstruct(batch)}`` without ``estimates``)."""
    if callable(getattr(model, "estimates", None)):
        return dict(model.estimates(batch))
    return {"model": model.reconstruct(batch)}


def refinement_info(model: Any) -> dict[str, Any] | None:
    """The refinement settings of a step-sweepable model, read from ``model.sampling`` (None otherwise); the
    headline uses these."""
    if not implements(model, StepSweepable):
        return None
    sampling = model.sampling
    info: dict[str, Any] = {k: getattr(sampling, f) for k, f in REFINEMENT_FIELDS.items() if hasattr(sampling, f)}
    if hasattr(model, "residual_std"):
        info["residual_scale"] = float(model.residual_std)
    if hasattr(model, "coarse_info"):
        info["coarse_source"] = model.coarse_info
    return info
