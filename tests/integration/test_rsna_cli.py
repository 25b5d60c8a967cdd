"""RSNA CT end to end through the real CLI: the synthetic demo (data generated on the fly) and the pretrained path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

SUBTYPES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]


def _tiny_data(tmp_path) -> list[str]:
    """A few synthetic patients, 32 px, one epoch: seconds on a CPU."""
    return [
        f"data.root={tmp_path}/rsna", f"data.cache_dir={tmp_path}/cache", "data.synthetic=true",
        "data.synthetic_patients=12", "data.synthetic_slices_per_patient=5", "data.synthetic_image_size=64",
        "data.image_size=32", "data.batch_size=16", "data.num_workers=0", "data.cache_workers=0",
        "data.progress=false", "model.patch_size=16", "model.patch_stride=16", "trainer.max_epochs=1",
        "eval.n_boot=20", "eval.median_size=[1]", "eval.reduction=[mean,max]",
    ]


def _check_report(run_dir) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    img = report["image"]["model"]
    assert 0.0 <= img["auroc"] <= 1.0 and img["auroc_ci"][0] <= img["auroc"] <= img["auroc_ci"][1]
    per = report["image"]["per_subtype"]
    assert list(per) == SUBTYPES
    evaluated = [n for n, e in per.items() if "model" in e]
    assert evaluated, per
    for name, e in per.items():
        assert ("model" in e and "baseline_mean_intensity" in e) or "skipped" in e
        assert e["n_healthy"] > 0
        if "model" in e:
            assert e["n_pos"] > 0 and report["summary"][f"subtype_auroc_{name}"] == e["model"]["auroc"]
    pix = report["pixel"]["model"]
    assert 0.0 <= pix["auroc"] <= 1.0 and 0.0 < pix["auprc"] <= 1.0 and "dice_at_val_threshold" in pix
    assert "dice_at_val_threshold" in report["pixel"]["baseline_intensity"]
    assert report["selection"]["chosen_on"] == "validation" and "pixel_threshold" in report["selection"]
    for name in ("ct_segmentation.png", "subtype_auroc.png", "per_subtype.csv", "test_scores.csv", "roc.png"):
        assert (run_dir / name).is_file(), name
    return report


def test_demo_ct_generates_synthetic_rsna_and_reports_subtypes_and_pixels(run, tmp_path):
    run_dir = tmp_path / "demo_ct"
    run("meddiff.train", "experiment=demo_ct", "net=unet_tiny", *_tiny_data(tmp_path), f"hydra.run.dir={run_dir}")
    assert (tmp_path / "rsna" / "stage_2_train.csv").is_file()  # written by data.synthetic=true
    report = _check_report(run_dir)
    assert report["reconstruction"]["patch_size"] == 16 and report["reconstruction"]["t_start"] == 499
    n_rows = len((run_dir / "test_scores.csv").read_text().strip().splitlines()) - 1
    assert n_rows == report["n_test"]


def _tiny_pretrained(folder) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    unet.save_pretrained(folder)
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_pretrained_experiment_loads_a_local_unet2dmodel_and_fine_tunes_it(run, tmp_path):
    weights = _tiny_pretrained(tmp_path / "unet")
    run_dir = tmp_path / "pre"
    run("meddiff.train", "experiment=rsna_pddpm_pretrained", f"net.pretrained_dir={tmp_path}/unet", "trainer=cpu",
        *_tiny_data(tmp_path), "model.sampling.max_batch=64", f"hydra.run.dir={run_dir}")
    report = _check_report(run_dir)
    assert report["reconstruction"]["t_start"] == 258
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    cfg = ckpt["meddiff_config"]
    assert cfg["data"]["windows"] == ["brain", "subdural", "bone"] and cfg["schedule"]["prediction_type"] == "epsilon"
    # the net started from the saved weights: one short epoch of AdamW at 1e-4 moves them by < 1e-2
    tuned = ckpt["state_dict"]["net.unet.conv_in.weight"]
    assert tuned.shape == weights["conv_in.weight"].shape
    assert (tuned - weights["conv_in.weight"]).abs().max() < 1e-2
    assert not torch.equal(tuned, weights["conv_in.weight"])


def test_pretrained_experiment_without_a_folder_fails_clearly(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "meddiff.train", "experiment=rsna_pddpm_pretrained", f"data.root={tmp_path}/none",
         f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Missing mandatory value" in proc.stderr and "net.pretrained_dir" in proc.stderr

    # a folder that is not there: the net's own error says how to get the weights
    from hydra import compose, initialize_config_dir
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from meddiff.errors import ConfigError
    from meddiff.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train.yaml", overrides=["experiment=rsna_pddpm_pretrained", f"net.pretrained_dir={tmp_path}/no"])
    with pytest.raises(InstantiationException) as info:
        instantiate(cfg.net)
    assert isinstance(info.value.__cause__, ConfigError)
    assert "is missing or has no config.json" in str(info.value.__cause__)
    assert "huggingface-cli download google/ddpm-ema-celebahq-256" in str(info.value.__cause__)
