"""End to end: train -> checkpoint -> evaluate, resume, multirun, DDP, mixed precision, loggers."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_fast_dev_run(run, tmp_path, fast):
    proc = run("meddiff.train", *fast, "debug=fast_dev_run", f"paths.log_dir={tmp_path}/logs")
    # the composed config printed at start as a tree (print_config, on by default)
    assert "(top level)" in proc.stdout and "max_steps: 1650" in proc.stdout and "overfit_batches" in proc.stdout


def test_debug_overfit_drives_the_loss_of_its_batch_near_zero(run, tmp_path, fast):
    """debug=overfit draws the same t, noise and patch every step (model.fixed_noise_seed), so a working net / loss /
    optimizer fits the one batch: unet_tiny on 4 demo digits, 300 steps, 0.91 -> ~0.02 (with overfit_noise_seed=null
    the loss stays at its floor, ~0.23). Anomaly detection (on in debug presets) is off to keep this test short."""
    run_dir = tmp_path / "overfit"
    fast = [a for a in fast if not a.startswith(("trainer.max_epochs", "trainer.check_val"))]  # the preset's budget
    run("meddiff.train", *fast, "data.batch_size=4", "debug=overfit", "trainer.detect_anomaly=false", "callbacks=none",
        "print_config=false", f"hydra.run.dir={run_dir}")
    import csv

    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("train/loss_epoch")]
    losses = [float(r["train/loss_epoch"]) for r in rows]  # one batch per epoch: the loss of each step
    assert len(losses) == 300
    assert losses[-1] < 0.05 and losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_train_writes_report_figures_and_a_self_describing_checkpoint(run, tmp_path, fast):
    run_dir = tmp_path / "run"
    run("meddiff.train", *fast, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}")
    for name in ("report.json", "metrics.csv", "roc.png", "anomaly_grid.png", "config_resolved.yaml",
                 "checkpoints/last.ckpt", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["selection"]["chosen_on"] == "validation"
    assert report["checkpoint_rule"].startswith("best val/auroc")  # the checkpoint optimized_metric selected
    assert {"model", "baseline_mean_intensity"} <= set(report["image"])
    lo, hi = report["image"]["model"]["auroc_ci"]
    assert lo <= report["image"]["model"]["auroc"] <= hi
    assert "dice_at_val_threshold" in report["pixel"]["model"]
    # plain containers only: every checkpoint loads weights-only, without any allow-listed class
    assert torch.serialization.get_unsafe_globals_in_checkpoint(run_dir / "checkpoints/last.ckpt") == []
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["meddiff_config"]["net"]["channels"] == [8, 16]
    assert any(k.startswith("ema.shadow.") for k in ckpt["state_dict"])

    # meddiff.eval needs nothing but the checkpoint; the same weights and protocol give the same numbers. It
    # writes beside the training run, <run_dir>/evals/<name>/, where meddiff-compare finds it
    best = report["checkpoint"]
    run("meddiff.eval", f"ckpt_path={best}", "eval_name=again")
    again = json.loads((run_dir / "evals" / "again" / "report.json").read_text())
    assert again["image"]["model"]["auroc"] == pytest.approx(report["image"]["model"]["auroc"], abs=1e-6)
    assert not (tmp_path / "logs").exists()
    from meddiff.runs.sweep.run_summary import read_run

    (run_dir / "report.json").unlink()  # as after evaluate=false: the evaluation's numbers are the run's
    rec = read_run(run_dir)
    assert rec.report == "evals/again/report.json"
    assert rec.test["image_auroc"] == pytest.approx(report["summary"]["image_auroc"], abs=1e-6)
    proc = run("meddiff.compare", str(run_dir))
    assert "evals/again" in proc.stdout


def test_an_eval_preset_of_another_protocol_is_a_clear_error_naming_both(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "demo_tiny_v0.1.ckpt"  # an anomaly model
    proc = subprocess.run([sys.executable, "-m", "meddiff.eval", f"ckpt_path={fixture}", "eval=denoise",
                           f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    out = proc.stderr.strip().splitlines()
    assert out[-1].startswith("meddiff-eval: eval=denoise") and "'anomaly' protocol" in out[-1]
    assert "Use eval=default" in out[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "eval").exists()


def test_resume_continues_the_same_run(run, tmp_path, fast):
    run_dir = tmp_path / "run"
    run("meddiff.train", *fast, "evaluate=false", f"hydra.run.dir={run_dir}")
    first = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    run("meddiff.train", *fast, "evaluate=false", "trainer.max_epochs=2", f"resume={run_dir}")
    second = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert second["global_step"] == 2 * first["global_step"]
    assert second["epoch"] > first["epoch"]
    # optimizer and EMA state were restored, not restarted
    assert int(second["state_dict"]["ema.num_updates"]) == second["global_step"]
    assert second["optimizer_states"][0]["state"][0]["step"] == second["global_step"]
    assert not (tmp_path / "logs").exists()  # no new run dir was made
    # The demo config sets max_steps (iteration-based training): Lightning used to re-enter the finished epoch on
    # resume and stop at once. The resumed run must equal an uninterrupted 2-epoch run: weights, loop state, CSV.
    full_dir = tmp_path / "full"
    run("meddiff.train", *fast, "evaluate=false", "trainer.max_epochs=2", f"hydra.run.dir={full_dir}")
    full = torch.load(full_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    for k, v in full["state_dict"].items():
        assert torch.equal(second["state_dict"][k], v), k
    assert second["loops"]["fit_loop"] == full["loops"]["fit_loop"]
    assert (run_dir / "csv/metrics.csv").read_text() == (full_dir / "csv/metrics.csv").read_text()


def test_multirun_sweep(run, tmp_path, fast):
    run("meddiff.train", "-m", *fast, "evaluate=false", "model.optimizer.lr=1e-4,3e-4",
        f"hydra.sweep.dir={tmp_path}/sweep")
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = [torch.load(j / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["meddiff_config"]["model"]
           ["optimizer"]["lr"] for j in jobs]
    assert lrs == [1e-4, 3e-4]


def test_ddp_two_cpu_processes(run, tmp_path, fast):
    run_dir = tmp_path / "ddp"
    proc = run("meddiff.train", *fast, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
               "evaluate=false", f"hydra.run.dir={run_dir}")
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    # 64 training images, batch 32: 2 steps on one process, 1 step per process with 2 processes
    assert ckpt["global_step"] == 1
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr or "gloo" in (proc.stdout + proc.stderr)


def test_bf16_mixed_precision_on_cpu(run, tmp_path, fast):
    run_dir = tmp_path / "bf16"
    run("meddiff.train", *fast, "trainer.precision=bf16-mixed", f"hydra.run.dir={run_dir}")
    report = json.loads((run_dir / "report.json").read_text())
    assert 0.0 <= report["image"]["model"]["auroc"] <= 1.0
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    # mixed precision keeps float32 master weights (a bf16-true run would store bf16)
    assert {v.dtype for k, v in ckpt["state_dict"].items() if k.startswith("net.")} == {torch.float32}
    assert "precision: bf16-mixed" in (run_dir / "config_resolved.yaml").read_text()


def test_wandb_offline_and_tensorboard_loggers(run, tmp_path, fast):
    run_dir = tmp_path / "logged"
    run("meddiff.train", *fast, "logger=many", "evaluate=false", f"hydra.run.dir={run_dir}",
        env={"WANDB_API_KEY": ""})
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "wandb_id.txt").read_text().strip()


def test_optuna_sweep_maximises_validation_auroc(run, tmp_path, fast):
    sweep = tmp_path / "optuna"
    run("meddiff.train", *fast, "hparams_search=mnist_optuna", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}")
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "model.optimizer.lr" in results
    assert "best_value" in results
