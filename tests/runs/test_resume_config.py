"""Resume: the run's overrides replayed under the new ones, snapshots, the recorded diff, protected keys."""

from __future__ import annotations

import pytest
import yaml

from meddiff.errors import ConfigError
from meddiff.runs.resume import (
    check_resume_config,
    config_diff,
    latest_snapshot,
    merge_overrides,
    protected_changes,
    resume_argv,
    stored_config,
)


def test_merge_overrides_new_values_win_in_place():
    old = ["experiment=demo", "net=unet_tiny", "model.optimizer.lr=1e-3", "+extra.a=1"]
    new = ["model.optimizer.lr=5e-4", "data.batch_size=8", "extra.a=2"]
    assert merge_overrides(old, new) == ["experiment=demo", "net=unet_tiny", "model.optimizer.lr=5e-4",
                                         "++extra.a=2", "data.batch_size=8"]
    assert merge_overrides(["+extra.a=1", "x=1"], ["~extra.a"]) == ["x=1"]
    assert merge_overrides(["net=unet_tiny"], ["net=unet_small"]) == ["net=unet_small"]


def _run(tmp_path, overrides):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / "config_resolved.yaml").write_text(yaml.safe_dump({"net": {"channels": [8, 16]}, "seed": 1}))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run


def test_later_resumes_replay_the_latest_complete_snapshot(tmp_path):
    run = _run(tmp_path, ["experiment=demo", "trainer.max_epochs=1"])
    # resume-1 was accepted (config_resolved.yaml), resume-2 was refused (no config_resolved.yaml)
    for k, extra, complete in ((1, "trainer.max_epochs=2", True), (2, "net.channels=[8,32]", False)):
        snap = run / f"resume-{k}"
        snap.mkdir()
        (snap / "overrides.yaml").write_text(yaml.safe_dump(["experiment=demo", extra, f"resume={run}",
                                                             f"ckpt_path={run}/checkpoints/last.ckpt"]))
        if complete:
            (snap / "config_resolved.yaml").write_text(yaml.safe_dump({"seed": 2}))
    assert latest_snapshot(run)[0] == run / "resume-1"
    assert stored_config(run) == {"seed": 2}
    argv = resume_argv([f"resume={run}"])
    assert "trainer.max_epochs=2" in argv and "net.channels=[8,32]" not in argv  # refused changes never replayed
    assert argv.count(f"resume={run}") == 1 and "hydra.output_subdir=resume-3" in argv
    assert resume_argv([f"resume={run}"], rank=1)[-1] == "hydra.output_subdir=null"  # DDP workers write no snapshot


def test_resume_cannot_be_a_sweep_or_move_the_run(tmp_path):
    run = _run(tmp_path, ["experiment=demo"])
    with pytest.raises(ConfigError, match="multirun"):
        resume_argv(["-m", f"resume={run}"])
    with pytest.raises(ConfigError, match="drop hydra.run.dir"):
        resume_argv([f"resume={run}", f"hydra.run.dir={tmp_path}/elsewhere"])


def test_config_diff_and_protected_keys():
    stored = {"net": {"channels": [8, 16]}, "schedule": {"prediction_type": "sample"}, "trainer": {"max_epochs": 1},
              "resume": None, "model": {"_target_": "a.B", "loss": "l1"}}
    current = {"net": {"channels": [8, 32]}, "schedule": {"prediction_type": "epsilon"}, "trainer": {"max_epochs": 2},
               "resume": "/run", "model": {"_target_": "a.C", "loss": "l1"}}
    diff = config_diff(stored, current)
    assert set(diff) == {"net.channels", "schedule.prediction_type", "trainer.max_epochs", "model._target_"}
    assert diff["trainer.max_epochs"] == {"was": 1, "now": 2}
    assert set(protected_changes(diff)) == {"net.channels", "schedule.prediction_type", "model._target_"}


def test_check_resume_config_records_the_diff_and_refuses_shape_changes(tmp_path):
    stored = {"net": {"channels": [8, 16]}, "trainer": {"max_epochs": 1}}
    snap = tmp_path / "resume-1"
    diff = check_resume_config(stored, {"net": {"channels": [8, 16]}, "trainer": {"max_epochs": 3}}, tmp_path, snap,
                               force=False)
    assert diff == {"trainer.max_epochs": {"was": 1, "now": 3}}
    assert yaml.safe_load((snap / "resume_diff.yaml").read_text())["changes"] == diff
    with pytest.raises(ConfigError, match=r"net\.channels.*\+resume_force=true"):
        check_resume_config(stored, {"net": {"channels": [8, 32]}, "trainer": {"max_epochs": 1}}, tmp_path,
                            tmp_path / "resume-2", force=False)
    assert not (tmp_path / "resume-2").exists()
    check_resume_config(stored, {"net": {"channels": [8, 32]}, "trainer": {"max_epochs": 1}}, tmp_path,
                        tmp_path / "resume-2", force=True)
    assert yaml.safe_load((tmp_path / "resume-2" / "resume_diff.yaml").read_text())["forced"] is True


# ------------------------------------------------------------------------- the run's own values, not today's YAMLs
def test_values_changed_in_the_yamls_since_the_run_are_put_back_unless_given_on_the_command_line():
    from omegaconf import OmegaConf

    from meddiff.runs.resume import command_line_keys, restore_stored_values

    # today's YAMLs: loss l2 (was l1), net.channels [8, 32] (was [8, 16]); model.net interpolates net
    cfg = OmegaConf.create({"net": {"channels": [8, 32]}, "model": {"loss": "l2", "net": "${net}",
                                                                    "optimizer": {"lr": 1e-5}, "new_option": 3},
                            "data": {"root": "/new/place"}, "trainer": {"max_epochs": 2}})
    stored = {"net": {"channels": [8, 16]}, "model": {"loss": "l1", "net": {"channels": [8, 16]},
                                                      "optimizer": {"lr": 1e-3}},
              "data": {"root": "/old/place"}, "trainer": {"max_epochs": 1}}
    old = ["experiment=demo", "trainer.max_epochs=1"]
    merged = ["experiment=demo", "trainer.max_epochs=2", "model.optimizer.lr=1e-5", "resume=/r", "ckpt_path=/r/x"]
    given = command_line_keys(old, merged)
    assert given == ["trainer.max_epochs", "model.optimizer.lr", "resume", "ckpt_path"]
    restored = restore_stored_values(cfg, stored, given)
    assert cfg.model.loss == "l1" and list(cfg.net.channels) == [8, 16] and list(cfg.model.net.channels) == [8, 16]
    assert cfg.model.net == {"channels": [8, 16]} and OmegaConf.is_interpolation(cfg.model, "net")
    assert cfg.model.optimizer.lr == 1e-5            # given on the command line: the new value
    assert cfg.trainer.max_epochs == 2 and cfg.data.root == "/new/place"  # devices/paths follow this machine
    assert cfg.model.new_option == 3                 # an option added since (absent in the run): kept
    assert restored == {"net.channels": {"yaml": [8, 32], "kept": [8, 16]},
                        "model.loss": {"yaml": "l2", "kept": "l1"}}
    # a net change given on the command line (a forced resume): model.net keeps following it
    cfg = OmegaConf.create({"net": {"channels": [8, 32], "depth": 2}, "model": {"net": "${net}"}})
    stored = {"net": {"channels": [8, 16], "depth": 2}, "model": {"net": {"channels": [8, 16], "depth": 2}}}
    assert restore_stored_values(cfg, stored, ["net.channels"]) == {}
    assert OmegaConf.is_interpolation(cfg.model, "net") and cfg.model.net.channels == [8, 32]
