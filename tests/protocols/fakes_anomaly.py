"""Fakes for the protocol contract test: a tiny anomaly model and datamodule (8 x 8 images, a few batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from meddiff.anomaly.scoring import ScoringConfig
from meddiff.models.validation import AnomalyValidation


class FakeAnomalyModel(nn.Module):
    """Reconstructs a constant healthy image from a learnable value (-1: black); left in train mode on purpose."""

    eval_protocol = "anomaly"

    def __init__(self) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.tensor(-1.0))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.anomaly_val = AnomalyValidation(ScoringConfig())  # the scorer the protocol reads (.scoring)

    def reconstruct(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"]
        return self.level.expand_as(x).clamp(-1, 1)


def _items(n: int, seed: int, healthy_only: bool = False) -> list[dict[str, Any]]:
    """Healthy: a dim blob of random size; anomalous (every other item): one bright pixel, in the lesion mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = -torch.ones(1, 8, 8)
        k = int(torch.randint(2, 5, (1,), generator=g))
        x[:, :k, :k] = -0.2
        label = 0 if healthy_only else i % 2
        mask = torch.zeros(1, 8, 8, dtype=torch.bool)
        if label:
            x[:, 7, 7] = 1.0
            mask[:, 7, 7] = True
        out.append({"image": x, "label": torch.tensor(label), "mask": mask, "subject": f"S{seed}_{i // 2}"})
    return out


class FakeAnomalyData:
    """``train_dataloader`` (healthy items: the healthy-set baselines), ``val_dataloader``, ``test_dataloader``."""

    def __init__(self) -> None:
        self.sets = {"train": _items(12, 0, healthy_only=True), "val": _items(16, 1), "test": _items(16, 2)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["train"], batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=4)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["test"], batch_size=4)


def make(tmp_path: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    model = FakeAnomalyModel().train()
    return model, FakeAnomalyData(), {"median_size": [1], "reduction": ["mean", "max"], "n_boot": 20,
                                      "n_figure_rows": 2}
