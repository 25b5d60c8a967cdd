"""One "node" of a 2-node x 1-process DDP training on localhost (started by torchrun, gloo): a tiny net with
:class:`LastCheckpoint`; ``sys.argv[1]`` is the run dir, ``sys.argv[2]`` the epochs, ``sys.argv[3]`` ``resume`` to
continue from ``last.ckpt``."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from meddiff.callbacks import LastCheckpoint
from meddiff.runs.checkpoint_io import AtomicCheckpointIO


class _M(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        # no sync_dist: Lightning syncs such a value lazily, when read, and the progress bar reads it on rank 0 only,
        # an all-reduce the other rank never joins (it crossed LastCheckpoint's collective; see models/base.py)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(16, 2, generator=g)), batch_size=2)  # 4 steps / epoch / rank


def main() -> None:
    run_dir, epochs, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    trainer = L.Trainer(max_epochs=epochs, num_nodes=2, devices=1, accelerator="cpu",
                        strategy=DDPStrategy(process_group_backend="gloo"),
                        callbacks=[LastCheckpoint(run_dir / "checkpoints")], logger=False,
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False)
    ckpt = str(run_dir / "checkpoints" / "last.ckpt") if mode == "resume" else None
    trainer.fit(_M(), ckpt_path=ckpt, weights_only=False)
    (run_dir / f"done-rank{trainer.global_rank}-of-{trainer.world_size}-node{trainer.node_rank}").write_text(
        str(trainer.global_step))


if __name__ == "__main__":
    main()
