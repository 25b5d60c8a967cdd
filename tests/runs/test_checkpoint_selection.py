"""The checkpoint meddiff-train evaluates is the one ``optimized_metric`` selected (issue 17), with its rule."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from meddiff.callbacks import LastCheckpoint
from meddiff.runs.checkpoint_io import AtomicCheckpointIO
from meddiff.runs.checkpoint_selection import checkpoint_to_evaluate


class _TwoMetrics(L.LightningModule):
    """``val/auroc`` peaks at epoch 0, ``val/aucp`` at the last epoch: the two rules pick different files."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/auroc", 1.0 - 0.1 * self.current_epoch)
        self.log("val/aucp", 0.5 + 0.1 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(2, 2)), batch_size=2)


def _trainer(tmp_path):
    ckpts = tmp_path / "checkpoints"
    # the labelled one first: the old rule ("the first ModelCheckpoint with a file") evaluated it
    labelled = ModelCheckpoint(dirpath=ckpts, filename="labelled-{epoch}", monitor="val/auroc", mode="max")
    selected = ModelCheckpoint(dirpath=ckpts, filename="aucp-{epoch}", monitor="val/aucp", mode="max")
    trainer = L.Trainer(max_epochs=3, callbacks=[labelled, selected, LastCheckpoint(ckpts)],
                        plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0)
    trainer.fit(_TwoMetrics())
    return trainer


def test_the_evaluated_checkpoint_is_the_one_optimized_metric_selected(tmp_path):
    trainer = _trainer(tmp_path)
    path, rule = checkpoint_to_evaluate(trainer, "val/aucp")
    assert path is not None and path.endswith("aucp-epoch=2.ckpt") and "val/aucp" in rule
    path, rule = checkpoint_to_evaluate(trainer, "val/auroc")
    assert path.endswith("labelled-epoch=0.ckpt") and "val/auroc" in rule


def test_without_a_callback_on_optimized_metric_the_last_checkpoint_is_evaluated_and_said_so(tmp_path):
    trainer = _trainer(tmp_path)
    path, rule = checkpoint_to_evaluate(trainer, "val/psnr")
    assert path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert rule == "last (no checkpoint monitors optimized_metric=val/psnr)"
