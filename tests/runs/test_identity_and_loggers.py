"""Run names / groups / tags, the Optuna SQLite storage, wandb ids, artifacts and hparams logging, --help text."""

from __future__ import annotations

from pathlib import Path

import pytest

from meddiff.runs.identity import format_overrides, short_keys, short_value, swept_keys


def test_short_keys_are_the_shortest_unique_suffix():
    keys = ["model.optimizer.lr", "model.recon.t_start", "model.disc.lr", "seed"]
    assert short_keys(keys) == {"model.optimizer.lr": "optimizer.lr", "model.recon.t_start": "t_start",
                                "model.disc.lr": "disc.lr", "seed": "seed"}


@pytest.mark.parametrize("text,short", [("0.0003", "3e-4"), ("3e-4", "3e-4"), ("0.0012345678", "0.00123"),
                                        ("400", "400"), ("l1", "l1"), ("[0,1]", "[0,1]"), ("0.5", "0.5"),
                                        ("1e-05", "1e-5")])
def test_short_value(text, short):
    assert short_value(text) == short


def test_run_name_from_overrides():
    assert format_overrides({"model.optimizer.lr": "0.0003", "model.recon.t_start": "400"}) == "lr=3e-4,t_start=400"


def test_swept_keys_from_command_line_and_sweeper_params():
    keys = swept_keys(["experiment=demo", "model.optimizer.lr=1e-4,3e-4", "seed=1"],
                      {"model.recon.t_start": "choice(250, 400)", "model.optimizer.lr": "interval(1e-4, 1e-3)",
                       "model.loss": "l1"})
    assert keys == ["model.optimizer.lr", "model.recon.t_start"]


def test_sqlite_storage_persists_a_study_across_openings(tmp_path):
    import optuna

    from meddiff.runs.sweep.optuna_storage import count_trials, load_trials, record_job_dir, sqlite_storage

    db = tmp_path / "sub" / "optuna.db"
    for _ in range(2):  # the second opening must find the first one's trials (a resumed sweep)
        study = optuna.create_study(study_name="s", storage=sqlite_storage(db), direction="maximize",
                                    load_if_exists=True)
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        assert record_job_dir(db, "s", trial.number, f"/jobs/{trial.number}", params={"x": str(x)})
        study.tell(trial, x)
    name, trials = load_trials(db)
    assert name == "s" and [t.number for t in trials] == [0, 1]
    assert [t.user_attrs["job_dir"] for t in trials] == ["/jobs/0", "/jobs/1"]
    assert count_trials(db, "s") == 2 and count_trials(tmp_path / "none.db", "s") == 0
    # a finished trial cannot take a job dir, and a mismatch of values is refused
    assert not record_job_dir(db, "s", 0, "/elsewhere")


def test_wandb_id_file_never_holds_none(tmp_path):
    from omegaconf import OmegaConf

    from meddiff.runs.loggers import WANDB_ID_FILE, _stored_wandb_id, instantiate_loggers

    (tmp_path / WANDB_ID_FILE).write_text("None")  # what older runs wrote
    assert _stored_wandb_id(tmp_path / WANDB_ID_FILE) is None
    cfg = OmegaConf.create({"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "save_dir": str(tmp_path),
                                      "project": "t", "name": None, "group": None, "tags": None, "job_type": "train",
                                      "offline": True, "id": None}})

    class Ident:
        name, group, tags = "demo/lr=3e-4", "demo/sweep1", ["demo", "model.optimizer.lr"]

    (lg,) = instantiate_loggers(cfg, tmp_path, Ident())
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert run_id not in ("", "None") and lg.version == run_id  # known before the run starts
    assert lg._wandb_init["name"] == "demo/lr=3e-4" and lg._wandb_init["group"] == "demo/sweep1"
    assert lg._wandb_init["job_type"] == "train" and "model.optimizer.lr" in lg._wandb_init["tags"]
    (lg2,) = instantiate_loggers(cfg, tmp_path, Ident())  # a resume reuses the stored id
    assert lg2.version == run_id and lg2._wandb_init.get("resume") == "allow"


class _FakeArtifact:
    def __init__(self, name, type, metadata=None):
        self.name, self.type, self.files = name, type, []

    def add_file(self, path, name=None):
        self.files.append(name)


class _FakeRun:
    def __init__(self, offline):
        self.offline, self.id, self.logged = offline, "abc123", []

    def log_artifact(self, art, aliases=None):
        self.logged.append((art.name, art.files, aliases))


class WandbLogger:  # the class name is what meddiff.runs.log_outputs.kind() looks at
    def __init__(self, offline):
        self.experiment = _FakeRun(offline)


def test_checkpoints_become_artifacts_online_and_offline(tmp_path, monkeypatch):
    import wandb

    from meddiff.runs.log_outputs import log_checkpoints

    monkeypatch.setattr(wandb, "Artifact", _FakeArtifact)
    (tmp_path / "best.ckpt").write_bytes(b"b")
    (tmp_path / "last.ckpt").write_bytes(b"l")
    sel = {"monitor": "val/auroc", "best_score": 0.9, "best_checkpoint": str(tmp_path / "best.ckpt"),
           "last_checkpoint": str(tmp_path / "last.ckpt")}
    online = WandbLogger(offline=False)
    assert log_checkpoints([online], sel) == 2
    assert online.experiment.logged == [("model-abc123", ["best.ckpt"], ["best"]),
                                        ("model-abc123", ["last.ckpt"], ["last", "latest"])]
    offline = WandbLogger(offline=True)  # kept in the offline run files; `wandb sync` uploads them
    assert log_checkpoints([offline], sel) == 2
    assert offline.experiment.logged == online.experiment.logged
    # best == last: one artifact version with both aliases
    same = WandbLogger(offline=False)
    log_checkpoints([same], {**sel, "best_checkpoint": sel["last_checkpoint"]})
    assert same.experiment.logged == [("model-abc123", ["last.ckpt"], ["best", "last", "latest"])]


def test_run_config_is_logged_once_and_clean(tmp_path):
    from omegaconf import OmegaConf

    from meddiff.runs.log_outputs import log_run_config

    class CSVLogger:
        def __init__(self):
            self.logged = []

        def log_hyperparams(self, params):
            self.logged.append(params)

    class Module:
        _log_hyperparams = True

    cfg = OmegaConf.create({"data": {"batch_size": 32}, "model": {"lr": 1.0}, "paths": {"x": 1},
                            "logger": {"csv": {}}, "callbacks": {}, "seed": 1})
    lg, model, dm = CSVLogger(), Module(), Module()
    log_run_config([lg], cfg, model, dm)
    assert lg.logged == [{"data": {"batch_size": 32}, "model": {"lr": 1.0}, "seed": 1}]
    assert model._log_hyperparams is False and dm._log_hyperparams is False  # no second, flat copy by Lightning


def test_help_lists_every_experiment_with_its_first_comment_line():
    from meddiff.runs.cli_help import CONFIG_DIR, help_text

    text = help_text("train")
    for f in sorted(Path(CONFIG_DIR, "experiment").glob("*.yaml")):
        line = next(x for x in text.splitlines() if x.strip().startswith(f.stem + " "))
        assert len(line.split(maxsplit=1)) == 2, line  # a description follows the name
    assert "debug=fast_dev_run|limit|overfit|profiler" in text and "$APP_CONFIG_GROUPS" in text


def test_standalone_eval_logs_a_wandb_eval_run_in_the_training_group(tmp_path, monkeypatch):
    import json

    import torch
    import wandb

    from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY
    from meddiff.runs.loggers import eval_run_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "sweep" / "3"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, CKPT_CONFIG_KEY: {"model": {"optimizer": {"lr": 3e-4}}, "seed": 1}},
               run / "checkpoints" / "last.ckpt")
    (run / "status.json").write_text(json.dumps({"state": "ok", "name": "demo/lr=3e-4", "group": "demo/sweep"}))
    (run / "config_resolved.yaml").write_text("tags: [demo]\nlogger:\n  wandb:\n    project: p\n    offline: true\n")
    # training without wandb: no wandb run for its evaluation either
    assert eval_run_loggers(run / "checkpoints" / "last.ckpt", tmp_path / "eval") == []
    (run / "wandb_id.txt").write_text("abc123\n")
    # wandb_run.json (the first launch's name and group) wins over status.json
    (run / "wandb_run.json").write_text(json.dumps({"id": "abc123", "name": "demo/first", "group": "demo/g0",
                                                    "tags": ["demo", "resume"]}))
    (lg,) = eval_run_loggers(run / "checkpoints" / "last.ckpt", tmp_path / "evals" / "mine")
    wandb.finish()
    init = lg._wandb_init
    assert (init["name"], init["group"], init["job_type"], init["project"]) == ("demo/first/eval/mine", "demo/g0",
                                                                                "eval", "p")
    assert init["tags"] == ["demo", "eval"] and init["config"]["train_wandb_id"] == "abc123"
    assert init["config"]["model"] == {"optimizer": {"lr": 3e-4}} and init["config"]["eval_name"] == "mine"
    assert eval_run_loggers(tmp_path / "loose.ckpt", tmp_path / "eval") == []


def test_the_last_artifact_is_uploaded_from_a_real_runs_selection(tmp_path, monkeypatch):
    """Not a hand-made dict: the selection summary of a real fit names LastCheckpoint's last.ckpt (issue 20)."""
    import lightning as L
    import torch
    import wandb
    from torch.utils.data import DataLoader, TensorDataset

    from meddiff.callbacks import LastCheckpoint
    from meddiff.runs.checkpoint_io import AtomicCheckpointIO
    from meddiff.runs.job import selection_summary
    from meddiff.runs.log_outputs import log_checkpoints

    class _M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)

    monkeypatch.setattr(wandb, "Artifact", _FakeArtifact)
    trainer = L.Trainer(max_epochs=1, callbacks=[LastCheckpoint(tmp_path / "checkpoints")], logger=False,
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(_M())
    online = WandbLogger(offline=False)
    assert log_checkpoints([online], selection_summary(trainer, "val/auroc")) == 1
    assert online.experiment.logged == [("model-abc123", ["last.ckpt"], ["last", "latest"])]
