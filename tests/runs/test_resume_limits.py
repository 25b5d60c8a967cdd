"""A resumed run equals an uninterrupted one under ``limit_train_batches`` (int and float) and ``limit_val_batches``:
same global steps, batches per epoch and data order (issue 20). The interruption is simulated as a kill -9 after
``last.ckpt`` was written: at an epoch end (no step checkpoints) or mid-epoch (step checkpoints)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from meddiff.callbacks import LastCheckpoint
from meddiff.data.resumable import ResumableLoader
from meddiff.runs.checkpoint_io import AtomicCheckpointIO

N_TRAIN, BATCH, EPOCHS = 22, 2, 3  # 11 batches per full epoch


class _Killed(Exception):
    """Stands for kill -9: nothing is written when it is raised (save_on_exception off)."""


class _Recording(L.LightningModule):
    """Records ``(epoch, global step, sample indices)`` of every training batch and the validation batches per epoch;
    raises :class:`_Killed` at the start of step ``kill_at``."""

    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.kill_at = kill_at
        self.seen: list[tuple[int, int, list[int]]] = []
        self.val_batches: dict[int, int] = {}

    def training_step(self, batch, batch_idx):
        if self.global_step == self.kill_at:
            raise _Killed
        self.seen.append((self.current_epoch, self.global_step, batch[0].long().flatten().tolist()))
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_batches[self.current_epoch] = self.val_batches.get(self.current_epoch, 0) + 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return ResumableLoader(TensorDataset(torch.arange(N_TRAIN).float()[:, None]), batch_size=BATCH, seed=7)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=2)


def _fit(tmp_path, limits: dict, model: _Recording, every: int, ckpt_path=None, max_steps: int = -1) -> None:
    trainer = L.Trainer(max_epochs=EPOCHS, max_steps=max_steps, **limits,
                        callbacks=[LastCheckpoint(tmp_path / "checkpoints", every, save_on_exception=False)],
                        plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1)
    trainer.fit(model, ckpt_path=ckpt_path)
    model.final_step = trainer.global_step


@pytest.mark.parametrize("limits", [{}, {"limit_train_batches": 6}, {"limit_train_batches": 0.6},
                                    {"limit_train_batches": 6, "limit_val_batches": 2},
                                    {"limit_train_batches": 0.6, "limit_val_batches": 0.4}],
                         ids=["none", "int", "float", "int+val", "float+val"])
@pytest.mark.parametrize("every", [0, 4], ids=["epoch-end-ckpt", "mid-epoch-ckpt"])
@pytest.mark.parametrize("max_steps", [-1, 100], ids=["epochs", "max-steps"])
def test_a_resume_under_batch_limits_equals_an_uninterrupted_run(tmp_path, limits, every, max_steps):
    reference = _Recording()
    _fit(tmp_path / "ref", limits, reference, every, max_steps=max_steps)
    per_epoch = 6 if limits else N_TRAIN // BATCH  # int(11 * 0.6) = 6 as well
    assert reference.final_step == EPOCHS * per_epoch

    kill_at = per_epoch + 3  # in epoch 1, after the epoch-0 checkpoint (or a later step checkpoint)
    killed = _Recording(kill_at=kill_at)
    with pytest.raises(_Killed):
        _fit(tmp_path / "run", limits, killed, every, max_steps=max_steps)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == (per_epoch if every == 0 else (kill_at - 1) // every * every)

    resumed = _Recording()
    _fit(tmp_path / "run", limits, resumed, every, ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt",
         max_steps=max_steps)
    assert resumed.final_step == reference.final_step
    done = [s for s in killed.seen if s[1] < ckpt["global_step"]]
    assert done + resumed.seen == reference.seen  # same steps, batches per epoch and order
    assert resumed.val_batches == {e: reference.val_batches[e] for e in range(1, EPOCHS)}
