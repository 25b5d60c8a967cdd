"""The evaluation protocol chooses on validation data only and reports the baseline beside the model."""

from __future__ import annotations

import pytest
import torch

from meddiff.anomaly.evaluate import EvalOptions, evaluate_anomaly_detection
from meddiff.anomaly.reconstruction import ReconstructionConfig
from meddiff.anomaly.scoring import ScoringConfig
from meddiff.diffusion import NoiseSchedule


class HealthyIsBlack:
    """A 'model' whose healthy reconstruction is an all -1 image: the anomaly map is |x + 1|."""

    def __init__(self) -> None:
        self.scoring_cfg = ScoringConfig()
        self.recon_cfg = ReconstructionConfig(t_start=10)
        self.schedule = NoiseSchedule(num_train_timesteps=100)
        self.seen_t: list[int] = []

    def reconstruct(self, batch):
        self.seen_t.append(self.recon_cfg.t_start)
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
    assert report["selection"]["t_start"] in (5, 20, 40)
    assert len(report["selection"]["candidates"]) == 3
    with pytest.raises(Exception, match="t_start=500"):
        evaluate_anomaly_detection(model, _batches("point"), _batches("point"), EvalOptions(t_start=[500]))
