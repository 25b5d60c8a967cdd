"""The refiner protocol: honest labels (AUCp never reads a label; transductive labels only for scoring), the
selection rule derived from the run's checkpoints, paired differences, steps sweep, report files — and the honesty
rules of issue 17, each with a test that fails when the rule is broken: CIs resample subjects, the best baseline is
chosen on labelled validation, baselines come from the training known-healthy images only, the headline uses the
configured num_steps, Dice uses the validation threshold; the test split is read once and the model is unchanged."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from meddiff.anomaly.scoring import score_batch
from meddiff.data.modules.image_folder import ImageFolderAnomalyDataModule
from meddiff.data.synthetic.lesion_folders import write_synthetic_image_folder
from meddiff.diffusion import NoiseSchedule
from meddiff.metrics.detection import detection_ci, paired_difference
from meddiff.metrics.pixel import PixelAccumulator, choose_threshold
from meddiff.models.coarse_gan import CoarseGenerator
from meddiff.models.refiner import RefinerDiffusion
from meddiff.nets import build_net
from meddiff.nets.gan import BrainomalyGenerator, PatchCritic
from meddiff.protocols import get_protocol, protocol_class
from meddiff.protocols import refiner as protocol
from meddiff.protocols.refiner.options import LABELS_NONE
from meddiff.protocols.refiner.test import paired_auroc_difference
from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY

sys.path.insert(0, str(Path(__file__).parent))
import fakes_refiner as fakes  # noqa: E402

OPTS = dict(n_boot=50, steps=[1, 2], figures=False, compare_checkpoints=True)
QUICK = {**OPTS, "steps": [], "compare_checkpoints": False}
NEAREST, MEAN_HEALTHY, MEAN_INTENSITY = ("baseline_nearest_healthy_image", "baseline_mean_healthy_image",
                                         "baseline_mean_intensity")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "data"
    write_synthetic_image_folder(root, image_size=32, n_known_healthy=6, n_mixed=(3, 3), n_val=(0, 0),
                                 n_test=(3, 3), slices_per_subject=2, min_lesion_px=2)
    return root


def datamodule(root) -> ImageFolderAnomalyDataModule:
    d = ImageFolderAnomalyDataModule(str(root), val_fraction=0.34, batch_size=8, foreground_mask=True)
    d.setup("fit")
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("coarse") / "coarse.ckpt"
    torch.manual_seed(0)
    gan = CoarseGenerator(BrainomalyGenerator(1, 8, 2, 1), PatchCritic(1, 8, 3)).eval()
    torch.save({"state_dict": gan.state_dict(),
                CKPT_CONFIG_KEY: {"model": {"_target_": "meddiff.models.coarse_gan.CoarseGenerator",
                                            "generator": {"_target_": "meddiff.nets.gan.BrainomalyGenerator",
                                                          "channels": 1, "conv_dim": 8, "num_down": 2,
                                                          "num_res_blocks": 1}}}}, path)
    net = build_net(dict(in_channels=2, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                         num_res_blocks=1, norm_num_groups=8, num_head_channels=8))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = RefinerDiffusion(net, NoiseSchedule(100, "cosine", prediction_type="sample"), coarse_ckpt=str(path),
                           residual_scale=0.5, sampling={"steps": 2}, ema_decay=0.0).eval()
    return gan, ref


def flipped_copy(root, tmp_path):
    """The same images with every label flipped (pos <-> neg folders of the mixed set and of test; the lesion masks of
    the former positives are dropped)."""
    new = tmp_path / "flipped"
    shutil.copytree(root, new)
    shutil.rmtree(new / "test/anomaly_mask", ignore_errors=True)
    for a, b in (("train/pos", "train/neg_mixed"), ("test/pos", "test/neg")):
        (new / a).rename(new / "swap")
        (new / b).rename(new / a)
        (new / "swap").rename(new / b)
    return new


# ------------------------------------------------------------------------------------------ labels and pools
def test_registry_runs_the_package(data_root, models, tmp_path):
    run = get_protocol("refiner")  # the registry runs the package's Protocol class (the skeleton's run)
    assert protocol_class("refiner") is protocol.RefinerProtocol
    assert isinstance(run.__self__, protocol.RefinerProtocol)
    assert isinstance(protocol.RefinerProtocol(), protocol.Protocol)


def test_aucp_reads_no_label_and_auroc_does(data_root, models, tmp_path):
    """Flip every label: AUCp (both protocols, every scorer) must not move; AUROCs must mirror.

    This is the test that fails if the AUCp path scores with labels (e.g. only the test positives as the
    unlabelled side, or the mixed set's folder labels)."""
    _, ref = models
    a = protocol.run(ref, datamodule(data_root), QUICK, tmp_path / "a", "cpu")
    b = protocol.run(ref, datamodule(flipped_copy(data_root, tmp_path)), QUICK, tmp_path / "b", "cpu")
    for name in ("coarse", "refined"):
        for part in ("transductive", "inductive"):
            assert a["aucp"][name][part]["aucp"] == b["aucp"][name][part]["aucp"]
            assert a["aucp"][name][part]["labels_used"] == LABELS_NONE
        for part in ("inductive", "transductive"):
            assert a[part]["image"][name]["auroc"] == pytest.approx(1 - b[part]["image"][name]["auroc"])


def test_transductive_scores_the_mixed_set_inductive_the_test_set(data_root, models, tmp_path):
    _, ref = models
    d = datamodule(data_root)
    rep = protocol.run(ref, d, QUICK, tmp_path, "cpu")
    assert rep["transductive"]["n"] == len(d.pool_dataset("mixed"))
    assert rep["inductive"]["n"] == len(d.pool_dataset("test"))
    assert "test/" in rep["inductive"]["labels_used"] and "only here" in rep["transductive"]["labels_used"]
    assert rep["aucp"]["refined"]["transductive"]["known_healthy_pool"] == "known_healthy_val"
    assert rep["aucp"]["refined"]["transductive"]["n_unlabelled"] == len(d.pool_dataset("mixed"))
    # no labelled validation pool here: the best baseline is chosen by label-free AUCp on validation pools
    best = rep["selection"]["best_baseline"]
    assert best["pools"] == ["known_healthy_val", "mixed"] and best["chosen_on"] == "validation"
    assert rep["inductive"]["model_minus_best_baseline"]["baseline_chosen_on"] == "validation"


def _save(path, model, callbacks=None):
    ckpt = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    if callbacks:
        ckpt["callbacks"] = callbacks
    torch.save(ckpt, path)


def test_selection_rule_is_derived_from_the_weights(data_root, models, tmp_path):
    _, ref = models
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    other = copy.deepcopy(ref)
    with torch.no_grad():
        next(other.net.parameters()).add_(1.0)
    _save(ckdir / "aucp.ckpt", ref)
    _save(ckdir / "labelled.ckpt", other)
    cbs = {"ModelCheckpoint{'monitor': 'val/aucp'}": {"monitor": "val/aucp", "best_model_path": str(ckdir / "aucp.ckpt")},
           "ModelCheckpoint{'monitor': 'val/auroc'}": {"monitor": "val/auroc",
                                                        "best_model_path": str(ckdir / "labelled.ckpt")},
           "ModelCheckpoint{'monitor': None}": {"monitor": None, "best_model_path": ""}}
    _save(ckdir / "last.ckpt", other, cbs)
    d = datamodule(data_root)
    rep = protocol.run(ref, d, {**OPTS, "checkpoint_dir": str(ckdir)}, tmp_path / "out", "cpu")
    assert rep["selection"]["rule"] == "aucp" and rep["selection"]["needs_labels"] is False
    assert set(rep["checkpoints"]) == {"aucp", "labelled_validation", "last"}
    assert rep["checkpoints"]["labelled_validation"]["needs_labels"] is True
    assert rep["checkpoints"]["aucp"]["is_evaluated_model"] and not rep["checkpoints"]["last"]["is_evaluated_model"]
    # the other rule's weights were really evaluated (they differ, so do the numbers)
    assert rep["checkpoints"]["last"]["aucp_transductive"] != rep["checkpoints"]["aucp"]["aucp_transductive"]
    assert rep["checkpoints"]["last"]["resampled"] == "subjects"
    other.eval()
    rep2 = protocol.run(other, d, {**QUICK, "checkpoint_dir": str(ckdir)}, tmp_path / "out2", "cpu")
    assert rep2["selection"]["rule"] == "labelled_validation" and rep2["selection"]["needs_labels"] is True
    assert set(rep2["selection"]["matched_rules"]) == {"labelled_validation", "last"}
    rep3 = protocol.run(ref, d, {**QUICK, "checkpoint_dir": str(tmp_path / "none")}, tmp_path / "o3", "cpu")
    assert rep3["selection"]["rule"].startswith("unknown")


def test_full_report_has_baselines_paired_cis_steps_and_files(data_root, models, tmp_path):
    _, ref = models
    rep = protocol.run(ref, datamodule(data_root), {**OPTS, "figures": True}, tmp_path, "cpu")
    ind = rep["inductive"]
    assert {"coarse", "refined", MEAN_INTENSITY, NEAREST, MEAN_HEALTHY} <= set(ind["image"])
    lo, hi = ind["refined_minus_coarse"]["ci"]
    assert lo <= ind["refined_minus_coarse"]["difference"] <= hi
    assert ind["model_minus_best_baseline"]["model"] == "refined"
    assert "subject" in ind and "refined" in ind["subject"]
    assert [r["steps"] for r in rep["steps"]] == [0, 1, 2] and rep["steps"][0]["estimate"] == "coarse"
    assert all(r["sec_per_image"] > 0 for r in rep["steps"])
    assert rep["refinement"]["num_steps"] == 2 and "not a choice" in rep["steps_note"]
    assert {"inductive_auroc", "transductive_auroc", "aucp_transductive", "refined_minus_coarse"} <= set(rep["summary"])
    assert all(type(v) is float for v in rep["summary"].values())
    # the synthetic Brainomaly set writes test lesion masks (test/anomaly_mask): pixel metrics for both estimates
    assert {"coarse", "refined"} <= set(rep["pixel"]) and "pixel_auroc" in rep["summary"]
    for name in ("refiner_report.md", "roc.png", "report.json", "metrics.csv"):  # report.json: the skeleton's
        assert (tmp_path / name).is_file(), name
    assert "Labels used" in (tmp_path / "refiner_report.md").read_text()


def test_coarse_model_is_a_complete_detector(data_root, models, tmp_path):
    gan, _ = models
    rep = protocol.run(gan, datamodule(data_root), OPTS, tmp_path, "cpu")
    assert rep["primary_estimate"] == "coarse" and "steps" not in rep and "refinement" not in rep
    assert "refined_minus_coarse" not in rep["inductive"]
    assert rep["summary"]["inductive_auroc"] == rep["inductive"]["image"]["coarse"]["auroc"]


def test_paired_difference_known_cases():
    y = np.r_[np.zeros(20), np.ones(20)]
    good = np.r_[np.zeros(20), np.ones(20)] + np.linspace(0, 0.1, 40)
    d = paired_auroc_difference(good, good, y, n_boot=100)
    assert d["difference"] == 0 and d["ci"] == (0.0, 0.0)
    d = paired_auroc_difference(good, -good, y, n_boot=100)
    assert d["difference"] == pytest.approx(1.0) and d["ci"] == (pytest.approx(1.0), pytest.approx(1.0))
    rng = np.random.default_rng(0)
    a, b = y + rng.normal(0, 1, 40), y + rng.normal(0, 3, 40)
    d = paired_auroc_difference(a, b, y, n_boot=500)
    assert d["ci"][0] <= d["difference"] <= d["ci"][1] and d["resampled"] == "items"
    d = paired_auroc_difference(a, b, y, subjects=[i // 2 for i in range(40)], n_boot=500)
    assert d["resampled"] == "subjects" and d["n_subjects"] == 20


def test_any_anomaly_model_gets_aucp_and_both_protocols(data_root, tmp_path):
    from torch import nn

    from meddiff.anomaly.scoring import ScoringConfig

    class Blur(nn.Module):
        """A 'healthy estimate' by 3x3 average: any model with reconstruct + anomaly_val.scoring."""

        anomaly_val = SimpleNamespace(scoring=ScoringConfig())

        def reconstruct(self, batch):
            return torch.nn.functional.avg_pool2d(batch["image"], 3, 1, 1)

    rep = protocol.run(Blur(), datamodule(data_root), {**OPTS, "steps": []}, tmp_path, "cpu")
    assert rep["primary_estimate"] == "model" and "model" in rep["aucp"]
    assert rep["summary"]["inductive_auroc"] == rep["inductive"]["image"]["model"]["auroc"]


# ------------------------------------------------------------------------------------------ the honesty rules
def _test_scores(model, data, name):
    """Scores of one estimate on the fake test pool, computed here (not by the protocol), with ids and subjects."""
    ds = data.pool_dataset("test")
    items = [ds.records[i] for i in range(len(ds))]
    batch = {"image": torch.stack([r.image for r in items]), "id": [r.id for r in items]}
    est = model.estimates(batch)[name]
    s = score_batch(batch["image"], est, None, model.anomaly_val.scoring)["score"].numpy()
    return s, np.array([r.label for r in items]), [r.subject for r in items]


def test_cis_and_paired_differences_resample_subjects(tmp_path):
    """Rule (a): with subjects known, every image-level CI and paired difference resamples subjects.

    Fails if any of them resamples images (the numbers differ from the cluster bootstrap computed here)."""
    model, data, cfg = fakes.make(tmp_path)
    rep = protocol.run(model, data, {**cfg, "n_boot": 200}, tmp_path / "out", "cpu")
    ind = rep["inductive"]
    refined, y, subjects = _test_scores(model, data, "refined")
    coarse, _, _ = _test_scores(model, data, "coarse")
    want = detection_ci(refined, y, subjects, n_boot=200, seed=0)
    assert ind["image"]["refined"]["resampled"] == "subjects" and want["resampled"] == "subjects"
    assert ind["image"]["refined"]["auroc_ci"] == pytest.approx(want["auroc_ci"])
    assert ind["image"]["refined"]["auprc_ci"] == pytest.approx(want["auprc_ci"])
    d = paired_difference(refined, coarse, y, subjects, n_boot=200, seed=0)
    assert ind["refined_minus_coarse"]["ci"] == pytest.approx(d["auroc_diff_ci"])
    assert ind["refined_minus_coarse"]["resampled"] == "subjects"
    m = ind["model_minus_best_baseline"]
    assert m["resampled"] == "subjects" and m["n_subjects"] == len(set(subjects))
    assert rep["resampled"] == {"inductive": "subjects", "transductive": "subjects"}
    for part in ("inductive", "transductive"):
        assert all(v["resampled"] == "subjects" for v in rep[part]["image"].values())
    item_ci = detection_ci(refined, y, None, n_boot=200, seed=0)["auroc_ci"]
    assert tuple(item_ci) != pytest.approx(tuple(want["auroc_ci"]))  # the rule makes a difference here


def _baseline_flip_pools() -> dict[str, list]:
    """Validation favours the mean intensity, test the nearest healthy image (see the test below)."""
    R = fakes.Record

    def pattern(key: str, offset: float) -> torch.Tensor:
        return (fakes._noise(key, (1, fakes.SIZE, fakes.SIZE), 0.3) + offset).clamp(-1, 1)

    none = torch.zeros(1, fakes.SIZE, fakes.SIZE, dtype=torch.bool)
    train = [R(f"kh{k}__000.png", f"kh{k}", 0, pattern(f"p{k}", 0.0), none) for k in range(6)]
    held = [R(f"khv{k}__000.png", f"khv{k}", 0, pattern(f"h{k}", 0.0), none) for k in range(4)]
    # validation: anomalous = bright copies of training images (near them), healthy = new patterns
    val = ([R(f"vp{k}__000.png", f"vp{k}", 1, (train[k].image + 0.2).clamp(-1, 1), none) for k in range(6)]
           + [R(f"vn{k}__000.png", f"vn{k}", 0, pattern(f"vn{k}", 0.0), none) for k in range(6)])
    # test: anomalous = new dark patterns (far from training), healthy = training images plus a little noise
    test = ([R(f"tp{k}__000.png", f"tp{k}", 1, pattern(f"tp{k}", -0.2), none) for k in range(6)]
            + [R(f"tn{k}__000.png", f"tn{k}", 0, (train[k].image + fakes._noise(f"tn{k}", (1, 16, 16), 0.02))
                 .clamp(-1, 1), none) for k in range(6)])
    mixed = [R(f"mx{k}__000.png", f"mx{k}", k % 2, pattern(f"mx{k}", 0.0), none) for k in range(6)]
    return {"known_healthy": train, "known_healthy_val": held, "mixed": mixed, "labelled_val": val, "test": test}


def test_best_baseline_is_chosen_on_labelled_validation(tmp_path):
    """Rule (b): the baseline the margin is measured against is the best on labelled validation, not on test.

    Here the best on validation (mean intensity or mean healthy) is not the best on test (nearest healthy): a
    protocol that took the max over test AUROCs fails."""
    model, _, cfg = fakes.make(tmp_path)
    data = fakes.FakePools(_baseline_flip_pools())
    rep = protocol.run(model, data, {**cfg, "steps": []}, tmp_path / "out", "cpu")
    sel = rep["selection"]["best_baseline"]
    val = sel["values"]
    test = {n: rep["inductive"]["image"][n]["auroc"] for n in val}
    best_on_test = max(test, key=lambda n: (test[n], n))
    assert best_on_test == NEAREST and test[NEAREST] == 1.0
    assert val[NEAREST] < max(val.values())  # the scenario: validation disagrees
    chosen = max(val, key=lambda n: (val[n], n))
    assert sel["pools"] == ["labelled_val"] and sel["chosen_on"] == "validation"
    for part in ("inductive", "transductive"):
        m = rep[part]["model_minus_best_baseline"]
        assert m["baseline"] == chosen != best_on_test
        assert m["baseline_chosen_on"] == "validation" and m["baseline_val_auroc"] == pytest.approx(val)
    assert sel["chosen"] == chosen
    assert rep["summary"]["best_baseline_inductive_auroc"] == test[chosen]


def test_baselines_come_from_training_known_healthy_only(tmp_path):
    """Rule (c): the nearest / mean healthy references are the training known-healthy images, never the AUCp
    hold-out (``known_healthy_val``): built from it, the nearest image finds every held-out image at distance 0
    and its AUCp is 1 on pure noise."""
    model, _, cfg = fakes.make(tmp_path)
    R = fakes.Record
    none = torch.zeros(1, fakes.SIZE, fakes.SIZE, dtype=torch.bool)

    def pool(prefix, n, label=0):
        return [R(f"{prefix}{k}__000.png", f"{prefix}{k}", label if label is not None else k % 2,
                  fakes._noise(f"{prefix}{k}", (1, 16, 16), 0.3).clamp(-1, 1), none) for k in range(n)]

    pools = {"known_healthy": pool("kh", 8), "known_healthy_val": pool("khv", 8), "mixed": pool("mx", 8, None),
             "labelled_val": pool("va", 8, None), "test": pool("te", 8, None)}  # no signal anywhere
    data = fakes.FakePools(pools)
    rep = protocol.run(model, data, {**cfg, "steps": []}, tmp_path / "out", "cpu")
    base = rep["selection"]["baselines"]
    assert base["built_from"] == "known_healthy" and base["n_pool"] == 8 and base["n_images"] == 8
    assert "known_healthy_val" not in rep["selection"]["pools_read"]
    for part in ("transductive", "inductive"):
        assert rep["aucp"][NEAREST][part]["aucp"] < 0.95
        assert rep["aucp"][NEAREST][part]["known_healthy_pool"] == "known_healthy_val"


def test_headline_uses_the_configured_num_steps(tmp_path):
    """Rule (d): the headline is the model's estimate with its configured ``model.sampling.steps``; the steps sweep (where
    1 step is better here) is a measurement and cannot change it."""
    model, data, cfg = fakes.make(tmp_path)
    rep = protocol.run(model, data, {**cfg, "steps": [1, 2, 5]}, tmp_path / "a", "cpu")
    refined, y, _ = _test_scores(model, data, "refined")
    headline = detection_ci(refined, y, n_boot=0)["auroc"]
    assert rep["headline_num_steps"] == model.sampling.steps == 3
    assert rep["summary"]["inductive_auroc"] == pytest.approx(headline)
    sweep = {r["steps"]: r["auroc"] for r in rep["steps"] if r["estimate"] == "refined"}
    assert max(sweep.values()) > headline  # the scenario: a sweep entry beats the configured steps
    capped = protocol.run(model, fakes.make(tmp_path)[1], {**cfg, "steps": [1], "steps_max_images": 10},
                          tmp_path / "c", "cpu")
    assert [r["n"] for r in capped["steps"]] == [10, 10] and capped["summary"] == rep["summary"]
    one_class = protocol.run(model, fakes.make(tmp_path)[1], {**cfg, "steps": [1], "steps_max_images": 5},
                             tmp_path / "d", "cpu")  # the first 5 test images are anomalous: no sweep AUROC
    assert [r["auroc"] for r in one_class["steps"]] == [None, None] and one_class["summary"] == rep["summary"]
    _, data2, _ = fakes.make(tmp_path)
    without = protocol.run(model, data2, {**cfg, "steps": []}, tmp_path / "b", "cpu")
    assert without["summary"] == rep["summary"]


def test_pixel_metrics_use_the_validation_threshold(tmp_path):
    """Rule (e): pixel AUROC/AUPRC for coarse and refined where test masks exist, Dice at the threshold chosen on
    labelled-validation masks (val lesions are stronger than test ones, so the test-best threshold differs)."""
    model, _, cfg = fakes.make(tmp_path)
    pools = fakes.default_pools()
    pools["labelled_val"] = fakes.pool_records("va", 3, 3, lesion=0.9)
    pools["test"] = fakes.pool_records("te", 4, 4, lesion=0.35)
    data = fakes.FakePools(pools, masks=("labelled_val", "test"))
    rep = protocol.run(model, data, {**cfg, "steps": []}, tmp_path / "out", "cpu")
    assert {"coarse", "refined"} <= set(rep["pixel"])

    def acc_of(name):
        acc = PixelAccumulator(1000, 2.0)
        recs = data.pools[name]
        batch = {"image": torch.stack([r.image for r in recs]), "id": [r.id for r in recs]}
        res = score_batch(batch["image"], model.estimates(batch)["coarse"], None, model.anomaly_val.scoring)
        acc.update(res["map"], torch.stack([r.mask for r in recs]), res["region"])
        return acc

    thr = choose_threshold(acc_of("labelled_val"))
    test_acc = acc_of("test")
    pix = rep["pixel"]["coarse"]
    assert rep["selection"]["pixel_threshold"]["values"]["coarse"] == pytest.approx(thr)
    assert pix["val_threshold"] == pytest.approx(thr)
    assert pix["dice_at_val_threshold"] == pytest.approx(test_acc.dice_at(thr))
    assert pix["dice_at_val_threshold"] < pix["oracle_dice"]  # the scenario: the thresholds differ
    assert pix["auroc"] == pytest.approx(test_acc.compute()["auroc"])
    assert rep["summary"]["pixel_dice"] == rep["pixel"]["refined"]["dice_at_val_threshold"]


def test_test_split_read_once_model_unchanged_choices_carry_chosen_on(tmp_path):
    model, data, cfg = fakes.make(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    rep = protocol.run(model, data, cfg, tmp_path / "out", "cpu")
    assert data.test_loaders == 1 and data.reads["test"] == len(data.pools["test"])  # the steps sweep included
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sel = rep["selection"]
    assert sel["chosen_on"] == "validation" and "test" not in sel["pools_read"]
    assert sel["best_baseline"]["chosen_on"] == sel["pixel_threshold"]["chosen_on"] == "validation"
    assert (tmp_path / "out/report.json").is_file() and (tmp_path / "out/metrics.csv").is_file()


def test_reads_models_and_data_through_interfaces_only():
    """No model or DataModule class is imported or checked by the protocol: models are read through
    ``estimates`` / ``reconstruct`` (``refiner/interfaces.py``), data through the pools interface."""
    import ast

    package = Path(protocol.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith(("meddiff.models", "meddiff.data")) for n in names), (path.name, names)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                assert "model" not in ast.unparse(node.args[0]), (path.name, ast.unparse(node))


# ------------------------------------------------------------------------------------------ AUCp as a selector
#: crafted checkpoints (step -> gains of the mixed set, labelled validation, test): AUCp rises with the step, the
#: labelled-validation and test AUROCs fall from 1 to 0 — AUCp picks the worst checkpoint, validation the best
CRAFTED = {100: (0.0, 1.0, 1.0), 200: (0.3, 0.6, 0.6), 300: (0.6, 0.3, 0.3), 400: (1.0, 0.0, 0.0)}


def _crafted_run(tmp_path):
    """A run dir with the four crafted checkpoints, ``last.ckpt`` = step 400 = the AUCp-selected one (evaluated)."""
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    models = {step: fakes.CraftedCheckpoints(g) for step, g in CRAFTED.items()}
    for step, m in models.items():
        torch.save({"state_dict": m.state_dict(), "global_step": step}, ckdir / f"val-step{step}.ckpt")
    cbs = {"ModelCheckpoint{'monitor': 'val/aucp'}": {"monitor": "val/aucp",
                                                       "best_model_path": str(ckdir / "val-step400.ckpt")}}
    torch.save({"state_dict": models[400].state_dict(), "global_step": 400, "callbacks": cbs}, ckdir / "last.ckpt")
    return models, ckdir


def _expected(models, pools):
    """AUCp / labelled-validation / test AUROC of every crafted checkpoint, computed here from the scores."""
    from meddiff.metrics.aucp import aucp

    def scores(m, pool):
        return np.array([m.shift(r.id) for r in pools[pool]]), np.array([r.label for r in pools[pool]])

    out = {}
    for step, m in models.items():
        (h, _), (mx, _), (v, yv), (t, yt) = (scores(m, p) for p in ("known_healthy_val", "mixed", "labelled_val",
                                                                      "test"))
        out[f"val-step{step}"] = {"aucp": aucp(h, mx), "val": detection_ci(v, yv, n_boot=0)["auroc"],
                                  "test": detection_ci(t, yt, n_boot=0)["auroc"]}
    return out


def test_smoothed_aucp_and_spearman_known_cases():
    from meddiff.protocols.refiner.selector import smoothed, spearman

    assert smoothed([0.2, 0.9, 0.2, 0.6, 0.7]) == pytest.approx([0.55, 1.3 / 3, 1.7 / 3, 0.5, 0.65])
    assert smoothed([None, 0.4]) == [0.4, 0.4]
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0) and spearman([1, 2, 3], [1, 5, 9]) == 1.0
    assert spearman([1, 2, 3], [2, 1, 3]) == pytest.approx(0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # constant side: nan


def test_aucp_selector_measured_over_every_saved_checkpoint(tmp_path):
    """Every saved checkpoint's AUCp beside its labelled-validation and test AUROC; Spearman and the regret of AUCp
    selection have known values here (AUCp rises while both AUROCs fall: rho = -1, regret = 1 - 0 = 1); all
    checkpoints are scored in the one test pass, and the evaluated checkpoint and headline are unchanged."""
    from scipy.stats import spearmanr

    models, ckdir = _crafted_run(tmp_path)
    pools = fakes.default_pools()
    data = fakes.FakePools(pools)
    cfg = {"n_boot": 100, "seed": 0, "steps": [], "figures": True, "checkpoint_dir": str(ckdir)}
    model = copy.deepcopy(models[400]).eval()
    rep = protocol.run(model, data, cfg, tmp_path / "out", "cpu")
    sel = rep["aucp_selector"]
    want = _expected(models, pools)
    rows = {r["key"]: r for r in sel["checkpoints"]}
    assert list(rows) == ["val-step100", "val-step200", "val-step300", "val-step400"]  # step order, last.ckpt merged
    assert rows["val-step400"]["is_evaluated_model"] and set(rows["val-step400"]["rules"]) == {"aucp", "last"}
    for key, w in want.items():
        assert rows[key]["aucp"] == pytest.approx(w["aucp"])
        assert rows[key]["val_auroc"] == pytest.approx(w["val"]) and rows[key]["test_auroc"] == pytest.approx(w["test"])
    assert [want[k]["test"] for k in rows][0] == 1.0 and want["val-step400"]["test"] == 0.0  # the crafted extremes
    assert sel["picked"] == {"aucp": "val-step400", "aucp_smoothed": "val-step400", "labelled_validation": "val-step100",
                             "last": "val-step400"}
    assert sel["best_on_test"] == "val-step100"
    assert sel["regret"] == {"aucp": pytest.approx(1.0), "aucp_smoothed": pytest.approx(1.0),
                             "labelled_validation": 0.0, "last": pytest.approx(1.0)}
    rho = sel["spearman_aucp_vs_val_auroc"]
    expected_rho = spearmanr([w["aucp"] for w in want.values()], [w["val"] for w in want.values()]).statistic
    assert rho["rho"] == pytest.approx(expected_rho) == pytest.approx(-1.0)
    assert rho["ci"][0] <= rho["rho"] <= rho["ci"][1] and rho["n_boot_used"] > 0 and "subjects" in rho["resampled"]
    assert rep["summary"]["aucp_selection_regret"] == pytest.approx(1.0)
    # a measurement only: the evaluated checkpoint, the headline and the by-rule table are the run's
    assert rep["selection"]["rule"] == "aucp"
    assert rep["summary"]["inductive_auroc"] == pytest.approx(want["val-step400"]["test"])
    assert rep["checkpoints"]["aucp"]["is_evaluated_model"]
    assert data.test_loaders == 1 and data.reads["test"] == len(pools["test"])  # four checkpoints, one test pass
    # one validation pass for baselines and checkpoints (+ the first item, read once to see whether masks exist)
    assert data.reads["labelled_val"] == len(pools["labelled_val"]) + 1
    assert (tmp_path / "out/aucp_selector.png").is_file()
    md = (tmp_path / "out/refiner_report.md").read_text()
    assert "AUCp as a checkpoint selector" in md and "val-step100" in md and "regret" in md
    plain = protocol.run(copy.deepcopy(models[400]).eval(), fakes.FakePools(fakes.default_pools()),
                         {**cfg, "compare_checkpoints": False, "figures": False}, tmp_path / "plain", "cpu")
    assert "aucp_selector" not in plain
    assert {k: v for k, v in rep["summary"].items() if not k.startswith("aucp_")} == {
        k: v for k, v in plain["summary"].items() if not k.startswith("aucp_")}
