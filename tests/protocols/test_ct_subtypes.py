"""CT add-on: per-subtype AUROC (healthy vs each subtype), figures over the CT, and its wiring into the protocol
(switched on by batches carrying ``subtypes``)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from meddiff.anomaly.scoring import ScoringConfig
from meddiff.diffusion.partial import PartialSampling
from meddiff.errors import DataError
from meddiff.models.validation import AnomalyValidation
from meddiff.protocols.anomaly import EvalOptions, evaluate_anomaly_detection
from meddiff.protocols.anomaly.ct_subtypes import per_subtype_detection, subtype_summary, write_ct_outputs
from meddiff.viz.ct import overlay_segmentation, pick_example_rows, save_ct_segmentation, save_subtype_auroc

NAMES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]


def _toy():
    """12 slices: 6 healthy, 3 epidural (score high), 2 subdural (score inside the healthy range), 1 both."""
    labels = np.array([0] * 6 + [1] * 6)
    sub = np.zeros((12, 5))
    sub[6:9, 0] = 1  # epidural
    sub[9:11, 4] = 1  # subdural
    sub[11, [0, 4]] = 1  # both
    healthy_scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    model = np.array(healthy_scores + [0.9, 0.8, 0.95] + [0.15, 0.45] + [0.7])
    base = -model  # a baseline that ranks everything backwards
    return labels, sub, model, base


def test_per_subtype_auroc_is_healthy_vs_that_subtype_only():
    labels, sub, model, base = _toy()
    per = per_subtype_detection({"model": model, "baseline_mean_intensity": base}, labels, sub, NAMES, n_boot=200)
    assert list(per) == NAMES
    epi, sdh = per["epidural"], per["subdural"]
    assert (epi["n_pos"], epi["n_healthy"], sdh["n_pos"]) == (4, 6, 3)
    assert epi["model"]["auroc"] == pytest.approx(1.0)  # epidural (and the mixed slice) above all healthy
    assert epi["baseline_mean_intensity"]["auroc"] == pytest.approx(0.0)
    # subdural: positives 0.15, 0.45, 0.7 vs the six healthy; subdural-free epidural slices are not negatives
    keep = (labels == 0) | (sub[:, 4] > 0)
    assert sdh["model"]["auroc"] == pytest.approx(roc_auc_score(sub[keep, 4], model[keep]))
    assert sdh["model"]["auroc"] == pytest.approx((1 + 4 + 6) / 18)
    lo, hi = sdh["model"]["auroc_ci"]
    assert lo <= sdh["model"]["auroc"] <= hi and hi - lo > 0.05
    for name in ("intraparenchymal", "intraventricular", "subarachnoid"):
        assert per[name]["n_pos"] == 0 and "model" not in per[name]
        assert "no " + name in per[name]["skipped"]
    assert subtype_summary(per) == {"subtype_auroc_epidural": pytest.approx(1.0),
                                    "subtype_auroc_subdural": pytest.approx(11 / 18)}


def test_per_subtype_leaves_inconsistent_rows_out_of_the_healthy_reference():
    labels, sub, model, _ = _toy()
    labels = labels.copy()
    labels[8] = 0  # an epidural slice labelled healthy: neither a negative nor dropped from the positives
    per = per_subtype_detection({"model": model}, labels, sub, NAMES, n_boot=0)
    assert per["epidural"]["n_healthy"] == 6 and per["epidural"]["n_inconsistent"] == 1
    assert per["epidural"]["model"]["auroc"] == pytest.approx(1.0)


def test_per_subtype_rejects_mismatched_inputs():
    labels, sub, model, _ = _toy()
    with pytest.raises(DataError, match="names"):
        per_subtype_detection({"model": model}, labels, sub, NAMES[:4])
    with pytest.raises(DataError, match=r"\[N, K\]"):
        per_subtype_detection({"model": model}, labels, sub[:5], NAMES)
    with pytest.raises(DataError, match="scores"):
        per_subtype_detection({"model": model[:3]}, labels, sub, NAMES)


def test_example_rows_put_different_subtypes_first_then_healthy():
    labels = np.array([0, 1, 1, 0, 1, 0, 1])
    sub = np.zeros((7, 5))
    sub[[1, 2], 0] = 1
    sub[4, 4] = 1
    sub[6, 2] = 1
    rows = pick_example_rows(labels, sub, 7, 6)
    assert rows.tolist()[:3] == [1, 6, 4]  # one epidural, one intraventricular, one subdural before a 2nd epidural
    assert rows.tolist()[3] == 2 and set(rows.tolist()[4:]) <= {0, 3, 5}
    assert pick_example_rows(np.zeros(3), None, 3, 6).tolist() == [0, 1, 2]


def test_segmentation_overlay_colours_prediction_red_and_truth_outline_green():
    ct = np.full((9, 9), 0.5)
    pred = np.zeros((9, 9), bool)
    pred[1:3, 1:3] = True
    truth = np.zeros((9, 9), bool)
    truth[4:9, 4:9] = True
    out = overlay_segmentation(ct, pred, truth)
    assert out.shape == (9, 9, 3)
    r, g, b = out[1, 1]
    assert r > 0.7 and g < 0.4 and b < 0.4  # predicted: red
    assert np.allclose(out[4, 6], [0.1, 1.0, 0.2])  # truth border: green
    assert np.allclose(out[6, 6], 0.5)  # truth interior, not predicted: the CT untouched
    assert np.allclose(out[0, 8], 0.5)


def _examples(b=8, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 1, s, s, generator=g) * 2 - 1
    masks = torch.zeros(b, 1, s, s, dtype=torch.bool)
    masks[b // 2:, :, 10:16, 10:16] = True
    maps = torch.rand(b, 1, s, s, generator=g) * 0.2 + masks * 0.8
    labels = torch.tensor([0] * (b // 2) + [1] * (b - b // 2))
    sub = torch.zeros(b, 5)
    sub[b // 2:, 1] = 1
    return images, maps, masks, labels, sub


def test_figures_are_written(tmp_path):
    images, maps, masks, labels, sub = _examples()
    p = save_ct_segmentation(tmp_path / "seg.png", images, images, maps, threshold=0.5, masks=masks, labels=labels,
                             subtypes=sub, names=NAMES, ids=[f"ID_{i}" for i in range(8)], n_rows=4)
    with_seg = Image.open(p).size
    p2 = save_ct_segmentation(tmp_path / "noseg.png", images, images, maps, threshold=None, labels=labels, n_rows=4)
    assert Image.open(p2).size[0] < with_seg[0]  # no threshold: the segmentation column is left out
    labels_np, sub_np, model, base = _toy()
    per = per_subtype_detection({"model": model, "baseline_mean_intensity": base}, labels_np, sub_np, NAMES, n_boot=50)
    q = save_subtype_auroc(tmp_path / "bars.png", per)
    assert Image.open(q).size[0] > 300
    with pytest.raises(DataError, match="maps"):
        save_ct_segmentation(tmp_path / "bad.png", images, images, maps[:3], threshold=0.5)


class _FakeModel:
    """Reconstructs the lesion-free image: error is exactly the lesion (subtype 1) or nothing (others)."""

    def __init__(self):
        self.anomaly_val = AnomalyValidation(ScoringConfig())
        self.sampling = PartialSampling(t_start=10)
        self.schedule = SimpleNamespace(num_train_timesteps=100)

    def reconstruct(self, batch):
        return torch.where(batch["mask"], torch.full_like(batch["image"], -1.0), batch["image"])


def _loader(n_batches=3, b=8, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_batches):
        img = torch.full((b, 1, s, s), -1.0) + 0.05 * torch.rand(b, 1, s, s, generator=g)
        labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        sub = torch.zeros(b, 5)
        sub[4:6, 1] = 1  # intraparenchymal: visible lesions
        sub[6:8, 3] = 1  # subarachnoid: no visible lesion (mask empty)
        mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
        mask[4:6, :, 4:10, 4:10] = True
        img = torch.where(mask, torch.ones_like(img), img)
        out.append({"image": img, "label": labels, "subtypes": sub, "mask": mask,
                    "brain_mask": torch.ones(b, 1, s, s, dtype=torch.bool),
                    "id": [f"ID_{k}_{i}" for i in range(b)], "subject": [f"P{k}_{i // 4}" for i in range(b)]})
    return out


def test_protocol_reports_per_subtype_and_writes_ct_outputs(tmp_path):
    opts = EvalOptions(median_size=[1], reduction=["mean"], n_boot=50, n_figure_rows=4)
    report = evaluate_anomaly_detection(_FakeModel(), _loader(seed=1), _loader(seed=2), opts,
                                        subtype_names=NAMES)
    per = report["image"]["per_subtype"]
    assert per["intraparenchymal"]["model"]["auroc"] == pytest.approx(1.0)
    assert per["subarachnoid"]["model"]["auroc"] < 0.9  # invisible to this model
    assert per["intraparenchymal"]["n_pos"] == 6 and per["intraparenchymal"]["n_healthy"] == 12
    assert "skipped" in per["epidural"]
    assert report["summary"]["subtype_auroc_intraparenchymal"] == pytest.approx(1.0)
    figures = report.pop("_figures")
    assert figures["examples"]["id"][:2] == ["ID_0_0", "ID_0_1"] and len(figures["items"]["id"]) == 24
    json.dumps(report, default=list)  # JSON-ready
    written = {p.name for p in write_ct_outputs(report, figures, tmp_path)}
    assert written == {"ct_segmentation.png", "subtype_auroc.png", "per_subtype.csv", "test_scores.csv"}
    rows = list(csv.DictReader((tmp_path / "test_scores.csv").open()))
    assert len(rows) == 24 and rows[4]["intraparenchymal"] == "1" and rows[4]["id"] == "ID_0_4"
    assert float(rows[4]["model_score"]) > float(rows[0]["model_score"])
    per_rows = list(csv.DictReader((tmp_path / "per_subtype.csv").open()))
    assert {r["subtype"] for r in per_rows} == set(NAMES)


def test_protocol_without_subtypes_is_unchanged():
    batches = _loader()
    for b in batches:
        del b["subtypes"]
    report = evaluate_anomaly_detection(_FakeModel(), batches, batches, EvalOptions(median_size=[1], n_boot=10))
    assert set(report["image"]) == {"model", "baseline_mean_intensity"}
    assert "items" not in report["_figures"] and "subtypes" not in report["_figures"]["examples"]


def test_per_subtype_cis_resample_patients_not_slices():
    """Each patient contributes 5 identical slices: resampling slices treats them as 5 independent observations
    and gives an interval too narrow; resampling patients gives the width of the patients' own evidence."""
    labels, sub, model, _ = _toy()
    rng = np.random.default_rng(0)
    model = model + rng.normal(0, 0.3, size=model.shape)  # overlap, so the AUROC is uncertain
    rep = 5
    y, s, m = np.repeat(labels, rep), np.repeat(sub, rep, axis=0), np.repeat(model, rep)
    patients = np.repeat([f"P{i}" for i in range(labels.size)], rep)
    by_slice = per_subtype_detection({"model": m}, y, s, NAMES, n_boot=400)
    by_patient = per_subtype_detection({"model": m}, y, s, NAMES, n_boot=400, subjects=patients)
    for name in ("epidural", "subdural"):
        ps, pp = by_slice[name]["model"], by_patient[name]["model"]
        assert ps["auroc"] == pp["auroc"] and pp["resampled"] == "subjects" and ps["resampled"] == "items"
        assert by_patient[name]["n_subjects"] == (10 if name == "epidural" else 9)
        width = lambda e: e["auroc_ci"][1] - e["auroc_ci"][0]  # noqa: E731
        assert width(pp) > 1.5 * width(ps), name
    with pytest.raises(DataError, match="subjects"):
        per_subtype_detection({"model": m}, y, s, NAMES, subjects=patients[:3])


def test_protocol_ct_outputs_carry_every_baseline_and_patient_cis(tmp_path):
    healthy = [{"image": b["image"][i], "label": torch.tensor(0)} for b in _loader(seed=7)
               for i in range(8) if b["label"][i] == 0]
    opts = EvalOptions(median_size=[1], reduction=["mean", "max"], n_boot=50, n_figure_rows=4)
    report = evaluate_anomaly_detection(_FakeModel(), _loader(seed=1), _loader(seed=2), opts,
                                        subtype_names=NAMES, healthy=healthy)
    methods = {"model", "baseline_mean_intensity", "baseline_nearest_healthy_image", "baseline_mean_healthy_image"}
    assert set(report["image"]) - {"per_subtype"} == methods
    for name in methods:
        assert report["image"][name]["resampled"] == "subjects" and report["image"][name]["n_subjects"] == 6
    entry = report["image"]["per_subtype"]["intraparenchymal"]
    assert methods <= set(entry) and entry["n_subjects"] == 6  # 3 healthy + 3 intraparenchymal patients
    assert all(entry[m]["resampled"] == "subjects" for m in methods)
    assert report["margin_over_best_baseline"]["resampled"] == "subjects"
    figures = report.pop("_figures")
    write_ct_outputs(report, figures, tmp_path)
    rows = list(csv.DictReader((tmp_path / "test_scores.csv").open()))
    assert {"model_score", "baseline_score", "baseline_nearest_healthy_image_score",
            "baseline_mean_healthy_image_score"} <= set(rows[0])
    per_rows = list(csv.DictReader((tmp_path / "per_subtype.csv").open()))
    assert {r["method"] for r in per_rows if r["subtype"] == "intraparenchymal"} == methods
