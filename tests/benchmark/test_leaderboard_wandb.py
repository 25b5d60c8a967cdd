"""The leaderboards land in an offline wandb run of the sweep's own as one ``wandb.Table`` per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meddiff.benchmark.leaderboard import COLUMNS
from meddiff.benchmark.wandb_table import log_leaderboards

wandb = pytest.importorskip("wandb")

ROWS = {"mnist_splotch": [
    {"task": "mnist_splotch", "row": "pddpm", "kind": "method", "image_auroc": 0.97, "margin_auroc": 0.01,
     "verdict": "does not beat", "s_per_image": 0.03, "gen_mean_margin": -0.02, "gen_beats_kinds": 0},
    {"task": "mnist_splotch", "row": "nearest healthy image", "kind": "trivial baseline", "image_auroc": 0.96,
     "unet_evals_per_image": 0},
]}


def test_each_task_is_a_table_in_the_offline_run_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert log_leaderboards(ROWS, tmp_path, project="meddiff-test", group="benchmark_uad")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].rglob("*.table.json"))
    assert len(tables) == 1 and "leaderboard" in str(tables[0]) and "mnist_splotch" in tables[0].name
    table = json.loads(tables[0].read_text())
    assert table["columns"] == COLUMNS
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["row"] for r in rows] == ["pddpm", "nearest healthy image"]
    assert rows[0]["image_auroc"] == 0.97 and rows[0]["gen_mean_margin"] == -0.02 and rows[1]["verdict"] is None
    assert (runs[0] / f"run-{runs[0].name.rsplit('-', 1)[-1]}.wandb").is_file()


def test_disabled_or_empty_is_skipped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not log_leaderboards(ROWS, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not log_leaderboards({}, tmp_path)
    assert not (tmp_path / "wandb").exists()


def test_the_sweep_callback_builds_the_boards_and_logs_them(tmp_path: Path, monkeypatch) -> None:
    from omegaconf import OmegaConf

    from meddiff.benchmark.callback import LeaderboardCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("bench: {task: mnist_splotch, method: dae}\n")
    entry = {"auroc": 0.9, "auprc": 0.8}
    (job / "report.json").write_text(json.dumps({"n_test": 10, "image": {"model": entry,
                                                                         "baseline_mean_intensity": entry}}))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "experiment_name": "benchmark_uad",
                            "logger": {"wandb": {"project": "meddiff-test"}}})
    LeaderboardCallback(png=False).on_multirun_end(cfg)
    assert (tmp_path / "leaderboard_mnist_splotch.md").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*/**/*.table.json"))
    LeaderboardCallback(png=False, wandb=False).on_multirun_end(cfg)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # switched off: no second run
