"""Label-free selection for the diffusion anomaly models: data.aucp_holdout + optimized_metric=val/aucp trains, logs
val/aucp beside val/auroc and keeps the checkpoint with the best val/aucp."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_mnist_checkpoint_selected_by_val_aucp(run, tmp_path, fast):
    run_dir = tmp_path / "run"
    run("meddiff.train", *fast, "data.aucp_holdout=16", "optimized_metric=val/aucp", "trainer.max_epochs=2",
        f"hydra.run.dir={run_dir}")
    with open(run_dir / "csv" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    aucp = [float(r["val/aucp"]) for r in rows if r.get("val/aucp")]
    assert len(aucp) == 2 and all(0.0 <= a <= 1.0 for a in aucp)  # one per validation epoch, a real number
    assert any(r.get("val/auroc") for r in rows) and any(r.get("val/loss") for r in rows)
    assert not any("dataloader_idx" in k for k in rows[0])  # the pools are one validation set: names unchanged

    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    states = [s for k, s in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    best = [s for s in states if s.get("monitor") == "val/aucp"]
    assert best, [s.get("monitor") for s in states]
    score = float(best[0]["best_model_score"])
    assert not math.isnan(score) and score == pytest.approx(max(aucp), abs=1e-6)
    assert Path(best[0]["best_model_path"]).is_file()

    # the evaluation that follows selects on the labelled val split only (the known-healthy pool is not a
    # validation set with labels) and never reads test during selection
    report = json.loads((run_dir / "report.json").read_text())
    assert report["selection"]["splits_read"] == ["train", "val"]
    assert report["image"]["model"]["n"] > 0


def test_val_aucp_under_ddp_on_two_cpu_processes(run, tmp_path, fast):
    """Each process scores its share of both pools; the AUCp states are gathered, so both log the same number."""
    run_dir = tmp_path / "ddp"
    run("meddiff.train", *fast, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.aucp_holdout=16",
        "optimized_metric=val/aucp", "evaluate=false", f"hydra.run.dir={run_dir}")
    with open(run_dir / "csv" / "metrics.csv", newline="") as fh:
        aucp = [float(r["val/aucp"]) for r in csv.DictReader(fh) if r.get("val/aucp")]
    assert len(aucp) == 1 and 0.0 <= aucp[0] <= 1.0
