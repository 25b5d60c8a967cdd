"""The evaluation protocol chooses on validation data only and reports the baseline beside the model."""

from __future__ import annotations

import csv
import json
import os
import stat

import pytest
import torch

from meddiff.anomaly.scoring import ScoringConfig
from meddiff.diffusion import NoiseSchedule
from meddiff.diffusion.partial import PartialSampling
from meddiff.errors import ConfigError
from meddiff.models.validation import AnomalyValidation
from meddiff.protocols.anomaly import EvalOptions, evaluate_anomaly_detection, run


class HealthyIsBlack:
    """A 'model' whose healthy reconstruction is an all -1 image: the anomaly map is |x + 1|."""

    def __init__(self) -> None:
        self.anomaly_val = AnomalyValidation(ScoringConfig())
        self.sampling = PartialSampling(t_start=10)
        self.schedule = NoiseSchedule(num_train_timesteps=100)
        self.seen_t: list[int] = []

    def reconstruct(self, batch, sampling=None):
        self.seen_t.append((sampling or self.sampling).t_start)
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
    assert model.seen_t[12:16] == [chosen] * 4  # the test pass reconstructs at the chosen depth
    # the generalisation check after it reconstructs its unseen kinds at the chosen depth too (one batch per kind)
    assert model.seen_t[16:] == [chosen] * len(report["generalisation"]["kinds"]) and report["generalisation"]["kinds"]
    assert report["reconstruction"]["t_start"] == chosen  # ... and the report says which
    assert len(report["selection"]["candidates"]) == 3
    assert model.sampling.t_start == 10  # the protocol passed copies down; the model is unchanged
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
    assert model.sampling.t_start == 10 and report["reconstruction"]["t_start"] in (5, 20)
    assert json.loads((tmp_path / "report.json").read_text())["summary"] == report["summary"]
    rows = list(csv.reader((tmp_path / "metrics.csv").open()))
    assert rows[0] == ["metric", "value"] and {r[0] for r in rows[1:]} == set(report["summary"])
    for name in ("report.json", "metrics.csv", "roc.png", "anomaly_grid.png"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) & 0o044 == 0o044, name  # readable by all


def test_run_rejects_unknown_eval_options(tmp_path):
    with pytest.raises(ConfigError, match="Unknown eval option.*nboot"):
        run(HealthyIsBlack(), _Data(), {"nboot": 5}, tmp_path, "cpu")


def test_depths_need_a_model_with_a_partial_diffusion_sampling(tmp_path):
    model = HealthyIsBlack()
    del model.sampling
    with pytest.raises(ConfigError, match="eval.t_start"):
        evaluate_anomaly_detection(model, _batches("point"), _batches("point"), EvalOptions(t_start=[5]))


def test_without_selection_the_configured_setting_is_used_and_recorded():
    model = HealthyIsBlack()
    report = evaluate_anomaly_detection(model, None, _batches("point"), EvalOptions(select_on_val=False, n_boot=0,
                                                                                  generalisation=False))
    assert report["selection"] == {"chosen_on": "config"}
    assert report["scoring"] == model.anomaly_val.scoring.as_dict()
    assert report["reconstruction"]["t_start"] == 10 and model.seen_t == [10] * 4


# ------------------------------------------------------------------------------------------------------------
# Baselines beside the model, paired margin, cluster bootstrap, and tests that fail when a rule is broken.
# ------------------------------------------------------------------------------------------------------------
NN, MH = "baseline_nearest_healthy_image", "baseline_mean_healthy_image"


def _black_training_set(n: int = 12, s: int = 8) -> list[dict]:
    """Healthy training images: all black (-1), so NN(x) = mean healthy = -1 and both baselines map |x + 1|."""
    return [{"image": -torch.ones(1, s, s), "label": torch.tensor(0)} for _ in range(n)]


def test_healthy_set_baselines_stand_beside_the_model_with_a_paired_margin(capsys):
    opts = EvalOptions(median_size=[1], reduction=["mean", "max"], n_boot=50)
    report = evaluate_anomaly_detection(HealthyIsBlack(), _batches("point"), _batches("point", seed=2), opts,
                                        healthy=_black_training_set())
    img = report["image"]
    assert set(img) == {"model", "baseline_mean_intensity", NN, MH}
    for name in (NN, MH):
        assert img[name]["auroc"] == pytest.approx(img["model"]["auroc"])  # the same map as this stand-in model
        assert report["selection"]["baselines"][name]["chosen_on"] == "validation"
        assert {"dice_at_val_threshold", "val_threshold", "oracle_dice"} <= set(report["pixel"][name])
        cost = report["baselines_cost"][name]
        assert cost["n_queries"] == 80 and cost["n_healthy_total"] == 12  # 40 validation + 40 test queries
    margin = report["margin_over_best_baseline"]
    assert margin["baseline_chosen_on"] == "validation"
    # the best baseline by validation AUROC (ties: the larger name), identical scores -> a margin of exactly 0
    assert margin["baseline"] == NN and margin["auroc_diff_ci"] == (0.0, 0.0)
    assert "does NOT beat" in margin["verdict"]
    s = report["summary"]
    assert s["nearest_healthy_image_auroc"] == img[NN]["auroc"] and s["model_beats_best_baseline"] == 0.0
    assert s["best_baseline_image_auroc"] == img[NN]["auroc"]
    from meddiff.protocols.anomaly import print_report

    print_report(report)
    out = capsys.readouterr().out
    assert "nearest healthy" in out and "mean healthy" in out and "mean intensity" in out
    assert "The model does NOT beat the best baseline (nearest healthy image" in out


def _textured(n: int = 40, seed: int = 0, healthy_only: bool = False):
    """Healthy images are random texture in [-1, -0.4]; the anomalous half has a 2x2 lesion of constant -0.7 (the
    texture's mean): invisible to intensity, and nothing a healthy image can be matched to. Batches also carry the
    lesion-free image (``healthy``) for a stand-in model that reconstructs it exactly."""
    g = torch.Generator().manual_seed(seed)
    clean = -1 + 0.6 * torch.rand(n, 1, 8, 8, generator=g)
    label = torch.zeros(n, dtype=torch.long) if healthy_only else torch.arange(n) % 2
    mask = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    for i in range(n):
        if label[i]:
            r, c = (int(v) for v in torch.randint(0, 7, (2,), generator=g))
            mask[i, :, r:r + 2, c:c + 2] = True
    x = torch.where(mask, torch.full_like(clean, -0.7), clean)
    return [{"image": x[j:j + 10], "label": label[j:j + 10], "mask": mask[j:j + 10], "healthy": clean[j:j + 10]}
            for j in range(0, n, 10)]


def test_margin_picks_the_best_baseline_on_validation_and_says_when_the_model_wins():
    class Perfect(HealthyIsBlack):
        """Reconstructs exactly the lesion-free image: its map is the lesion alone."""

        def reconstruct(self, batch, sampling=None):
            return batch["healthy"]

    healthy = [{"image": b["image"][i], "label": torch.tensor(0)} for b in _textured(60, seed=9, healthy_only=True)
               for i in range(len(b["image"]))]
    opts = EvalOptions(median_size=[1], reduction=["mean", "max"], n_boot=200)
    report = evaluate_anomaly_detection(Perfect(), _textured(seed=1), _textured(80, seed=2), opts, healthy=healthy)
    m = report["margin_over_best_baseline"]
    val = m["baseline_val_auroc"]
    assert m["baseline"] == max(val, key=lambda k: (val[k], k))  # chosen by validation AUROC
    assert report["image"]["model"]["auroc"] == 1.0 and m["auroc_baseline"] < 0.9
    assert m["auroc_diff_ci"][0] > 0 and m["verdict"].startswith("The model beats the best baseline")
    assert report["summary"]["model_beats_best_baseline"] == 1.0


def _lesions(lesion: float, n: int = 40, seed: int = 0):
    """Every image has a healthy blob at -0.2 (HealthyIsBlack map 0.8, intensity map 0.4); the anomalous half also a
    2x2 lesion at ``lesion``. Validation lesions are bright (1.0), test lesions dim (-0.5: below the blob)."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 8, 8)
    label = torch.arange(n) % 2
    mask = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    for i in range(n):
        k = int(torch.randint(2, 4, (1,), generator=g))
        x[i, :, :k, :k] = -0.2
        if label[i]:
            x[i, :, 6:, 6:] = lesion
            mask[i, :, 6:, 6:] = True
    return [{"image": x[j:j + 10], "label": label[j:j + 10], "mask": mask[j:j + 10]} for j in range(0, n, 10)]


def test_dice_is_reported_at_the_validation_threshold_for_the_model_and_every_baseline():
    """Breaking the rule (Dice at the test-chosen threshold reported as 'at the validation threshold') fails here:
    at the validation threshold the dim test lesions are missed (Dice 0), while the test's own best Dice is > 0."""
    opts = EvalOptions(median_size=[1], reduction=["max"], n_boot=0)
    report = evaluate_anomaly_detection(HealthyIsBlack(), _lesions(1.0), _lesions(-0.5, seed=1), opts,
                                        healthy=_black_training_set())
    sel = report["selection"]
    thresholds = {"model": sel["pixel_threshold"], "baseline_intensity": sel["baseline_mean_intensity"]["pixel_threshold"],
                  NN: sel["baselines"][NN]["pixel_threshold"], MH: sel["baselines"][MH]["pixel_threshold"]}
    for name, thr in thresholds.items():
        pix = report["pixel"][name]
        assert pix["val_threshold"] == thr, name  # the threshold validation chose ...
        assert pix["dice_at_val_threshold"] == 0.0, name  # ... misses every dim test lesion
        assert pix["oracle_dice"] > 0.2 and pix["oracle_threshold"] < thr, name  # test's own best: not reported as such
    assert sel["pixel_threshold"] > 0.8 and sel["baseline_mean_intensity"]["pixel_threshold"] > 0.4  # above the blob
    assert report["summary"]["pixel_dice"] == 0.0 and report["summary"]["nearest_healthy_pixel_dice"] == 0.0


class DepthMatters(HealthyIsBlack):
    """Only t_start=20 reconstructs the healthy image; other depths return the input (no anomaly map at all)."""

    def reconstruct(self, batch, sampling=None):
        t = (sampling or self.sampling).t_start
        self.seen_t.append(t)
        x = batch["image"]
        return torch.where(batch["mask"], -torch.ones_like(x), x) if t == 20 else x.clone()


def test_the_depth_with_the_best_validation_auroc_is_chosen_not_the_last_or_first():
    model = DepthMatters()
    report = evaluate_anomaly_detection(model, _batches("area"), _batches("area", seed=5), EvalOptions(
        median_size=[1], reduction=["mean"], n_boot=0, t_start=[5, 20, 40], generalisation=False))
    rows = {r["t_start"]: r["val_auroc"] for r in report["selection"]["candidates"]}
    assert rows[20] == 1.0 and rows[5] == rows[40] == 0.5
    assert report["selection"]["t_start"] == 20 and report["reconstruction"]["t_start"] == 20
    assert model.seen_t[12:] == [20] * 4
    assert report["image"]["model"]["auroc"] == 1.0


def test_baselines_choose_their_post_processing_on_validation_not_test():
    """Validation has point anomalies ('max' separates them), test area anomalies ('mean' would): the model and each
    baseline keep 'max'."""
    opts = EvalOptions(median_size=[1], reduction=["mean", "max"], n_boot=0)
    report = evaluate_anomaly_detection(HealthyIsBlack(), _batches("point"), _batches("area", seed=1), opts,
                                        healthy=_black_training_set())
    assert report["scoring"]["reduction"] == "max"
    for name in (NN, MH):
        assert report["selection"]["baselines"][name]["scoring"]["reduction"] == "max", name
    on_test = evaluate_anomaly_detection(HealthyIsBlack(), _batches("area", seed=1), _batches("area", seed=1), opts,
                                         healthy=_black_training_set())
    for name in (NN, MH):  # ... although 'mean' is better on this test set
        assert on_test["selection"]["baselines"][name]["scoring"]["reduction"] == "mean"
        assert on_test["image"][name]["auroc"] > report["image"][name]["auroc"]


def test_chosen_on_says_config_when_validation_could_not_compare():
    one_class = [{**b, "label": torch.zeros_like(b["label"])} for b in _batches("point")]
    report = evaluate_anomaly_detection(HealthyIsBlack(), one_class, _batches("point"),
                                        EvalOptions(median_size=[1], reduction=["mean", "max"], n_boot=0))
    assert report["selection"]["chosen_on"] == "config" and "candidates" not in report["selection"]
    assert report["scoring"] == HealthyIsBlack().anomaly_val.scoring.as_dict()


class _DataWithTrain(_Data):
    def __init__(self) -> None:
        super().__init__()
        self.train_calls = 0

    def train_dataloader(self):
        self.train_calls += 1
        return torch.utils.data.DataLoader(_black_training_set(), batch_size=4)


def test_the_selection_record_lists_the_splits_selection_read(tmp_path):
    data = _DataWithTrain()
    report = run(HealthyIsBlack(), data, {"median_size": [1], "reduction": ["mean", "max"], "n_boot": 20}, tmp_path)
    assert report["selection"]["splits_read"] == ["train", "val"] and report["selection"]["chosen_on"] == "validation"
    assert data.test_calls == 1 and set(report["image"]) >= {NN, MH}
    assert report["selection"]["baselines"][NN]["scoring"]["reduction"] == "max"  # point anomalies on validation
    fixed = run(HealthyIsBlack(), _DataWithTrain(), {"select_on_val": False, "n_boot": 0}, tmp_path / "fixed")
    assert fixed["selection"]["splits_read"] == ["train"] and fixed["selection"]["chosen_on"] == "config"
    assert fixed["selection"]["baselines"][NN]["chosen_on"] == "config"
    none = run(HealthyIsBlack(), _DataWithTrain(), {"baselines": [], "n_boot": 0}, tmp_path / "none")
    assert none["selection"]["splits_read"] == ["val"] and set(none["image"]) == {"model", "baseline_mean_intensity"}
    with pytest.raises(ConfigError, match="eval.baselines"):
        run(HealthyIsBlack(), _DataWithTrain(), {"baselines": ["nearest"]}, tmp_path / "bad")


def test_cis_resample_subjects_when_batches_carry_them():
    def with_subjects(batches):  # 4 slices per subject, labels constant within a subject
        out = []
        for k, b in enumerate(batches):
            n = len(b["label"])
            lab = torch.tensor([(k * n + i) // 4 % 2 for i in range(n)])
            out.append({**b, "label": lab, "subject": [f"S{(k * n + i) // 4}" for i in range(n)]})
        return out

    opts = EvalOptions(median_size=[1], reduction=["max"], n_boot=50)
    report = evaluate_anomaly_detection(HealthyIsBlack(), with_subjects(_batches("point")),
                                        with_subjects(_batches("point", seed=2)), opts, healthy=_black_training_set())
    for name in ("model", "baseline_mean_intensity", NN, MH):
        assert report["image"][name]["resampled"] == "subjects" and report["image"][name]["n_subjects"] == 10
    assert report["margin_over_best_baseline"]["resampled"] == "subjects"
    assert report["n_test_subjects"] == 10 and set(report["subject"]) >= {"model", NN}


def test_the_report_records_precision_and_threads():
    class Conv(torch.nn.Module):
        """A real network: the protocol observes the dtype it runs in."""

        def __init__(self) -> None:
            super().__init__()
            self.anomaly_val = AnomalyValidation(ScoringConfig())
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def reconstruct(self, batch, sampling=None):
            return self.conv(batch["image"]).float().clamp(-1, 1)

    opts = EvalOptions(median_size=[1], reduction=["max"], n_boot=0)
    report = evaluate_anomaly_detection(Conv(), None, _batches("point"), opts)
    rt = report["runtime"]
    assert rt["precision"] == "32-true" and rt["torch_threads"] == torch.get_num_threads()
    assert rt["compute"]["param_dtype"] == "float32" and rt["compute"]["autocast"] is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = evaluate_anomaly_detection(Conv(), None, _batches("point"), opts)["runtime"]
    assert mixed["precision"] == "bf16-mixed" and mixed["compute"]["output_dtype"] == "bfloat16"
    stand_in = evaluate_anomaly_detection(HealthyIsBlack(), None, _batches("point"), opts)["runtime"]
    assert stand_in["precision"] == "32-true" and stand_in["compute"]["observed"] == "reconstruction output"


def test_the_fixed_published_scoring_is_reported_beside_the_chosen_one_from_the_same_test_pass():
    """pDDPM's published scoring (median filter 5, mean over the brain mask) is the model's configured one: the report
    carries it (``fixed_scoring``, ``fixed_*`` summary keys) beside the validation-chosen one, with the numbers
    ``eval.select_on_val=false`` gives, computed on the same test reconstructions (one test pass)."""
    model = HealthyIsBlack()
    model.anomaly_val.scoring = ScoringConfig(median_size=5, reduction="mean")
    opts = EvalOptions(median_size=[1], reduction=["mean", "max"], n_boot=50, generalisation=False)
    report = evaluate_anomaly_detection(model, _batches("point"), _batches("point", seed=2), opts)
    assert model.seen_t == [10] * 8  # 4 validation + 4 test batches: one reconstruction per test batch
    assert report["scoring"]["reduction"] == "max" and report["scoring"]["median_size"] == 1  # chosen on validation
    fixed = report["fixed_scoring"]
    assert fixed["scoring"] == model.anomaly_val.scoring.as_dict() and fixed["chosen_on"] == "config"
    assert "median filter 5" in fixed["note"]
    # the reference run: the configured scoring kept (select_on_val=false) with the same model settings
    ref_model = HealthyIsBlack()
    ref_model.anomaly_val.scoring = model.anomaly_val.scoring
    published = evaluate_anomaly_detection(ref_model, None, _batches("point", seed=2),
                                           EvalOptions(select_on_val=False, n_boot=50))
    assert fixed["image"] == published["image"]["model"]
    assert fixed["pixel"]["auroc"] == published["pixel"]["model"]["auroc"]
    assert fixed["pixel"]["auprc"] == published["pixel"]["model"]["auprc"]
    s = report["summary"]
    assert (s["fixed_image_auroc"], s["fixed_image_auprc"]) == (fixed["image"]["auroc"], fixed["image"]["auprc"])
    assert s["fixed_pixel_auprc"] == fixed["pixel"]["auprc"]
    # the chosen setting's numbers are what they were without the fixed scoring beside them
    assert s["image_auroc"] == report["image"]["model"]["auroc"] == 1.0
    assert s["image_auroc"] != s["fixed_image_auroc"]  # median 5 + mean blurs the one-pixel anomalies away
    assert published["fixed_scoring"]["image"] == published["image"]["model"]  # without selection both agree


def test_eval_fixed_scoring_sets_the_published_scoring_whatever_the_model_was_configured_with():
    """``eval.fixed_scoring`` (rsna_pddpm: median 5, mean) is what ``fixed_scoring`` reports, even when a demo
    configures another scoring; an unknown field is a ConfigError."""
    model = HealthyIsBlack()
    model.anomaly_val.scoring = ScoringConfig(median_size=1, reduction="percentile")
    opts = EvalOptions(median_size=[1], reduction=["max"], n_boot=0,
                       fixed_scoring={"median_size": 5, "reduction": "mean"})
    report = evaluate_anomaly_detection(model, _batches("point"), _batches("point", seed=2), opts)
    assert report["fixed_scoring"]["scoring"]["median_size"] == 5
    assert report["fixed_scoring"]["scoring"]["reduction"] == "mean"
    ref_model = HealthyIsBlack()
    ref_model.anomaly_val.scoring = ScoringConfig(median_size=5, reduction="mean")
    published = evaluate_anomaly_detection(ref_model, None, _batches("point", seed=2),
                                           EvalOptions(select_on_val=False, n_boot=0))
    got, want = report["fixed_scoring"]["image"], published["image"]["model"]
    assert (got["auroc"], got["auprc"]) == (want["auroc"], want["auprc"])
    with pytest.raises(ConfigError, match="fixed_scoring"):
        evaluate_anomaly_detection(model, _batches("point"), _batches("point", seed=2),
                                   EvalOptions(median_size=[1], n_boot=0, fixed_scoring={"median": 5}))



def test_the_image_threshold_is_chosen_on_validation_and_only_applied_to_test():
    """Validation anomalies score 2.0 (a +1 pixel), test anomalies 1.5: a threshold fitted on test would flag them,
    the validation one (the highest F1-max threshold there, 2.0) does not."""
    model = HealthyIsBlack()
    test = _batches("point", seed=1)
    for b in test:
        b["image"] = torch.where(b["image"] == 1.0, torch.tensor(0.5), b["image"])
    opts = EvalOptions(median_size=[1], reduction=["max"], n_boot=20)
    report = evaluate_anomaly_detection(model, _batches("point"), test, opts)
    sel = report["selection"]
    assert sel["image_threshold"] == pytest.approx(2.0) and sel["image_f1_at_threshold"] == pytest.approx(1.0)
    at = report["image_at_val_threshold"]
    assert at["threshold"] == sel["image_threshold"]
    assert at["sensitivity"] == 0.0 and at["specificity"] == 1.0
