"""What the denoise protocol reads from data and models: two small ``typing.Protocol`` interfaces, checked by name.

The protocol never imports a DataModule class nor checks a model's class: any object with these members works
(``HDF5PatchDataModule`` and ``ConditionalDiffusion`` provide them; ``tests/protocols/fakes_denoise.py`` is a
tiny stand-in for both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from meddiff.errors import ConfigError
from meddiff.protocols.base import missing_members


class DenoiseData(Protocol):
    """What the denoise protocol needs from a DataModule (``HDF5PatchDataModule`` provides it)."""

    noise_std: float | Sequence[float]  # the training noise level: a std, or a [low, high] range

    def noisy_dataset(self, split: str, noise_std: float | Sequence[float] | None = None) -> Any:
        """(noisy, clean) patch pairs of ``split`` at ``noise_std`` (val/test: deterministic noise). Items carry
        ``image``, ``cond`` ``[C, P, P]`` and ``coords`` ``[4]``; the dataset has ``coords`` ``[N, 4]`` rows
        ``(volume, slice, y, x)``, ``volumes`` (volume rows) and ``info`` (``path``, ``sha256``, ``slice_shapes``)."""
        ...

    def split_names(self) -> dict[str, list[str]]:
        """Volume names per split."""
        ...

    def train_dataloader(self) -> Any:
        """The training pairs (the supervised baseline trains on them)."""
        ...


class DenoiseModel(Protocol):
    """What the denoise protocol needs from a model (``ConditionalDiffusion`` provides it).

    Also read when present: ``image_channels`` / ``cond_channels`` (default 1).
    """

    schedule: Any  # ``num_train_timesteps`` (T) and ``prediction_type``
    #: ``model.sampling``: a dataclass with ``sampler``, ``steps``, ``eta``, ``seed``, ``draws`` (and ``spacing``,
    #: ``clip``, recorded in the report); the protocol passes copies (``dataclasses.replace``) to ``reconstruct``
    sampling: Any

    def reconstruct(self, batch: Mapping[str, Any], sampling: Any = None) -> torch.Tensor:
        """Clean estimate ``[B, C, H, W]`` in ``[-1, 1]`` of the noisy ``batch["cond"] [B, C', H, W]`` with
        ``sampling`` (``sampler`` ``"ddim"`` with ``steps`` steps or ``"ddpm"`` with ``steps=None``: the full chain;
        the noise seeded with ``sampling.seed``)."""
        ...


def check_data(datamodule: Any) -> None:
    """ConfigError naming what a DataModule must provide (:class:`DenoiseData`) when ``datamodule`` lacks it."""
    missing = missing_members(datamodule, DenoiseData)
    if missing:
        raise ConfigError(
            f"the denoise protocol reads its data through noise_std, noisy_dataset(split, noise_std), split_names() "
            f"and train_dataloader() (see meddiff.protocols.denoise.DenoiseData); {type(datamodule).__name__} lacks "
            f"{missing}. Use data=hdf5_patches (HDF5PatchDataModule) or give the DataModule these members."
        )


def check_model(model: Any) -> None:
    """ConfigError when ``model`` cannot denoise (:class:`DenoiseModel`)."""
    missing = missing_members(model, DenoiseModel)
    if missing:
        raise ConfigError(
            f"{type(model).__name__} lacks {missing} (see meddiff.protocols.denoise.DenoiseModel); the denoise "
            "protocol needs a model with reconstruct(batch, sampling), sampling and schedule, e.g. "
            "ConditionalDiffusion (model=conditional)."
        )
