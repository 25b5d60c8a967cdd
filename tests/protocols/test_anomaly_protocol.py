"""The evaluation protocol chooses on validation data only and reports the baseline beside the model."""

from __future__ import annotations

import csv
import json
import os
import stat

import pytest
import torch

from meddiff.anomaly.reconstruction import ReconstructionConfig
from meddiff.anomaly.scoring import ScoringConfig
from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError
from meddiff.protocols.anomaly import EvalOptions, evaluate_anomaly_detection, run


class HealthyIsBlack:
    """A 'model' whose healthy reconstruction is an all -1 image: the anomaly map is |x + 1|."""

    def __init__(self) -> None:
        self.scoring_cfg = ScoringConfig()
        self.recon_cfg = ReconstructionConfig(t_start=10)
        self.schedule = NoiseSchedule(num_train_timesteps=100)
        self.seen_t: list[int] = []

    def reconstruct(self, batch, recon=None):
        self.seen_t.append((recon or self.recon_cfg).t_start)
        return -torch.ones_like(batch["image"])


def _batches(kind: str, n: int = 40, seed: int = 0):
    """Anomalies are one bright pixel ("max" separates them) or a dim large area ("mean" separates them)."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 8, 8)
    label = torch.arange(n) % 2
    mask = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    for i in range(n):
        # healthy images: a medium blob of random size; it confuses whichever reduction the anomaly is not made for
        k = int(torch.randint(2, 5, (1,), generator=g))
        x[i, :, :k, :k] = -0.2
        if label[i]:
            if kind == "point":
                x[i, :, 7, 7] = 1.0
                mask[i, :, 7, 7] = True
            else:
                x[i, :, 4:, :] = -0.6
                mask[i, :, 4:, :] = True
    return [{"image": x[j:j + 10], "label": label[j:j + 10], "mask": mask[j:j + 10]} for j in range(0, n, 10)]


def test_settings_are_chosen_on_validation_not_test():
    model = HealthyIsBlack()
    opts = EvalOptions(median_size=[1], reduction=["mean", "max"], n_boot=50)
    report = evaluate_anomaly_detection(model, _batches("point"), _batches("area", seed=1), opts)
    assert report["selection"]["chosen_on"] == "validation"
    assert report["scoring"]["reduction"] == "max"  # best on validation ...
    # ... even though "mean" would have been better on this test set: the test split did not choose anything
    report_test_chosen = evaluate_anomaly_detection(model, _batches("area", seed=1), _batches("area", seed=1), opts)
    assert report_test_chosen["scoring"]["reduction"] == "mean"
    assert report["image"]["model"]["auroc"] < report_test_chosen["image"]["model"]["auroc"]


def test_report_has_baseline_cis_pixel_metrics_and_val_threshold():
    model = HealthyIsBlack()
    report = evaluate_anomaly_detection(model, _batches("point"), _batches("point", seed=2),
                                        EvalOptions(median_size=[1], reduction=["max"], n_boot=50))
    img = report["image"]
    assert set(img) == {"model", "baseline_mean_intensity"}
    assert img["model"]["auroc"] == pytest.approx(1.0)
    lo, hi = img["baseline_mean_intensity"]["auroc_ci"]
    assert lo <= img["baseline_mean_intensity"]["auroc"] <= hi
    pix = report["pixel"]["model"]
    assert pix["dice_at_val_threshold"] == pytest.approx(1.0, abs=1e-6)  # the point is the brightest pixel
    assert pix["val_threshold"] == report["selection"]["pixel_threshold"]
    assert "baseline_intensity" in report["pixel"]
    assert report["summary"]["image_auroc"] == img["model"]["auroc"]


def test_reconstruction_depth_is_chosen_on_validation():
    model = HealthyIsBlack()
    report = evaluate_anomaly_detection(model, _batches("point"), _batches("point", seed=3),
                                        EvalOptions(median_size=[1], reduction=["max"], n_boot=0, t_start=[5, 20, 40]))
    assert model.seen_t[:12] == [5] * 4 + [20] * 4 + [40] * 4  # one validation pass per depth
    chosen = report["selection"]["t_start"]
    assert chosen in (5, 20, 40)
    assert model.seen_t[12:] == [chosen] * 4  # the test pass reconstructs at the chosen depth
    assert report["reconstruction"]["t_start"] == chosen  # ... and the report says which
    assert len(report["selection"]["candidates"]) == 3
    assert model.recon_cfg.t_start == 10  # the protocol passed copies down; the model is unchanged
    with pytest.raises(Exception, match="t_start=500"):
        evaluate_anomaly_detection(model, _batches("point"), _batches("point"), EvalOptions(t_start=[500]))


class _Data:
    """A datamodule stand-in: validation finds point anomalies, test holds area anomalies; counts test access."""

    def __init__(self) -> None:
        self.test_calls = 0

    def val_dataloader(self):
        return _batches("point")

    def test_dataloader(self):
        self.test_calls += 1
        return _batches("area", seed=1)


def test_run_writes_the_report_files_and_touches_test_once(tmp_path):
    model, data = HealthyIsBlack(), _Data()
    cfg = {"median_size": [1], "reduction": ["mean", "max"], "n_boot": 20, "t_start": [5, 20]}
    report = run(model, data, cfg, tmp_path, "cpu")
    assert data.test_calls == 1
    assert report["scoring"]["reduction"] == "max"  # chosen on validation (point anomalies), not on test
    assert model.recon_cfg.t_start == 10 and report["reconstruction"]["t_start"] in (5, 20)
    assert json.loads((tmp_path / "report.json").read_text())["summary"] == report["summary"]
    rows = list(csv.reader((tmp_path / "metrics.csv").open()))
    assert rows[0] == ["metric", "value"] and {r[0] for r in rows[1:]} == set(report["summary"])
    for name in ("report.json", "metrics.csv", "roc.png", "anomaly_grid.png"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) & 0o044 == 0o044, name  # readable by all


def test_run_rejects_unknown_eval_options(tmp_path):
    with pytest.raises(ConfigError, match="Unknown eval option.*nboot"):
        run(HealthyIsBlack(), _Data(), {"nboot": 5}, tmp_path, "cpu")


def test_depths_need_a_model_with_a_reconstruction_config(tmp_path):
    model = HealthyIsBlack()
    del model.recon_cfg
    with pytest.raises(ConfigError, match="eval.t_start"):
        evaluate_anomaly_detection(model, _batches("point"), _batches("point"), EvalOptions(t_start=[5]))


def test_without_selection_the_configured_setting_is_used_and_recorded():
    model = HealthyIsBlack()
    report = evaluate_anomaly_detection(model, None, _batches("point"), EvalOptions(select_on_val=False, n_boot=0))
    assert report["selection"] == {"chosen_on": "config"}
    assert report["scoring"] == model.scoring_cfg.as_dict()
    assert report["reconstruction"]["t_start"] == 10 and model.seen_t == [10] * 4
