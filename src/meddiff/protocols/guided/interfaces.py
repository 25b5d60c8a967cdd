"""What the guided protocol reads from a datamodule and a model (structural types: nothing to subclass, nothing
imported from ``meddiff.data``; the ADNI slice DataModule is one implementation).

Volumes carry an ADNI-style ``slice_label`` 1..5 = :data:`CLASS_NAMES` (1 = CN, the healthy reference class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["CLASS_NAMES", "GuidedModel", "SliceStack", "Volume", "VolumeDataModule", "VolumeSet"]

#: class names of ``slice_label`` 1..5 (the ADNI convention of the data formats; pinned equal by a test)
CLASS_NAMES: tuple[str, ...] = ("CN", "EMCI", "MCI", "LMCI", "AD")


class SliceStack(Protocol):
    """The slices of one volume: ``images`` float ``[N, 1, S, S]`` in ``[-1, 1]``, ``masks`` bool ``[N, 1, S, S]``
    (brain), ``axes`` / ``indices`` int ``[N]`` (slice position in the volume)."""

    images: torch.Tensor
    masks: torch.Tensor
    axes: np.ndarray
    indices: np.ndarray


class Volume(Protocol):
    """One volume to evaluate: id, ``slice_label`` (1..5, None = unknown), ``class_name``, ``subject`` (None = the
    volume is its own subject), ``name`` for messages, and ``load()`` -> its :class:`SliceStack`."""

    volume_id: str
    slice_label: int | None
    name: str
    subject: str | None
    load: Callable[[], SliceStack]

    @property
    def class_name(self) -> str: ...


class VolumeSet(Protocol):
    """Volumes of a split or an input: ``sources``, ``skipped`` (``{"volume", "reason"}``) and ``batch`` (False for
    one named input volume: a failure is then an error, not a skip)."""

    sources: Sequence[Volume]
    skipped: list[dict[str, str]]
    batch: bool


@runtime_checkable
class VolumeDataModule(Protocol):
    """What the guided protocol reads from a DataModule (public, per volume)."""

    def volumes(self, split: str) -> VolumeSet:
        """The volumes of ``split`` (``train`` for the healthy reference, ``val``, ``test``)."""
        ...

    def input_volumes(self, spec: Any, input_label: Any = None, what: str = "input") -> VolumeSet:
        """Volumes named by ``eval.input`` (a ``.nii.gz``, a ``dataset.json`` or a record), sliced like training."""
        ...


@runtime_checkable
class GuidedModel(Protocol):
    """A model that translates slices toward healthy: ``healthy_counterfactual(x [B, 1, S, S], sampling,
    generator) -> [B, 1, S, S]`` in ``[-1, 1]``; ``sampling`` (``model.sampling``: a dataclass the protocol copies
    with ``dataclasses.replace`` and checks with ``validate(num_train_timesteps, where)``; fields ``t_start``,
    ``steps``, ``guidance_scale``, ``invert``, ``target_class``, ``seed``), ``anomaly_val.scoring`` (the anomaly
    scorer), ``schedule`` (``num_train_timesteps``)."""

    sampling: Any
    anomaly_val: Any
    schedule: Any

    def healthy_counterfactual(self, x: torch.Tensor, sampling: Any = None, generator: Any = None
                               ) -> torch.Tensor: ...
