"""Checkpoints: weights-only loading with clear errors, atomic verified saving, last.ckpt at steps and exceptions."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from meddiff.callbacks import LastCheckpoint
from meddiff.errors import ConfigError, DataError
from meddiff.runs import checkpoint_io as ckpt_mod
from meddiff.runs import rng
from meddiff.runs.checkpoint_io import (
    AtomicCheckpointIO,
    load_checkpoint,
    save_checkpoint_file,
    stored_config,
)
from meddiff.runs.loop_state import logging_step_after_resume

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "demo_tiny_v0.1.ckpt"


def test_a_checkpoint_of_meddiff_0_1_with_omegaconf_objects_loads_weights_only():
    ckpt = load_checkpoint(FIXTURE)
    assert ckpt["global_step"] == 2 and "net.unet.conv_in.conv.weight" in ckpt["state_dict"]
    assert stored_config(ckpt, FIXTURE)["model"]["_target_"] == "meddiff.models.UnconditionalDiffusion"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(DataError, match=rf"{evil}.*GLOBAL posix.system.*could run code"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_a_stored_config_naming_os_system_is_refused(tmp_path):
    ckpt = load_checkpoint(FIXTURE)
    ckpt["meddiff_config"]["model"] = {"_target_": "os.system", "_args_": ["id"]}
    with pytest.raises(ConfigError, match=r"meddiff_config\.model\._target_='os\.system'"):
        stored_config(ckpt, "evil.ckpt")


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "state_dict_only", "no_config"])
def test_damaged_or_foreign_files_are_data_errors_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(FIXTURE.read_bytes()[: FIXTURE.stat().st_size // 2])
    elif kind == "text":
        path.write_text("not a checkpoint at all")
    elif kind == "state_dict_only":
        torch.save({"weight": torch.zeros(2)}, path)
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(DataError, match=str(path)):
        stored_config(load_checkpoint(path), path)


def test_a_missing_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_saving_is_atomic_and_verified(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "global_step": 1}
    save_checkpoint_file(good, target)
    assert load_checkpoint(target)["global_step"] == 1

    real_save = torch.save

    def truncating_save(obj, path, *args, **kwargs):  # a write that silently comes out short
        real_save(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(ckpt_mod.torch, "save", truncating_save)
    with pytest.raises(DataError, match=f"Saving checkpoint {target} failed verification"):
        save_checkpoint_file({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    assert load_checkpoint(target)["global_step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_saved_checkpoints_hold_plain_containers_only(tmp_path):
    from omegaconf import OmegaConf

    target = tmp_path / "c.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "hyper_parameters": {"recon": OmegaConf.create({"a": [1]})}},
                                         target)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(target) == []
    assert torch.load(target, weights_only=True)["hyper_parameters"] == {"recon": {"a": [1]}}


def test_logging_step_after_resume_follows_lightnings_restart_rule():
    def ckpt(stepped, ready, completed):
        return {"loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": stepped},
                                       "epoch_loop.batch_progress": {"total": {"ready": ready, "started": ready,
                                                                               "processed": ready,
                                                                               "completed": completed}}}}}

    assert logging_step_after_resume(ckpt(5, 5, 5)) == 5  # saved at a batch boundary / epoch end
    assert logging_step_after_resume(ckpt(4, 5, 4)) == 5  # saved in on_train_batch_end (Lightning adds one)


# ------------------------------------------------------------------------------------------- LastCheckpoint
class _Tiny(L.LightningModule):
    """8 batches per epoch; ``updates`` counts on_train_batch_end calls, like the EMA of meddiff's models."""

    def __init__(self, fail_in_step: int | None = None, fail_after_step: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.fail_in_step, self.fail_after_step = fail_in_step, fail_after_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_in_step:
            raise RuntimeError("boom in training_step")
        self.log("progress", float(self.global_step), on_epoch=True, on_step=False)
        return self.layer(batch[0]).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.updates += 1
        if self.global_step == self.fail_after_step:
            raise RuntimeError("boom after the optimizer step")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 2, generator=torch.Generator().manual_seed(0))), batch_size=2)


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.saved: list[tuple[int, int]] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saved.append((checkpoint["global_step"], int(checkpoint["state_dict"]["updates"])))


def _trainer(tmp_path, every=3, epochs=2, extra=()):
    return L.Trainer(max_epochs=epochs, callbacks=[*extra, LastCheckpoint(tmp_path / "checkpoints", every)],
                     plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1)


def test_last_ckpt_every_n_steps_and_epoch_holds_complete_steps(tmp_path):
    rec = _Recorder()
    _trainer(tmp_path, extra=[rec]).fit(_Tiny())
    # steps 3, 6 (mid-epoch), 8 (epoch end), 9, 12, 15, 16 (epoch end): each with the step's on_train_batch_end done
    assert rec.saved == [(3, 3), (6, 6), (8, 8), (9, 9), (12, 12), (15, 15), (16, 16)]


def test_last_ckpt_holds_the_best_checkpoint_callbacks_updated_state(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    best = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="progress", mode="max", save_top_k=1,
                           filename="best-{epoch}")
    _trainer(tmp_path, every=0, extra=[best]).fit(_Tiny())
    state = next(v for k, v in load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["callbacks"].items()
                 if k.startswith("ModelCheckpoint"))
    assert Path(state["best_model_path"]).name == "best-epoch=1.ckpt"  # this epoch's, not the previous one


def test_an_exception_in_a_training_step_writes_a_resumable_last_ckpt(tmp_path):
    with pytest.raises(RuntimeError, match="boom in training_step"):
        _trainer(tmp_path, every=0).fit(_Tiny(fail_in_step=5))
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 5 and int(saved["state_dict"]["updates"]) == 5
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["ready"] == progress["completed"] == 5  # the failed batch is redone on resume
    model = _Tiny()
    _trainer(tmp_path, every=0).fit(model, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert model.global_step == 16 and int(model.updates) == 16


def test_an_exception_after_the_optimizer_step_keeps_the_previous_last_ckpt(tmp_path):
    with pytest.raises(RuntimeError, match="after the optimizer step"):
        _trainer(tmp_path, every=3).fit(_Tiny(fail_after_step=5))
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3 and int(saved["state_dict"]["updates"]) == 3


def test_an_unwritable_checkpoint_folder_fails_before_training(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(ConfigError, match=f"checkpoint folder {tmp_path / 'checkpoints'}"):
        _trainer(tmp_path).fit(_Tiny())


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    state = rng.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint_file({"state_dict": {}, "rng": state}, tmp_path / "r.ckpt")
    torch.rand(5), np.random.rand(5), random.random()
    rng.set_rng_state(load_checkpoint(tmp_path / "r.ckpt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    target = tmp_path / "last.ckpt"
    save_checkpoint_file({"state_dict": {"w": torch.zeros(4)}}, target)
    before = target.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1000))  # ~1 kB free
    big = {"state_dict": {"w": torch.zeros(1_000_000)}}  # ~4 MB
    with pytest.raises(DataError, match=rf"No space left on {tmp_path} to save last.ckpt: need ~5 MB, 0 MB free"):
        save_checkpoint_file(big, target)
    free = iter([10 ** 12, 1000])  # room before the write, none after it failed as torch reports a full disk

    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 4096 vs 2048")

    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, next(free)))
    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(DataError, match="No space left on"):
        save_checkpoint_file(big, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
