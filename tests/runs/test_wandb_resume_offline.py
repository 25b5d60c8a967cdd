"""One wandb run per training across a resume, offline: the run files (``<run_dir>/wandb/offline-run-*/run-<id>.wandb``)
are decoded and checked for one id, a stable name and group, steps that go on from the checkpoint's step, and the
checkpoint / report artifacts (``wandb sync`` uploads what these files hold)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("wandb")

_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version


def read_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log: 32 KiB blocks of chunks with a 7-byte header
    crc32 | length u16 | type u8, type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def _segment(run_dir: Path, identity, max_epochs: int, ckpt: str | None):
    import lightning as L
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, TensorDataset

    from meddiff.callbacks import LastCheckpoint
    from meddiff.runs.checkpoint_io import AtomicCheckpointIO
    from meddiff.runs.job import selection_summary
    from meddiff.runs.log_outputs import log_run_outputs
    from meddiff.runs.loggers import instantiate_loggers

    class _M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train/loss", loss, on_step=True, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)

    cfg = OmegaConf.create({"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "save_dir": str(run_dir),
                                      "project": "t", "name": None, "group": None, "tags": None,
                                      "job_type": "train", "offline": True, "id": None}})
    (lg,) = instantiate_loggers(cfg, run_dir, identity)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[LastCheckpoint(run_dir / "checkpoints")], logger=[lg],
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, log_every_n_steps=1)
    trainer.fit(_M(), ckpt_path=ckpt, weights_only=False)
    (run_dir / "report.json").write_text(json.dumps({"summary": {"auroc": 0.5}}))
    (run_dir / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # only uploaded, never decoded
    log_run_outputs([lg], run_dir, {}, selection_summary(trainer, None), None, step=trainer.global_step)
    import wandb

    wandb.finish()
    return trainer.global_step


def test_offline_resume_is_one_run_with_steps_that_go_on(tmp_path, monkeypatch):
    from meddiff.runs.identity import RunIdentity
    from meddiff.runs.loggers import WANDB_ID_FILE

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = RunIdentity("demo", "demo/max_epochs=1", "demo", ["demo"], {"trainer.max_epochs": "1"})
    step1 = _segment(tmp_path, first, 1, None)
    # the resume's own overrides would rename the run: the first launch's name and group stay
    again = RunIdentity("demo", "demo/max_epochs=2", "demo/other", ["demo"], {"trainer.max_epochs": "2"})
    step2 = _segment(tmp_path, again, 2, str(tmp_path / "checkpoints" / "last.ckpt"))
    assert step2 > step1 > 0
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)

    segments = []
    for f in files:
        recs = read_records(f)
        runs = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
        steps = [r.history.step.num for r in recs if r.WhichOneof("record_type") == "history"]
        arts = [(r.artifact.name, r.artifact.type) for r in recs if r.WhichOneof("record_type") == "artifact"]
        configs = [{i.key for i in r.config.update} for r in recs if r.WhichOneof("record_type") == "config"]
        assert runs, (f, f.stat().st_size, [r.WhichOneof("record_type") for r in recs])
        segments.append((runs[0], steps, arts, configs))
    (run1, steps1, arts1, _), (run2, steps2, arts2, configs2) = segments
    assert run1.run_id == run2.run_id == run_id
    assert run1.display_name == run2.display_name == "demo/max_epochs=1"
    assert run1.run_group == run2.run_group == "demo"
    assert "resume" in run2.tags and "resume" not in run1.tags
    assert any("resume/1" in keys for keys in configs2)  # the resume's overrides, in the config
    # wandb's step is the trainer's logging step: increasing in each segment, and the resume starts past the first
    assert steps1 == sorted(steps1) and steps2 == sorted(steps2) and steps1 and steps2
    assert steps2[0] >= steps1[-1] and steps2[-1] >= step1
    for arts in (arts1, arts2):
        assert (f"model-{run_id}", "model") in arts and (f"report-{run_id}", "report") in arts
