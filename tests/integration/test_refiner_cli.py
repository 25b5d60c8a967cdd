"""End to end, as a user runs it: demo_coarse -> demo_refiner (tiny, by CLI overrides) -> reports; the refiner's
checkpoint evaluates with meddiff.eval after the coarse run is gone; both stages train under DDP (2 CPU processes)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytestmark = pytest.mark.slow


def coarse_args(tmp_path) -> list[str]:
    return [
        "experiment=demo_coarse",
        f"data.root={tmp_path}/folder",
        "data.image_size=32",
        "data.synthetic.image_size=32",
        "data.synthetic.n_known_healthy=6",
        "data.synthetic.n_mixed=[3,3]",
        "data.synthetic.n_val=[2,2]",
        "data.synthetic.n_test=[2,2]",
        "data.synthetic.slices_per_subject=2",
        "data.synthetic.min_lesion_px=2",
        "data.val_fraction=0.34",
        "model.num_iters=6",
        "model.decay_iters=2",
        "trainer.val_check_interval=3",
        "net.generator.conv_dim=8",
        "net.generator.num_res_blocks=1",
        "net.critic.conv_dim=8",
        "net.critic.num_layers=3",
        "eval.n_boot=20",
    ]


def refiner_args(tmp_path) -> list[str]:
    return [
        "experiment=demo_refiner",
        f"data.root={tmp_path}/folder",
        "data.image_size=32",
        "data.val_fraction=0.34",
        f"model.coarse_ckpt={tmp_path}/coarse",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "net.channels=[8,16]",
        "net.attention_levels=[false,true]",
        "net.norm_num_groups=8",
        "net.num_head_channels=8",
        "model.sampling.steps=2",
        "model.val_sampling={steps:1}",
        "eval.n_boot=20",
        "eval.steps=[1,2]",
    ]


def test_demo_refiner_two_stages_and_self_contained_eval(run, tmp_path):
    run("meddiff.train", *coarse_args(tmp_path), f"hydra.run.dir={tmp_path}/coarse")
    coarse = json.loads((tmp_path / "coarse/report.json").read_text())
    assert coarse["protocol"] == "refiner" and coarse["model"] == "CoarseGenerator"
    assert coarse["selection"]["rule"] in ("aucp", "last")  # derived from the weights; AUCp is the monitor
    ckpt = torch.load(tmp_path / "coarse/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["iterations"]) == 6 and ckpt["global_step"] == 9  # 6 critic + 3 generator steps
    # every validation's weights kept: the AUCp-selector measurement over them (both stages)
    assert coarse["aucp_selector"]["n_checkpoints"] >= 2 and "aucp" in coarse["aucp_selector"]["regret"]

    run("meddiff.train", *refiner_args(tmp_path), f"hydra.run.dir={tmp_path}/refiner")
    rep = json.loads((tmp_path / "refiner/report.json").read_text())
    assert rep["model"] == "RefinerDiffusion" and rep["primary_estimate"] == "refined"
    assert rep["refinement"]["coarse_source"]["rule"] in ("aucp", "last")
    assert set(rep["checkpoints"]) == {"aucp", "labelled_validation", "last"}
    assert rep["checkpoints"]["labelled_validation"]["needs_labels"] is True
    assert [r["steps"] for r in rep["steps"]] == [0, 1, 2]
    assert {"inductive_auroc", "transductive_auroc", "aucp_transductive", "refined_minus_coarse"} <= set(rep["summary"])
    # the honest protocol: subject-clustered CIs, the best baseline chosen on the labelled validation split, the
    # baselines' references from the known-healthy training images, the headline with the configured steps
    assert rep["resampled"] == {"inductive": "subjects", "transductive": "subjects"}
    best = rep["selection"]["best_baseline"]
    assert best["pools"] == ["labelled_val"] and best["chosen_on"] == "validation"
    assert rep["inductive"]["model_minus_best_baseline"]["baseline_chosen_on"] == "validation"
    assert rep["selection"]["baselines"]["built_from"] == "known_healthy"
    assert rep["headline_num_steps"] == 2 and "test" not in rep["selection"]["pools_read"]
    # the synthetic set writes lesion masks (val/ and test/anomaly_mask): pixel metrics, Dice at the val threshold
    assert "dice_at_val_threshold" in rep["pixel"]["refined"] and "pixel_auroc" in rep["summary"]
    sel = rep["aucp_selector"]
    assert sel["n_checkpoints"] >= 2 and all(r["val_auroc"] is not None for r in sel["checkpoints"])
    assert any(r["is_evaluated_model"] for r in sel["checkpoints"])
    assert (tmp_path / "refiner/aucp_selector.png").is_file()
    for name in ("refiner_report.md", "roc.png", "checkpoints/last.ckpt", "report.json", "metrics.csv"):
        assert (tmp_path / "refiner" / name).is_file(), name
    metrics = (tmp_path / "refiner/csv/metrics.csv").read_text()
    assert "val/aucp" in metrics and "val/auroc" in metrics and "val/loss" in metrics

    # the refiner checkpoint carries the generator: evaluation needs no coarse run
    shutil.rmtree(tmp_path / "coarse")
    best = rep["checkpoint"]
    run("meddiff.eval", f"ckpt_path={best}", f"hydra.run.dir={tmp_path}/eval", "+eval.steps=[]",
        "+eval.compare_checkpoints=false")
    again = json.loads((tmp_path / "eval/report.json").read_text())
    assert again["summary"]["inductive_auroc"] == pytest.approx(rep["summary"]["inductive_auroc"], abs=1e-9)
    assert again["summary"]["aucp_transductive"] == pytest.approx(rep["summary"]["aucp_transductive"], abs=1e-9)


def test_both_stages_under_ddp_on_two_cpu_processes(run, tmp_path):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "evaluate=false",
           "callbacks.labelled_checkpoint=null"]
    args = coarse_args(tmp_path) + ddp + ["trainer.strategy=ddp_find_unused_parameters_true",
                                          "trainer.val_check_interval=6"]
    run("meddiff.train", *args, f"hydra.run.dir={tmp_path}/coarse")
    ckpt = torch.load(tmp_path / "coarse/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["iterations"]) == 6
    run("meddiff.train", *refiner_args(tmp_path), *ddp, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/refiner")
    ckpt = torch.load(tmp_path / "refiner/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and float(ckpt["state_dict"]["residual_std"]) > 0  # estimated across ranks
