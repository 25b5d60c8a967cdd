"""The refiner protocol: honest labels (AUCp never reads a label; transductive labels only for scoring), the
selection rule derived from the run's checkpoints, paired differences, steps sweep, report files."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from meddiff.data.image_folder import ImageFolderAnomalyDataModule
from meddiff.data.synthetic.image_folder import write_synthetic_image_folder
from meddiff.diffusion import NoiseSchedule
from meddiff.models.coarse_gan import CoarseGenerator
from meddiff.models.refiner import RefinerDiffusion
from meddiff.nets import build_net
from meddiff.nets.gan import BrainomalyGenerator, PatchCritic
from meddiff.protocols import refiner as protocol
from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY

OPTS = dict(n_boot=50, steps=[1, 2], figures=False, compare_checkpoints=True)


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
                           residual_scale=0.5, num_steps=2, ema_decay=0.0).eval()
    return gan, ref


def flipped_copy(root, tmp_path):
    """The same images with every label flipped (pos <-> neg folders of the mixed set and of test)."""
    new = tmp_path / "flipped"
    shutil.copytree(root, new)
    for a, b in (("train/pos", "train/neg_mixed"), ("test/pos", "test/neg")):
        (new / a).rename(new / "swap")
        (new / b).rename(new / a)
        (new / "swap").rename(new / b)
    return new


def test_aucp_reads_no_label_and_auroc_does(data_root, models, tmp_path):
    """Flip every label: AUCp (both protocols, every scorer) must not move; AUROCs must mirror.

    This is the test that fails if the AUCp path scores with labels (e.g. only the test positives as the
    unlabelled side, or the mixed set's folder labels)."""
    _, ref = models
    opts = protocol.options_from(protocol.RefinerEvalOptions, OPTS, "eval")
    a = protocol.evaluate(ref, datamodule(data_root), opts, torch.device("cpu"), None)
    b = protocol.evaluate(ref, datamodule(flipped_copy(data_root, tmp_path)), opts, torch.device("cpu"), None)
    for name in ("coarse", "refined"):
        for part in ("transductive", "inductive"):
            assert a["aucp"][name][part]["aucp"] == b["aucp"][name][part]["aucp"]
            assert a["aucp"][name][part]["labels_used"] == protocol.LABELS_NONE
        for part in ("inductive", "transductive"):
            assert a[part]["image"][name]["auroc"] == pytest.approx(1 - b[part]["image"][name]["auroc"])


def test_transductive_scores_the_mixed_set_inductive_the_test_set(data_root, models):
    _, ref = models
    d = datamodule(data_root)
    opts = protocol.options_from(protocol.RefinerEvalOptions, OPTS, "eval")
    rep = protocol.evaluate(ref, d, opts, torch.device("cpu"), None)
    assert rep["transductive"]["n"] == len(d.pool_dataset("mixed"))
    assert rep["inductive"]["n"] == len(d.pool_dataset("test"))
    assert "test/" in rep["inductive"]["labels_used"] and "only here" in rep["transductive"]["labels_used"]
    assert rep["aucp"]["refined"]["transductive"]["known_healthy_pool"] == "known_healthy_val"
    assert rep["aucp"]["refined"]["transductive"]["n_unlabelled"] == len(d.pool_dataset("mixed"))


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
    other.eval()
    rep2 = protocol.run(other, d, {**OPTS, "checkpoint_dir": str(ckdir), "compare_checkpoints": False,
                                   "steps": []}, tmp_path / "out2", "cpu")
    assert rep2["selection"]["rule"] == "labelled_validation" and rep2["selection"]["needs_labels"] is True
    assert set(rep2["selection"]["matched_rules"]) == {"labelled_validation", "last"}
    rep3 = protocol.run(ref, d, {**OPTS, "checkpoint_dir": str(tmp_path / "none"), "steps": []}, tmp_path / "o3",
                        "cpu")
    assert rep3["selection"]["rule"].startswith("unknown")


def test_full_report_has_baselines_paired_cis_steps_and_files(data_root, models, tmp_path):
    _, ref = models
    rep = protocol.run(ref, datamodule(data_root), {**OPTS, "figures": True}, tmp_path, "cpu")
    ind = rep["inductive"]
    assert {"coarse", "refined", "baseline_mean_intensity", "baseline_nearest_healthy",
            "baseline_mean_healthy"} <= set(ind["image"])
    lo, hi = ind["refined_minus_coarse"]["ci"]
    assert lo <= ind["refined_minus_coarse"]["difference"] <= hi
    assert ind["model_minus_best_baseline"]["model"] == "refined"
    assert "subject" in ind and "refined" in ind["subject"]
    assert [r["steps"] for r in rep["steps"]] == [0, 1, 2] and rep["steps"][0]["estimate"] == "coarse"
    assert all(r["sec_per_image"] > 0 for r in rep["steps"])
    assert rep["refinement"]["num_steps"] == 2 and "not a choice" in rep["steps_note"]
    assert {"inductive_auroc", "transductive_auroc", "aucp_transductive", "refined_minus_coarse"} <= set(rep["summary"])
    assert (tmp_path / "refiner_report.md").is_file() and (tmp_path / "roc.png").is_file()
    assert "Labels used" in (tmp_path / "refiner_report.md").read_text()


def test_coarse_model_is_a_complete_detector(data_root, models, tmp_path):
    gan, _ = models
    rep = protocol.run(gan, datamodule(data_root), OPTS, tmp_path, "cpu")
    assert rep["primary_estimate"] == "coarse" and "steps" not in rep
    assert "refined_minus_coarse" not in rep["inductive"]
    assert rep["summary"]["inductive_auroc"] == rep["inductive"]["image"]["coarse"]["auroc"]


def test_paired_difference_known_cases():
    y = np.r_[np.zeros(20), np.ones(20)]
    good = np.r_[np.zeros(20), np.ones(20)] + np.linspace(0, 0.1, 40)
    d = protocol.paired_auroc_difference(good, good, y, n_boot=100)
    assert d["difference"] == 0 and d["ci"] == (0.0, 0.0)
    d = protocol.paired_auroc_difference(good, -good, y, n_boot=100)
    assert d["difference"] == pytest.approx(1.0) and d["ci"] == (pytest.approx(1.0), pytest.approx(1.0))
    rng = np.random.default_rng(0)
    a, b = y + rng.normal(0, 1, 40), y + rng.normal(0, 3, 40)
    d = protocol.paired_auroc_difference(a, b, y, n_boot=500)
    assert d["ci"][0] <= d["difference"] <= d["ci"][1]


def test_any_anomaly_model_gets_aucp_and_both_protocols(data_root, tmp_path):
    from torch import nn

    from meddiff.anomaly.scoring import ScoringConfig

    class Blur(nn.Module):
        """A 'healthy estimate' by 3x3 average: any model with reconstruct + scoring_cfg."""

        scoring_cfg = ScoringConfig()

        def reconstruct(self, batch):
            return torch.nn.functional.avg_pool2d(batch["image"], 3, 1, 1)

    rep = protocol.run(Blur(), datamodule(data_root), {**OPTS, "steps": []}, tmp_path, "cpu")
    assert rep["primary_estimate"] == "model" and "model" in rep["aucp"]
    assert rep["summary"]["inductive_auroc"] == rep["inductive"]["image"]["model"]["auroc"]
