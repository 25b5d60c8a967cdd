"""Signed residual maps: the sign is a post-processing choice made on validation (``eval.sign``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from meddiff.anomaly import MAP_SIGNS, anomaly_map
from meddiff.anomaly.scoring import ScoringConfig
from meddiff.errors import ConfigError
from meddiff.protocols.anomaly import EvalOptions, evaluate_anomaly_detection


def test_signed_l1_is_the_clipped_residual():
    x = torch.tensor([[[[0.5, -0.5], [0.0, 1.0]]]])
    recon = torch.zeros_like(x)
    assert torch.equal(anomaly_map(x, recon, "l1", sign="abs"), (x - recon).abs())
    assert torch.equal(anomaly_map(x, recon, "l1", sign="positive"), (x - recon).clamp_min(0))
    assert torch.equal(anomaly_map(x, recon, "l1", sign="negative"), (recon - x).clamp_min(0))
    assert torch.equal(anomaly_map(x, recon, "l2", sign="positive"), (x - recon).clamp_min(0) ** 2)
    ssim_pos = anomaly_map(x.expand(1, 1, 2, 2).repeat(1, 1, 4, 4), torch.zeros(1, 1, 8, 8), "ssim", ssim_window=3,
                           sign="positive")
    assert (ssim_pos >= 0).all()
    assert set(MAP_SIGNS) == {"abs", "positive", "negative"}
    with pytest.raises(ConfigError, match="sign"):
        anomaly_map(x, recon, sign="up")


def test_default_sign_keeps_todays_map():
    assert ScoringConfig().sign == "abs" and list(EvalOptions().sign) == ["abs"]
    assert {c.sign for c in EvalOptions().candidates(ScoringConfig())} == {"abs"}


class Zero:
    """A 'model' whose healthy reconstruction is the mid-grey background 0."""

    def __init__(self) -> None:
        self.anomaly_val = SimpleNamespace(scoring=ScoringConfig())

    def reconstruct(self, batch):
        return torch.zeros_like(batch["image"])


def _batches(lesion: float, healthy_blob: float, n: int = 40, seed: int = 0):
    """Background 0; healthy images carry a blob of ``healthy_blob`` (confuses the other signs), anomalous ones a
    small lesion of intensity ``lesion`` (in the mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 8, 8)
    label = torch.arange(n) % 2
    mask = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    for i in range(n):
        k = int(torch.randint(2, 4, (1,), generator=g))
        if not label[i]:
            x[i, :, :k, :k] = healthy_blob
        else:
            x[i, :, 5:7, 5:7] = lesion
            mask[i, :, 5:7, 5:7] = True
    return [{"image": x[j:j + 10], "label": label[j:j + 10], "mask": mask[j:j + 10]} for j in range(0, n, 10)]


def test_sign_is_chosen_on_validation_not_test():
    # validation: hyperintense lesions, healthy images with dark blobs -> "positive" wins there;
    # test: hypointense lesions, healthy images with bright blobs -> "negative" would win on test
    val, test = _batches(0.6, -0.9), _batches(-0.6, 0.9, seed=1)
    opts = EvalOptions(sign=["abs", "positive", "negative"], median_size=[1], reduction=["max"], n_boot=0)
    report = evaluate_anomaly_detection(Zero(), val, test, opts)
    sel = report["selection"]
    assert sel["chosen_on"] == "validation"
    assert report["scoring"]["sign"] == "positive"
    assert {r["sign"] for r in sel["candidates"]} == set(MAP_SIGNS)
    by_sign = {r["sign"]: r["val_auroc"] for r in sel["candidates"]}
    assert by_sign["positive"] == pytest.approx(1.0) and by_sign["abs"] < 0.5
    # on this test set the validation choice is poor: nothing was tuned on test
    assert report["image"]["model"]["auroc"] < 0.5
    # the pixel threshold comes from the positive map (one histogram per distinct signed map)
    assert sel["pixel_dice_at_threshold"] == pytest.approx(1.0, abs=1e-6)
    chose_on_test = evaluate_anomaly_detection(Zero(), test, test, opts)
    assert chose_on_test["scoring"]["sign"] == "negative"
