"""The leaderboard builder on crafted job dirs: methods and trivial baselines as rows, per task, with CIs, margins,
verdicts, pixel metrics where masks exist and the UNet cost; jobs without a report are left off."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from meddiff.benchmark.leaderboard import build_leaderboards, unet_evals_per_image


def _entry(auroc: float, auprc: float = 0.5, resampled: str = "items") -> dict:
    return {"auroc": auroc, "auprc": auprc, "auroc_ci": [auroc - 0.05, auroc + 0.05],
            "auprc_ci": [auprc - 0.1, auprc + 0.1], "resampled": resampled}


def _job(sweep: Path, num: int, task: str, method: str, model_auroc: float, margin_ci: tuple[float, float],
         pixel: bool = True, recon: dict | None = None, target: str = "meddiff.models.UnconditionalDiffusion",
         image_size: int = 28, nearest: float = 0.9) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    cfg = {"bench": {"task": task, "method": method}, "experiment_name": f"bench_{task}_{method}",
           "model": {"_target_": target}, "data": {"_target_": "x.MNISTSplotchDataModule", "image_size": image_size}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = {
        "n_test": 200,
        "image": {"model": _entry(model_auroc, 0.7), "baseline_mean_intensity": _entry(0.6),
                  "baseline_nearest_healthy_image": _entry(nearest, 0.8)},
        "margin_over_best_baseline": {"baseline": "baseline_nearest_healthy_image", "auroc_diff": model_auroc - nearest,
                                      "auroc_diff_ci": list(margin_ci), "baseline_chosen_on": "validation",
                                      "verdict": "crafted"},
        "summary": {"image_auroc": model_auroc},
    }
    if pixel:
        report["pixel"] = {"model": {"auprc": 0.4, "dice_at_val_threshold": 0.3},
                           "baseline_intensity": {"auprc": 0.85, "dice_at_val_threshold": 0.6},
                           "baseline_nearest_healthy_image": {"auprc": 0.2, "dice_at_val_threshold": 0.1}}
    if recon is not None:
        report["reconstruction"] = recon
    (job / "report.json").write_text(json.dumps(report))
    (job / "status.json").write_text(json.dumps({"state": "ok", "wall_time_s": 120.0}))


def test_leaderboards_per_task_with_baselines_as_rows(tmp_path: Path) -> None:
    pddpm = {"sampler": "one_step", "t_start": 250, "draws": 8, "patch_size": 14, "stride": 7, "steps": 10}
    _job(tmp_path, 0, "mnist", "pddpm", 0.97, (0.01, 0.04), recon=pddpm)
    _job(tmp_path, 1, "mnist", "dae", 0.95, (-0.02, 0.12), target="meddiff.models.dae.DenoisingAutoencoder")
    _job(tmp_path, 2, "ct", "cddpm", 0.70, (-0.3, -0.1), pixel=False, image_size=64,
         recon={"sampler": "ddim", "steps": 5, "draws": 2, "patch_size": None, "stride": None})
    (tmp_path / "3").mkdir()  # a failed job: no report.json
    boards = build_leaderboards(tmp_path, command="make benchmark")
    assert set(boards) == {"mnist", "ct"}

    mnist = boards["mnist"]
    assert [r["row"] for r in mnist] == ["pddpm", "dae", "nearest healthy image", "mean intensity"]  # best first
    kinds = {r["row"]: r["kind"] for r in mnist}
    assert kinds["mean intensity"] == kinds["nearest healthy image"] == "trivial baseline"
    by = {r["row"]: r for r in mnist}
    assert by["pddpm"]["unet_evals_per_image"] == 8 * 9  # 8 draws x 3x3 patches of 14 px at stride 7 on 28 px
    assert by["dae"]["unet_evals_per_image"] == 1
    assert by["pddpm"]["image_auroc_ci_lo"] == pytest.approx(0.92)
    assert by["mean intensity"]["pixel_auprc"] == 0.85  # the pixel-level mean-intensity key is mapped
    assert by["pddpm"]["job_minutes"] == pytest.approx(2.0)
    assert next(r for r in boards["ct"] if r["row"] == "cddpm")["unet_evals_per_image"] == 10  # 2 draws x 5 DDIM steps, whole image

    md = (tmp_path / "leaderboard_mnist.md").read_text()
    assert "*mean intensity* (trivial)" in md and "*nearest healthy image* (trivial)" in md
    assert "0.970 [0.920, 1.020]" in md
    assert "+0.070 [+0.010, +0.040]" in md and "beats (nearest healthy image, chosen on validation)" in md
    assert "does not beat" in md and "Beats the best trivial baseline (paired CI above 0): pddpm." in md
    assert "Pixel AUPRC above the mean-intensity map's (0.850): none." in md
    assert "Made by: `make benchmark`" in md
    ct = (tmp_path / "leaderboard_ct.md").read_text()
    assert "WORSE" in ct and "pixel AUPRC" not in ct  # no masks on that task: no pixel columns
    assert "No method beats" in ct
    rows = list(csv.DictReader((tmp_path / "leaderboard_mnist.csv").open()))
    assert [r["row"] for r in rows] == [r["row"] for r in mnist] and rows[0]["verdict"] == "crafted"
    assert (tmp_path / "leaderboard_mnist.png").stat().st_size > 0
    assert "## ct" in (tmp_path / "leaderboard.md").read_text()


def test_baselines_that_differ_across_jobs_are_flagged(tmp_path: Path) -> None:
    _job(tmp_path, 0, "mnist", "a", 0.9, (0.0, 0.1), nearest=0.8)
    _job(tmp_path, 1, "mnist", "b", 0.9, (0.0, 0.1), nearest=0.85)
    rows = build_leaderboards(tmp_path, png=False)["mnist"]
    nearest = next(r for r in rows if r["row"] == "nearest healthy image")
    assert nearest["image_auroc"] == 0.8 and "differs across jobs" in nearest["note"]


def test_unet_evals_unknown_without_reconstruction_settings() -> None:
    assert unet_evals_per_image({}, {"model": {"_target_": "meddiff.models.guided.GuidedDiffusion"}}) is None


def test_seconds_per_image_and_generalisation_columns(tmp_path: Path) -> None:
    _job(tmp_path, 0, "mnist", "pddpm", 0.97, (0.01, 0.04))
    _job(tmp_path, 1, "mnist", "dae", 0.95, (-0.02, 0.12))
    report = json.loads((tmp_path / "0" / "report.json").read_text())
    report["cost"] = {"seconds_per_image": 0.0321, "model_seconds_per_image": 0.03, "n_images": 200}
    report["generalisation"] = {"kinds": {"dark_holes": {}, "texture_patch": {}, "intensity_ramp": {}},
                                "mean_margin": 0.0123, "beats_kinds": 1, "n_kinds": 3}
    (tmp_path / "0" / "report.json").write_text(json.dumps(report))
    rows = {r["row"]: r for r in build_leaderboards(tmp_path, png=False)["mnist"]}
    assert rows["pddpm"]["s_per_image"] == 0.0321 and rows["pddpm"]["model_s_per_image"] == 0.03
    assert rows["pddpm"]["gen_mean_margin"] == 0.0123 and rows["pddpm"]["gen_beats_kinds"] == 1
    assert rows["dae"].get("gen_mean_margin") is None  # a report without the check
    md = (tmp_path / "leaderboard_mnist.md").read_text()
    assert "unseen kinds: mean margin (beats)" in md and "| +0.012 (beats 1/3) |" in md and "0.0321" in md
    assert "Unseen kinds: dark holes" in md
    csv_rows = {r["row"]: r for r in csv.DictReader((tmp_path / "leaderboard_mnist.csv").open())}
    assert csv_rows["pddpm"]["gen_beats_kinds"] == "1" and csv_rows["pddpm"]["s_per_image"] == "0.0321"


def test_per_kind_generalisation_table(tmp_path: Path) -> None:
    _job(tmp_path, 0, "mnist", "cddpm", 0.97, (0.01, 0.04))
    report = json.loads((tmp_path / "0" / "report.json").read_text())
    kind = {"image": {"model": {"auroc": 0.61}}, "margin_over_best_baseline": {
        "baseline": "baseline_nearest_healthy_image", "auroc_baseline": 0.8, "auroc_diff": -0.19,
        "auroc_diff_ci": [-0.3, -0.1]}}
    report["generalisation"] = {"kinds": {"dark_holes": kind}, "mean_margin": -0.19, "beats_kinds": 0, "n_kinds": 1}
    (tmp_path / "0" / "report.json").write_text(json.dumps(report))
    build_leaderboards(tmp_path, png=False)
    md = (tmp_path / "leaderboard_mnist.md").read_text()
    assert "| method | dark_holes |" in md
    assert "| cddpm | 0.610 vs 0.800 (nearest healthy image), -0.190 [-0.300, -0.100] |" in md
    assert "| -0.190 (beats 0/1) |" in md
