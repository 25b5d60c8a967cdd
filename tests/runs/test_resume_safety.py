"""Resumes that cannot hurt (issue 20): a restore that fails writes nothing; a checkpoint that does not fit is one
clear error; optimizer / LR-schedule overrides take effect after the restore; status.json names the real last.ckpt."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from meddiff.callbacks import ConfiguredOptimizer, LastCheckpoint
from meddiff.errors import ConfigError
from meddiff.runs.checkpoint_io import AtomicCheckpointIO, check_weights_fit, load_checkpoint
from meddiff.runs.job import selection_summary


class _Net(L.LightningModule):
    def __init__(self, width: int = 4, lr: float = 0.1, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Linear(2, width)
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2, generator=torch.Generator().manual_seed(0))), batch_size=2)


class _Probe(L.Callback):
    """Records the optimizer state right after the restore (after the callbacks listed before it)."""

    def on_train_start(self, trainer, pl_module):
        group = trainer.optimizers[0].param_groups[0]
        self.seen = {"lr": group["lr"], "initial_lr": group["initial_lr"], "weight_decay": group["weight_decay"],
                     "base_lrs": list(trainer.lr_scheduler_configs[0].scheduler.base_lrs)}


def _fit(tmp_path: Path, model: L.LightningModule, epochs: int, ckpt_path=None, extra=()) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, callbacks=[*extra, LastCheckpoint(tmp_path / "checkpoints")],
                        plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, ckpt_path=ckpt_path, weights_only=True)
    return trainer


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_restore_that_fails_never_overwrites_last_ckpt(tmp_path):
    _fit(tmp_path, _Net(width=4), epochs=1)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = _digest(last)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _fit(tmp_path, _Net(width=8), epochs=2, ckpt_path=last)  # Lightning's own restore fails
    assert _digest(last) == before  # no exception-save of untrained weights


def test_weights_that_do_not_fit_are_one_clear_error_naming_keys_and_shapes(tmp_path):
    _fit(tmp_path, _Net(width=4), epochs=1)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    check_weights_fit(_Net(width=4), ckpt, "last.ckpt")
    with pytest.raises(ConfigError, match=r"2 shape mismatch\(es\): layer.bias: checkpoint \(4,\) vs model \(8,\)"):
        check_weights_fit(_Net(width=8), ckpt, "last.ckpt")
    ckpt["state_dict"]["extra.weight"] = torch.zeros(1)
    del ckpt["state_dict"]["layer.bias"]
    with pytest.raises(ConfigError, match=r"1 missing key\(s\): layer.bias; 1 unexpected key\(s\): extra.weight"):
        check_weights_fit(_Net(width=4), ckpt, "last.ckpt")


@pytest.mark.parametrize("apply", [True, False], ids=["configured", "without_the_callback"])
def test_optimizer_overrides_on_resume_take_effect(tmp_path, apply):
    _fit(tmp_path, _Net(lr=0.1), epochs=1)  # 4 steps
    probe = _Probe()
    extra = [ConfiguredOptimizer(), probe] if apply else [probe]
    _fit(tmp_path, _Net(lr=1e-3, weight_decay=0.5), epochs=2, ckpt_path=tmp_path / "checkpoints" / "last.ckpt",
         extra=extra)
    if not apply:  # what Lightning alone does: the checkpoint's settings win over the config
        assert probe.seen["initial_lr"] == 0.1 and probe.seen["weight_decay"] == 0.0
        return
    assert probe.seen["initial_lr"] == 1e-3 and probe.seen["base_lrs"] == [1e-3]
    assert probe.seen["lr"] == pytest.approx(1e-3 / (1 + 4))  # the schedule continues at its position
    assert probe.seen["weight_decay"] == 0.5
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 1e-3
    assert saved["lr_schedulers"][0]["base_lrs"] == [1e-3]


def test_the_selection_summary_names_the_real_last_ckpt(tmp_path):
    trainer = _fit(tmp_path, _Net(), epochs=1)
    summary = selection_summary(trainer, "val/auroc")
    assert summary["last_checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")


# --------------------------------------------------------------------------------------- status.json and the lock
def _cfg(run_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.create({"paths": {"output_dir": str(run_dir)}, "task_name": "t", "optimized_metric": "val/x"})


def test_a_process_refused_by_the_lock_writes_nothing_into_the_run_dir(tmp_path):
    import os
    import socket

    from meddiff.runs.job import run_job
    from meddiff.runs.run_dir import RunDirInUse

    (tmp_path / ".lock").write_text(f"{os.getppid()} {socket.gethostname()} -\n")  # a live holder
    (tmp_path / "status.json").write_text('{"state": "running"}')
    called = []
    with pytest.raises(RunDirInUse, match=f"process {os.getppid()}"):
        run_job(_cfg(tmp_path), lambda cfg, started: called.append(1))
    assert not called and (tmp_path / "status.json").read_text() == '{"state": "running"}'


def test_an_attempt_that_never_started_leaves_the_earlier_status_json_as_it_was(tmp_path):
    from meddiff.runs.job import run_job

    def refused(cfg, started):
        raise ConfigError("refused before the restore")

    (tmp_path / "status.json").write_text('{"state": "ok", "attempt": 1}')
    with pytest.raises(ConfigError):
        run_job(_cfg(tmp_path), refused)
    assert (tmp_path / "status.json").read_text() == '{"state": "ok", "attempt": 1}'
    assert not (tmp_path / ".lock").exists()
    fresh = tmp_path / "fresh"  # a fresh run dir records the failure (sweep summaries list it)
    with pytest.raises(ConfigError):
        run_job(_cfg(fresh), refused)
    import json

    assert json.loads((fresh / "status.json").read_text())["state"] == "failed"

    def fails_after_start(cfg, started):
        started()
        raise RuntimeError("crash in training")

    with pytest.raises(RuntimeError):
        run_job(_cfg(tmp_path), fails_after_start)
    record = json.loads((tmp_path / "status.json").read_text())
    assert record["state"] == "failed" and record["attempt"] == 2 and "crash in training" in record["error"]


class _FailsAtOnce(_Net):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("NaN at the first resumed step")


def test_an_exception_at_the_resumed_step_does_not_rewrite_last_ckpt(tmp_path):
    _fit(tmp_path, _Net(), epochs=1)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = _digest(last)
    with pytest.raises(RuntimeError, match="NaN at the first resumed step"):
        _fit(tmp_path, _FailsAtOnce(), epochs=2, ckpt_path=last)
    assert _digest(last) == before  # the weights are the checkpoint's: nothing new to write
