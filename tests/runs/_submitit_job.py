"""A tiny training that a test runs the way submitit runs a job (``python -m submitit.core._submit <folder>`` with
SLURM's and submitit's environment variables): imported by reference from the pickled submission."""

from __future__ import annotations

import time
from pathlib import Path


def train(run_dir: str, max_epochs: int, step_sleep: float) -> int:
    """Fit a linear net (8 steps an epoch) with :class:`LastCheckpoint` in ``run_dir``; continue from its
    ``last.ckpt`` on a requeued attempt (``SLURM_RESTART_COUNT`` >= 1, as ``meddiff.train`` does). Returns the final
    global step."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from meddiff.callbacks import LastCheckpoint
    from meddiff.runs.checkpoint_io import AtomicCheckpointIO
    from meddiff.runs.run_dir import is_slurm_requeue

    class _M(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            time.sleep(step_sleep)
            Path(run_dir, "step").write_text(str(self.global_step))
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2)

    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    ckpt = str(last) if is_slurm_requeue() and last.is_file() else None
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[LastCheckpoint(Path(run_dir) / "checkpoints")],
                        logger=False, plugins=[AtomicCheckpointIO()], enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(_M(), ckpt_path=ckpt, weights_only=False)
    return trainer.global_step
