"""End to end: `meddiff.train experiment=demo_denoise` (tiny) -> checkpoint -> denoise report; `meddiff.eval`
re-evaluates the checkpoint through the eval_protocol dispatch with the same numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from meddiff.metrics import denoisers

pytestmark = pytest.mark.slow

TINY = [
    "experiment=demo_denoise",
    "data.path=data/tiny_p16.h5",
    "data.synthetic_volumes=4",
    "data.synthetic_shape=[32,32,4]",
    "data.image_size=16",
    "data.stride=16",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
    "data.batch_size=16",
    "net.channels=[8,16]",
    "net.attention_levels=[false,false]",
    "net.norm_num_groups=8",
    "net.num_head_channels=8",
    "schedule.num_train_timesteps=20",
    "schedule.beta_start=0.005",
    "schedule.beta_end=0.4",
    "model.sampling.steps=5",
    "model.val_sampling.steps=2",
    "trainer.max_epochs=1",
    "eval.max_patches=8",
    "eval.ddim_steps=[2,5]",
    "eval.supervised.steps=3",
    "eval.val_patches=4",
    "eval.nlm_h_factors=[0.8]",
    "eval.figures=false",
    "eval.write_nifti=false",
    "eval.progress=false",
]


def test_demo_denoise_trains_and_evaluates_via_both_entry_points(run, tmp_path):
    run_dir = tmp_path / "run"
    run("meddiff.train", *TINY, f"hydra.run.dir={run_dir}")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["protocol"] == "denoise"
    res = report["results"]["0.1"]
    bm3d = {"bm3d"} if denoisers.available() else set()  # an optional extra: used when installed (not in CI)
    assert set(res) == {"noisy", "nlm", "supervised", "ddim_2", "ddim_5", "ddpm"} | bm3d
    assert report["bm3d"]["status"] == ("used" if bm3d else "absent: optional extra bm3d not installed "
                                        "(pip install meddiff[denoise])")
    assert all(math.isfinite(res[m]["psnr"]) and 0 < res[m]["ssim"] <= 1 for m in res)
    assert res["nlm"]["psnr"] > res["noisy"]["psnr"]  # NLM at the validation-chosen h removes noise
    assert report["speed"][-1]["sampler"] == "ddpm" and report["speed"][-1]["steps"] == 20
    bar = report["quality_bar"]["0.1"]  # choices on validation, the margin paired over the test slices
    assert bar["chosen_on"] == "validation" and bar["best_ddim_le_50"] in ("ddim_2", "ddim_5")
    assert bar["best_classical"] in ("noisy", "nlm", *bm3d) and "diff_ci" in bar["margins"]["best_classical"]["vsi"]
    assert "psnr/ddim_5@0.1" in report["summary"]
    assert list((run_dir / "images" / "sigma0.1").glob("*.tif"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["meddiff_config"]["model"]["_target_"].endswith("ConditionalDiffusion")
    assert ckpt["meddiff_config"]["eval"]["supervised"]["net"]["in_channels"] == 2  # ${net}, resolved and stored

    # the checkpoint alone is enough: meddiff.eval dispatches to the denoise protocol (meddiff.protocols.denoise)
    eval_dir = tmp_path / "eval"
    run("meddiff.eval", f"ckpt_path={report['checkpoint']}", f"hydra.run.dir={eval_dir}",
        "+eval.supervised.cache_dir=" + str(run_dir / "baselines"))
    again = json.loads((eval_dir / "report.json").read_text())
    assert again["checkpoint"] == report["checkpoint"] and again["supervised"]["cached"] is True
    for m in res:  # same weights, seeded samples, cached baseline: the same numbers
        assert again["results"]["0.1"][m]["psnr"] == pytest.approx(res[m]["psnr"], abs=1e-4), m
