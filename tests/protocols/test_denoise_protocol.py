"""Denoising protocol, end to end on small HDF5 patch data: metrics plumbing, NLM and BM3D baselines, outputs,
supervised cache, errors, and the choices and verdicts that must be made on validation (with a validation split
that disagrees with test)."""

from __future__ import annotations

import json
import math

import h5py
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from meddiff.data.modules.hdf5_patches import HDF5PatchDataModule
from meddiff.data.preprocess.nifti_patches import save_as_hdf5
from meddiff.data.synthetic.mr_heads import write_synthetic_volumes
from meddiff.diffusion import NoiseSchedule
from meddiff.diffusion.sampling import SamplingConfig
from meddiff.errors import ConfigError
from meddiff.metrics.image_quality import image_scores
from meddiff.models.conditional import ConditionalDiffusion
from meddiff.nets import build_net
from meddiff.patches import stitch
from meddiff.protocols.denoise import nlm_denoise, run

NET = dict(in_channels=2, out_channels=1, channels=[8, 16], attention_levels=[False, False], num_res_blocks=1,
           norm_num_groups=8, num_head_channels=8)


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    d = tmp_path_factory.mktemp("denoise")
    vols = write_synthetic_volumes(d / "nifti", n=4, shape=(32, 32, 4), seed=3)
    return save_as_hdf5(vols, "ph", d, image_size=16, stride=16, progress=False)


def make_dm(h5, noise_std=0.1):
    dm = HDF5PatchDataModule(h5, noise_std=noise_std, val_fraction=0.25, test_fraction=0.25, batch_size=8)
    dm.setup()
    return dm


def small_cfg(**kw):
    cfg = dict(ddim_steps=[2, 3], ddpm=True, batch_size=8, nlm_h_factors=[0.5, 1.0], val_patches=6, bm3d=False,
               supervised=dict(steps=2, net=NET), n_slices_out=2, progress=False)
    cfg.update(kw)
    return cfg


class NoisyOracle(torch.nn.Module):
    """A stand-in 'model' whose reconstruction returns its input: every diffusion method must score like `noisy`."""

    image_channels = cond_channels = 1

    def __init__(self):
        super().__init__()
        self.schedule = NoiseSchedule(10)
        self.sampling = SamplingConfig()
        self.calls = []

    def reconstruct(self, batch, sampling=None):
        self.calls.append((sampling.sampler, sampling.steps))
        return batch["cond"].clamp(-1, 1)


def test_methods_are_scored_on_the_same_patches_with_the_given_dynamic_range(h5, tmp_path):
    dm = make_dm(h5)
    oracle = NoisyOracle()
    cfg = small_cfg(nlm=False, supervised={"enabled": False}, write_nifti=False, write_tiff=False, figures=False)
    rep = run(oracle, dm, cfg, tmp_path / "a", "cpu")
    res = rep["results"]["0.1"]
    assert rep["methods"] == ["noisy", "ddim_2", "ddim_3", "ddpm"]
    assert ("ddim", 2) in oracle.calls and ("ddpm", None) in oracle.calls
    for m in ("ddim_2", "ddim_3", "ddpm"):
        for k in ("psnr", "ssim", "mae", "vsi", "slice_psnr", "slice_vsi"):
            assert res[m][k] == pytest.approx(res["noisy"][k], abs=1e-6)
    # the noisy PSNR is the mean over the test patches, recomputed here independently
    ds = dm.noisy_dataset("test")
    items = [ds[i] for i in range(len(ds))]
    clean = torch.stack([it["image"] for it in items])
    noisy = torch.stack([it["cond"] for it in items]).clamp(-1, 1)
    direct = image_scores(clean, noisy)
    assert res["noisy"]["psnr"] == pytest.approx(direct["psnr"].mean().item(), abs=1e-4)
    assert res["noisy"]["vsi"] == pytest.approx(direct["vsi"].mean().item(), abs=1e-5) and res["noisy"]["vsi"] < 1
    assert rep["n_patches"] == len(ds)
    assert rep["sampler_spread"]["0.1"]["reference"] == "ddim_2"
    assert rep["sampler_spread"]["0.1"]["ddpm"] == 0.0  # identical outputs
    # one test volume: the paired margin over the best classical baseline resamples slices; model == noisy: 0
    margin = rep["quality_bar"]["0.1"]["margins"]["best_classical"]["psnr"]
    assert margin["baseline"] == "noisy" and margin["by"] == "slice" and margin["n_slices"] == 4
    assert margin["diff"] == 0.0 and margin["diff_ci"] == [0.0, 0.0]
    assert rep["quality_bar"]["0.1"]["best_ddim_le_50"] == "ddim_2"  # a tie goes to the fewest steps
    half = run(oracle, dm, {**cfg, "dynamic_range": 1.0}, tmp_path / "b", "cpu")["results"]["0.1"]
    assert half["noisy"]["psnr"] == pytest.approx(res["noisy"]["psnr"] - 20 * math.log10(2), abs=1e-3)
    masked = run(oracle, dm, {**cfg, "mask": "foreground"}, tmp_path / "c", "cpu")["results"]["0.1"]
    assert masked["noisy"]["psnr"] != pytest.approx(res["noisy"]["psnr"], abs=1e-3)


def test_run_writes_report_tables_figures_and_images(h5, tmp_path):
    torch.manual_seed(0)
    dm = make_dm(h5)
    model = ConditionalDiffusion(net=build_net(NET), schedule=NoiseSchedule(10, beta_start=0.01, beta_end=0.5),
                                 sampling={"steps": 2})
    run(model, dm, small_cfg(noise_levels=[0.1, 0.2]), tmp_path, "cpu")
    for name in ("report.json", "metrics.csv", "results.csv", "speed.csv", "psnr_vs_noise.png", "ssim_vs_noise.png",
                 "mae_vs_noise.png", "vsi_vs_noise.png", "denoise_examples.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["methods"] == ["noisy", "nlm", "supervised", "ddim_2", "ddim_3", "ddpm"]  # bm3d=false
    assert saved["bm3d"] == {"status": "disabled (eval.bm3d=false)"}
    assert set(saved["results"]) == {"0.1", "0.2"}
    assert saved["nlm"]["0.1"]["chosen_on"] == "validation"
    assert saved["nlm"]["0.1"]["h_factor"] in (0.5, 1.0)
    assert list(saved["quality_bar"]) == ["0.1"]  # only the trained level is held to the bar
    bar = saved["quality_bar"]["0.1"]
    assert {"best_ddim_le_50", "ddim_within_0.5db_of_ddpm", "best_classical", "margin_psnr", "margin_vsi"} <= set(bar)
    assert bar["chosen_on"] == "validation" and bar["model_method"] == "ddpm"
    # the supervised U-Net is fitted on the training pairs, every other choice made on validation
    assert saved["selection"]["splits_read"] == ["train", "val"] and saved["supervised"]["chosen_on"] == "train"
    assert saved["selection"]["choices"]["supervised_weights"]["chosen_on"] == "train"
    assert saved["selection"]["choices"]["nlm_h_factor@0.2"]["chosen_on"] == "validation"
    sup = bar["margins"]["supervised"]["ssim"]  # the learned baseline gets its own paired margin
    assert sup["baseline"] == "supervised" and sup["diff_ci"][0] <= sup["diff"] <= sup["diff_ci"][1]
    assert list(saved["validation"]) == ["0.1"] and saved["validation"]["0.1"]["n_patches"] == 6
    assert all(isinstance(v, float) for v in saved["summary"].values())
    assert "psnr/ddpm@0.1" in saved["summary"] and "psnr/nlm@0.2" in saved["summary"] and "vsi/nlm@0.2" in saved[
        "summary"]
    assert "bar/margin_psnr@0.1" in saved["summary"]
    speed = [(r["method"], r["steps"]) for r in saved["speed"] if r["noise_std"] == 0.1]
    assert speed == [("noisy", None), ("nlm", None), ("supervised", None), ("ddim_2", 2), ("ddim_3", 3), ("ddpm", 10)]
    assert all(r["sec_per_patch"] > 0 for r in saved["speed"] if r["method"] != "noisy")
    assert saved["sampler_spread"]["0.1"]["ddpm"] > 0  # an untrained model: samples depend on the sampler
    rows = (tmp_path / "results.csv").read_text().splitlines()  # one row per level and method
    assert len(rows) == 1 + 2 * 6 and rows[0].startswith("noise_std,method,psnr") and ",vsi," in rows[0]
    rows = (tmp_path / "metrics.csv").read_text().splitlines()  # the skeleton's: one row per summary value
    assert rows[0] == "metric,value" and len(rows) == 1 + len(saved["summary"])
    # higher noise: the noisy input gets worse
    assert saved["results"]["0.2"]["noisy"]["psnr"] < saved["results"]["0.1"]["noisy"]["psnr"] - 3

    # TIFF: pages clean, noisy, methods...; the clean page is the original slice, stitched back exactly
    tifs = sorted((tmp_path / "images" / "sigma0.1").glob("*.tif"))
    assert len(tifs) == 2
    with tifffile.TiffFile(tifs[0]) as tf:
        stack = tf.asarray()
        labels = tf.imagej_metadata["Labels"]
    assert labels == ["clean", *saved["methods"]] and stack.shape == (7, 32, 32)
    v, s = (int(p[-3:]) for p in tifs[0].stem.split("_"))
    info = dm.info
    rows_vs = np.nonzero((info.coords[:, 0] == v) & (info.coords[:, 1] == s))[0]
    with h5py.File(h5, "r") as f:
        patches = f["patches"][np.sort(rows_vs)]
    original = stitch(patches, info.coords[np.sort(rows_vs)], info.slice_shapes)[(v, s)]
    np.testing.assert_array_equal(stack[0], original)
    nii = nib.load(tmp_path / "images" / "sigma0.1" / f"vol{v:03d}_ddpm.nii.gz")
    assert nii.shape == (32, 32, 2)

    # the supervised baseline is cached in the run dir and reused
    assert saved["supervised"]["cached"] is False and saved["supervised"]["steps"] == 2
    again = run(model, dm, small_cfg(ddim_steps=[2], ddpm=False, write_tiff=False, write_nifti=False, figures=False),
                tmp_path, "cpu")
    assert again["supervised"]["cached"] is True
    assert again["supervised"]["cache"] == saved["supervised"]["cache"]


def test_bad_model_or_steps_raise_config_errors(h5, tmp_path):
    dm = make_dm(h5)
    with pytest.raises(ConfigError, match="denoise"):
        run(torch.nn.Linear(1, 1), dm, small_cfg(), tmp_path, "cpu")
    with pytest.raises(ConfigError, match=r"ddim_steps \[50\] exceed the model's T=10"):
        run(NoisyOracle(), dm, small_cfg(ddim_steps=[50]), tmp_path, "cpu")


def test_protocol_reads_data_through_the_public_api_only(h5, tmp_path):
    class NoPublicApi:  # what the protocol used to probe: private state of one DataModule
        noise_std = 0.1
        make_dataset = HDF5PatchDataModule.noisy_dataset

    with pytest.raises(ConfigError, match=r"noisy_dataset.*NoPublicApi lacks \['noisy_dataset', 'split_names'"):
        run(NoisyOracle(), NoPublicApi(), small_cfg(), tmp_path, "cpu")

    class PublicApiOnly:  # a DataModule giving only what DenoiseData names is enough
        def __init__(self, dm):
            self.noise_std = dm.noise_std
            self.noisy_dataset, self.split_names, self.train_dataloader = (
                dm.noisy_dataset, dm.split_names, dm.train_dataloader)

    cfg = small_cfg(ddpm=False, ddim_steps=[2], supervised={"enabled": False}, write_nifti=False, write_tiff=False,
                    figures=False)
    via_api = run(NoisyOracle(), PublicApiOnly(make_dm(h5)), cfg, tmp_path / "api", "cpu")["results"]["0.1"]
    via_dm = run(NoisyOracle(), make_dm(h5), cfg, tmp_path / "dm", "cpu")["results"]["0.1"]
    assert via_api["noisy"]["psnr"] == via_dm["noisy"]["psnr"] and via_api["nlm"]["ssim"] == via_dm["nlm"]["ssim"]


def test_protocol_leaves_the_model_as_it_found_it(h5, tmp_path):
    torch.manual_seed(0)
    model = ConditionalDiffusion(net=build_net(NET), schedule=NoiseSchedule(10, beta_start=0.01, beta_end=0.5),
                                 sampling={"steps": 2})
    model.train()
    list(model.net.modules())[2].eval()  # a mixed state must survive too
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    reconstruct = model.reconstruct

    def spy(*args, **kwargs):
        seen.append(model.training)
        return reconstruct(*args, **kwargs)

    model.reconstruct = spy
    cfg = small_cfg(ddpm=False, ddim_steps=[2], nlm=False, supervised={"enabled": False}, write_nifti=False,
                    write_tiff=False, figures=False)
    run(model, make_dm(h5), cfg, tmp_path, "cpu")
    assert seen and not any(seen)  # evaluated in eval mode...
    assert [m.training for m in model.modules()] == flags  # ...and handed back in the mode it came in
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ BM3D
def test_bm3d_runs_when_installed_on_the_capped_slices_with_the_known_sigma(h5, tmp_path):
    pytest.importorskip("bm3d")
    from meddiff.metrics.denoisers import bm3d_denoise_batch

    dm = make_dm(h5)
    cfg = small_cfg(ddim_steps=[2], ddpm=False, nlm=False, supervised={"enabled": False}, bm3d=True,
                    bm3d_max_slices=1, val_patches=2, write_nifti=False, write_tiff=False, figures=False)
    rep = run(NoisyOracle(), dm, cfg, tmp_path, "cpu")
    assert rep["methods"] == ["noisy", "bm3d", "ddim_2"]
    assert rep["bm3d"]["status"] == "used" and rep["bm3d"]["n_slices"] == 1 and rep["bm3d"]["of_slices"] == 4
    res = rep["results"]["0.1"]
    assert res["bm3d"]["n_slices"] == 1 and res["bm3d"]["n_patches"] == 4 and res["noisy"]["n_patches"] == 16
    # the same patches, denoised here directly with sigma = the known level: the same mean PSNR
    (v, s), = rep["bm3d"]["slices"]
    ds = dm.noisy_dataset("test")
    rows = [i for i in range(len(ds)) if tuple(int(c) for c in ds.coords[i, :2]) == (v, s)]
    clean = torch.stack([ds[i]["image"] for i in rows])
    den = torch.from_numpy(bm3d_denoise_batch(torch.stack([ds[i]["cond"] for i in rows]).numpy(), 0.1))
    assert res["bm3d"]["psnr"] == pytest.approx(image_scores(clean, den)["psnr"].mean().item(), abs=1e-4)
    noisy = torch.stack([ds[i]["cond"] for i in rows]).clamp(-1, 1)
    before = image_scores(clean, noisy)  # 16 px patches are small for BM3D's 8 px blocks: a modest gain
    assert res["bm3d"]["psnr"] > before["psnr"].mean().item() + 0.3
    assert res["bm3d"]["ssim"] > before["ssim"].mean().item() + 0.01
    speed = {r["method"]: r for r in rep["speed"]}
    assert speed["bm3d"]["sec_per_patch"] > 0 and speed["bm3d"]["n_patches"] == 4
    # BM3D wins on validation: the model is compared with it on the one slice BM3D ran on, both methods alike
    on = rep["bm3d"]["on_its_slices"]["0.1"]  # every method on the slice BM3D ran on, for a like-for-like table
    assert on["bm3d"]["psnr"] == pytest.approx(res["bm3d"]["psnr"])
    assert on["noisy"]["psnr"] == pytest.approx(before["psnr"].mean().item(), abs=1e-4)
    bar = rep["quality_bar"]["0.1"]
    assert bar["best_classical"] == "bm3d" and bar["margins"]["best_classical"]["psnr"]["n_slices"] == 1


def test_bm3d_absent_is_reported_not_fatal(h5, tmp_path, monkeypatch, capsys):
    from meddiff.metrics import denoisers

    monkeypatch.setattr(denoisers, "available", lambda: False)
    cfg = small_cfg(ddim_steps=[2], ddpm=False, supervised={"enabled": False}, bm3d=True, write_nifti=False,
                    write_tiff=False, figures=False)
    rep = run(NoisyOracle(), make_dm(h5), cfg, tmp_path, "cpu")
    assert rep["methods"] == ["noisy", "nlm", "ddim_2"]
    assert rep["bm3d"]["status"].startswith("absent: optional extra bm3d not installed")
    assert "absent: optional extra bm3d" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ on validation
class ValDisagreesWithTest:
    """A DataModule whose validation patches carry no noise, while test patches carry the full level.

    Every choice then differs between the splits: on validation the smallest NLM strength, the identity (``noisy``
    and the identity sampler) and the sampler that does not smooth win; on test, smoothing wins. A protocol that
    chooses on test reports test's choices. It also counts how often each test patch is read.
    """

    def __init__(self, dm):
        self.dm = dm
        self.noise_std = dm.noise_std
        self.split_names, self.train_dataloader = dm.split_names, dm.train_dataloader
        self.test_reads: list[int] = []

    def noisy_dataset(self, split, noise_std=None):
        if split == "val":
            return self.dm.noisy_dataset("val", 0.0)
        ds = self.dm.noisy_dataset(split, noise_std)
        return _CountingDataset(ds, self.test_reads) if split == "test" else ds


class _CountingDataset:
    def __init__(self, ds, reads):
        self._ds, self._reads = ds, reads

    def __len__(self):
        return len(self._ds)

    def __getitem__(self, i):
        self._reads.append(int(i))
        return self._ds[i]

    def __getattr__(self, name):
        return getattr(self._ds, name)


class SmoothingSampler(torch.nn.Module):
    """DDIM with 2 steps and the DDPM chain smooth (NLM, h = 1.5 sigma); DDIM with 3 steps returns its input."""

    image_channels = cond_channels = 1

    def __init__(self):
        super().__init__()
        self.schedule = NoiseSchedule(10)
        self.sampling = SamplingConfig()

    def reconstruct(self, batch, sampling=None):
        cond = batch["cond"]
        if sampling.sampler == "ddpm" or sampling.steps == 2:
            return torch.from_numpy(nlm_denoise(cond.numpy(), 0.1, 1.5))
        return cond.clamp(-1, 1)


def test_every_choice_and_verdict_is_made_on_validation(h5, tmp_path):
    dm = HDF5PatchDataModule(h5, noise_std=0.1, val_fraction=0.25, test_fraction=0.5, batch_size=8)
    dm.setup()
    data = ValDisagreesWithTest(dm)
    cfg = small_cfg(nlm_h_factors=[0.2, 0.8], val_patches=8, supervised={"enabled": False}, write_nifti=False,
                    write_tiff=False, figures=False)
    rep = run(SmoothingSampler(), data, cfg, tmp_path, "cpu")
    res, bar, nlm = rep["results"]["0.1"], rep["quality_bar"]["0.1"], rep["nlm"]["0.1"]
    # what test would have chosen (the premise: each choice differs between the splits)
    assert res["ddim_2"]["psnr"] > res["ddim_3"]["psnr"] + 3 and res["nlm"]["psnr"] > res["noisy"]["psnr"] + 3
    test_gap = res["ddpm"]["psnr"] - res["ddim_3"]["psnr"]
    assert test_gap > 0.5
    # ... and what validation chose
    assert nlm["h_factor"] == 0.2 and nlm["chosen_on"] == "validation"  # test prefers 0.8
    assert bar["chosen_on"] == "validation" and bar["n_val_patches"] == 8
    assert bar["best_ddim_le_50"] == "ddim_3"  # test: ddim_2
    assert bar["ddim_within_0.5db_of_ddpm"] is True  # validation gap < 0; on test the gap is > 0.5 dB
    assert bar["val_ddpm_minus_best_ddim_psnr_db"] < 0
    assert bar["test_ddpm_minus_best_ddim_psnr_db"] == pytest.approx(test_gap)
    assert bar["best_classical"] == "noisy"  # test: nlm
    # the margin is the paired test difference with that baseline; two test volumes: volumes are resampled
    m = bar["margins"]["best_classical"]["psnr"]
    assert (m["model"], m["baseline"], m["by"], m["n_subjects"], m["n_slices"]) == ("ddpm", "noisy", "volume", 2, 8)
    # a slice's value is the mean over its patches; every slice has 4 patches, so the margin is the patch means'
    assert m["diff"] == pytest.approx(res["ddpm"]["psnr"] - res["noisy"]["psnr"])
    assert m["diff_ci"][0] <= m["diff"] <= m["diff_ci"][1] and bar["beats_best_classical_psnr"] is True
    mae = bar["margins"]["best_classical"]["mae"]  # lower is better: positive still means the model is better
    assert mae["diff"] == pytest.approx(res["noisy"]["mae"] - res["ddpm"]["mae"]) and mae["diff"] > 0
    # the test patches were read once: each selected patch exactly once at the one level
    assert sorted(data.test_reads) == list(range(rep["n_patches"]))
    # every choice is recorded with its value and what it was chosen on, derived from the splits selection read
    record = rep["selection"]
    assert record["splits_read"] == ["val"] and record["chosen_on"] == "validation"
    assert {c["chosen_on"] for c in record["choices"].values()} == {"validation"}
    assert {k: c["value"] for k, c in record["choices"].items()} == {
        "nlm_h_factor@0.1": 0.2, "best_ddim_le_50@0.1": "ddim_3", "model_method@0.1": "ddpm",
        "best_classical@0.1": "noisy"}
