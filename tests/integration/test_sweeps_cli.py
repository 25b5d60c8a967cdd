"""Sweeps end to end: the summary of a multirun with a failing job, wandb names/groups read back from the offline
run files, meddiff-compare --diff, a killed Optuna sweep that resumes, --help and the debug presets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of a run's offline wandb transaction log (``wandb leet inspect --json``)."""
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    exe = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(exe), "leet", "inspect", "--json", str(offline)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_multirun_summary_failed_job_wandb_identity_and_diff(run, tmp_path, fast):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "meddiff.train", "-m", *fast, "logger=wandb",
                           "model.sampling.t_start=300,400,bad", f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                          env={**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                               "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "WANDB_API_KEY": ""},
                          capture_output=True, text=True, timeout=900)
    # a sweep with a failed job fails loudly: non-zero exit, and the last words name the failures and the summary
    assert proc.returncode != 0, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "1 of 3 sweep jobs did not finish ok" in last and str(sweep.resolve() / "summary.md") in last

    # the summary: one row per job, the swept column, the failed job as failed with its error's first line
    df = pd.read_csv(sweep / "summary.csv", dtype={"model.sampling.t_start": str})
    assert len(df) == 3
    assert "model.sampling.t_start" in df.columns
    assert sorted(df["model.sampling.t_start"]) == ["300", "400", "bad"]
    bad = df[df["model.sampling.t_start"] == "bad"].iloc[0]
    assert bad["status"] == "failed" and bad["error"].startswith("ConfigError: model.sampling.t_start='bad' must be an integer")
    ok = df[df["status"] == "ok"]
    assert len(ok) == 2 and df["status"].iloc[-1] == "failed"  # sorted: scored jobs first
    assert list(ok["best val/auroc"]) == sorted(ok["best val/auroc"], reverse=True)
    assert ok["test/image_auroc_ci_lo"].notna().all() and ok["checkpoint"].str.endswith(".ckpt").all()
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()
    # the protocol's headline, not the first test metrics: best baseline by name, margin with its CI, verdict
    assert ok["test/margin_image_auroc_ci_lo"].notna().all() and ok["best_baseline"].notna().all()
    assert set(ok["verdict"]) <= {"beats", "does NOT beat", "WORSE"}
    md = (sweep / "summary.md").read_text()
    assert "test/margin_image_auroc" in md and "| test/baseline_image_auroc |" not in md
    assert json.loads((sweep / "2" / "status.json").read_text())["state"] == "failed"

    # wandb: name <experiment>/<swept overrides>, group <experiment>/<sweep id>, job_type, tags, config once
    for job, t_start in (("0", "300"), ("1", "400")):
        records = wandb_records(sweep / job)
        (run_rec,) = [r["run"] for r in records if r.get("type") == "run"]
        assert run_rec["display_name"] == f"demo/t_start={t_start}"
        assert run_rec["run_group"] == "demo/sweep"
        assert run_rec["job_type"] == "train"
        assert "model.sampling.t_start" in run_rec["tags"] and "demo" in run_rec["tags"]
        assert run_rec["run_id"] == (sweep / job / "wandb_id.txt").read_text().strip()
        configs = [r["config"]["update"] for r in records if r.get("type") == "config"]
        keys = [k for c in configs for k in c if not k.startswith("_")]
        assert len(keys) == len(set(keys)), "config keys logged twice"
        assert "data" in keys and "batch_size" not in keys and "paths" not in keys
        history_keys = {k for r in records if r.get("type") == "history" for k in _history_keys(r)}
        assert any(k.startswith("figures/roc") for k in history_keys)  # evaluation logs into the same run

    # compare --diff: exactly the key that differs between two jobs
    proc = run("meddiff.compare", str(sweep / "0"), str(sweep / "1"), "--diff")
    assert "1 config keys differ" in proc.stdout and "model.sampling.t_start" in proc.stdout
    assert "test/margin_image_auroc" in proc.stdout and "best val/auroc (run i - run 0)" in proc.stdout
    from meddiff.runs.sweep.table import config_diff

    assert list(config_diff([sweep / "0", sweep / "1"])) == ["model.sampling.t_start"]
    # compare prints the same table and writes it
    proc = run("meddiff.compare", str(sweep), "--out", str(tmp_path / "t.csv"))
    assert len(pd.read_csv(tmp_path / "t.csv")) == 3 and "failed" in proc.stdout


def _history_keys(record: dict) -> list[str]:
    item = record.get("history", {}).get("item", [])
    if isinstance(item, dict):
        return list(item)
    return [i.get("key") or "/".join(i.get("nested_key", [])) for i in item]


def _optuna_args(fast, sweep, n_trials):
    return ["-m", "meddiff.train", *fast, "hparams_search=anomaly_optuna", f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}"]


def test_killed_optuna_sweep_resumes_its_study(tmp_path, fast):
    from meddiff.runs.sweep.optuna_storage import load_trials

    sweep = tmp_path / "opt"
    env = {**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, *_optuna_args(fast, sweep, 3)]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not (sweep / "1" / "status.json").is_file():  # trial 0 done, trial 1 started: kill the sweep now
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    _, before = load_trials(sweep / "optuna.db")
    first_job = json.loads((sweep / "0" / "status.json").read_text())
    assert [t.number for t in before] == [0, 1] and first_job["optuna_trial"] == 0

    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    _, after = load_trials(sweep / "optuna.db")
    numbers = [t.number for t in after]
    assert len(after) > len(before) and len(numbers) == len(set(numbers)) and numbers[:2] == [0, 1]
    states = {t.number: t.state.name for t in after}
    assert states[1] == "FAIL"  # the killed trial
    assert sum(s == "COMPLETE" for s in states.values()) == 3  # the budget counts completed trials
    # new jobs did not overwrite old job dirs: job dir name == trial number
    assert json.loads((sweep / "0" / "status.json").read_text())["started_at"] == first_job["started_at"]
    for t in after:
        if t.state.name == "COMPLETE":
            assert t.user_attrs["job_dir"] == str(sweep / str(t.number))
            assert json.loads((sweep / str(t.number) / "status.json").read_text())["optuna_trial"] == t.number
    # the reseeded sampler does not replay the first trial's values
    assert after[2].params != after[0].params

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max((t for t in after if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert results["best_trial"] == best.number and results["best_job_dir"] == str(sweep / str(best.number))
    assert Path(results["best_checkpoint"]).is_file() and "best_params" in results
    status = json.loads((sweep / str(best.number) / "status.json").read_text())
    assert results["best_value"] == pytest.approx(status["best_score"])  # objective = kept checkpoint's score
    df = pd.read_csv(sweep / "summary.csv")
    assert len(df) == len(after) and set(df["trial"]) == set(numbers)
    assert df.set_index("trial").loc[1, "status"] == "killed"


def test_help_lists_experiments_overrides_and_examples(run):
    out = run("meddiff.train", "--help").stdout
    for name in ("demo ", "demo_denoise ", "adni_cfg ", "rsna_pddpm "):
        assert f"  {name}" in out
    assert "== Common overrides ==" in out and "== Examples ==" in out and "debug: default, fast_dev_run" in out
