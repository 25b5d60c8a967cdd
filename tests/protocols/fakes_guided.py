"""Fakes for the protocol contract test: a tiny guided model and a per-volume datamodule (16 x 16 slices)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meddiff.anomaly.scoring import ScoringConfig
from meddiff.models.validation import AnomalyValidation

CLASSES = ("CN", "EMCI", "MCI", "LMCI", "AD")


@dataclass
class FakeSampling:
    """The model's ``sampling``: the translation settings the protocol copies (``dataclasses.replace``) and
    validates."""

    t_start: int = 10
    steps: int = 2
    guidance_scale: float = 3.0
    invert: bool = True
    target_class: int = 0
    seed: int = 0

    def validate(self, num_train_timesteps: int | None = None, where: str = "model.sampling") -> FakeSampling:
        return self


class FakeGuidedModel(nn.Module):
    """Healthy counterfactual = the input with bright tissue (> 0.3) pulled down to a learnable level; train mode."""

    eval_protocol = "guided"
    num_classes = 5

    def __init__(self) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.tensor(-0.2))
        self.sampling = FakeSampling()
        self.anomaly_val = AnomalyValidation(ScoringConfig())  # the scorer the protocol reads (.scoring)
        self.schedule = type("Schedule", (), {"num_train_timesteps": 100})()

    def healthy_counterfactual(self, x: torch.Tensor, sampling: Any = None, generator: Any = None) -> torch.Tensor:
        return torch.where(x > 0.3, self.level.expand_as(x), x)


@dataclass
class Slices:
    images: torch.Tensor
    masks: torch.Tensor
    axes: np.ndarray
    indices: np.ndarray


@dataclass
class FakeVolume:
    volume_id: str
    slice_label: int | None
    load: Callable[[], Slices]
    name: str = ""
    subject: str | None = None

    @property
    def class_name(self) -> str:
        return CLASSES[self.slice_label - 1] if self.slice_label else "?"


@dataclass
class FakeVolumes:
    sources: list[FakeVolume]
    skipped: list[dict[str, str]] = field(default_factory=list)
    batch: bool = True


def _volume(name: str, label: int, seed: int) -> FakeVolume:
    """Four 16 x 16 slices: a head of noisy tissue; AD volumes (label 5) have a bright spot in two slices."""
    g = torch.Generator().manual_seed(seed)
    images = -torch.ones(4, 1, 16, 16)
    images[:, :, 3:13, 3:13] = -0.4 + 0.2 * torch.rand(4, 1, 10, 10, generator=g)
    if label == 5:
        images[1:3, :, 6:9, 6:9] = 0.8
    masks = images > -0.9
    data = Slices(images, masks, np.zeros(4, dtype=np.int64), np.arange(4))
    return FakeVolume(name, label, lambda: data, name, name)


class FakeVolumeData:
    """``volumes(split)``: train = 2 CN volumes, val and test = 2 CN + 2 AD each."""

    def volumes(self, split: str) -> FakeVolumes:
        if split == "train":
            return FakeVolumes([_volume(f"tr_cn{i}", 1, i) for i in range(2)])
        base = {"val": 10, "test": 20}[split]
        return FakeVolumes([_volume(f"{split}_cn{i}", 1, base + i) for i in range(2)]
                           + [_volume(f"{split}_ad{i}", 5, base + 5 + i) for i in range(2)])

    def input_volumes(self, spec: Any, input_label: Any = None, what: str = "input") -> FakeVolumes:
        raise AssertionError("not used by the contract test")


def make(tmp_path: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    return FakeGuidedModel().train(), FakeVolumeData(), {"n_boot": 20, "volume_plots": False, "n_worst": 2}
