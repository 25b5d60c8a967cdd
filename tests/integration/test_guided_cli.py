"""End to end for seed 004: train the guided demo on synthetic ADNI volumes, then translate one volume with the
eval CLI (eval options override the model's translation settings)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

TINY = [
    "experiment=demo_adni",
    "data.task=tiny_s24",  # its own task dir, whatever the demo's task name and generator options
    "data.synthetic_n_per_class=2",
    "data.synthetic_shape=[24,24,24]",
    "data.image_size=16",
    "data.val_fraction=0.2",
    "data.test_fraction=0.4",
    "net.channels=[8,16]",
    "net.attention_levels=[false,false]",
    "net.norm_num_groups=8",
    "net.num_head_channels=8",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "model.sampling.t_start=100",
    "model.sampling.steps=2",
    "model.val_batches=1",
    "eval.n_boot=20",
    "eval.val_max_volumes=1",
    "eval.volume_plots=false",
    "logger=csv",
]


def test_train_demo_adni_then_translate_a_volume_with_the_eval_cli(run, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run("meddiff.train", *TINY, f"hydra.run.dir={run_dir}")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["protocol"] == "guided" and report["checkpoint"]
    vols = report["volumes"]
    assert len(vols) == 4  # 10 subjects, test_frac 0.4
    for v in vols.values():
        assert {"ssim", "psnr", "ms_ssim"} <= set(v["mean"]) and v["n_slices"] == 30
    model_cls = report["classification"]["model"]
    assert "auroc" in model_cls["AD_vs_CN"] and "auroc_ci" in model_cls["AD_vs_CN"]
    assert "AD_vs_CN" in report["classification"]["baseline_mean_intensity"]
    for name in ("slice_metrics.csv", "outlier_slices.csv", "ssim_all_volumes.png", "worst_slices.png"):
        assert (run_dir / name).is_file(), name

    # the CLI form: one volume, guidance scale and depth given on the command line
    volume = tmp_path / "data/adni_synthetic/tiny_s24/ad/ad0.nii.gz"
    assert volume.is_file()
    eval_dir = tmp_path / "eval"
    run(
        "meddiff.eval",
        f"ckpt_path={report['checkpoint']}",
        f"+eval.input={volume}",
        "+eval.input_label=AD",
        "+eval.guidance_scale=1.5",
        "+eval.t_start=50",
        f"hydra.run.dir={eval_dir}",
    )
    single = json.loads((eval_dir / "report.json").read_text())
    assert list(single["volumes"]) == ["ad0"] and single["volumes"]["ad0"]["class"] == "AD"
    assert single["translate"]["guidance_scale"] == 1.5 and single["translate"]["t_start"] == 50
    assert single["translate"]["num_steps"] == 2  # the rest comes from the checkpoint's model.translate
    assert (eval_dir / "slice_metrics.csv").read_text().count("\n") == 1 + 30
