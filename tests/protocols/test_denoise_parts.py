"""Denoising protocol, its parts: test-slice selection, NLM, trained levels, options, ties on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.errors import ConfigError
from meddiff.metrics.image_quality import image_scores
from meddiff.protocols.denoise import DenoiseEvalOptions, nlm_denoise, select_slices, trained_noise_levels
from meddiff.protocols.denoise.select import best
from meddiff.utils.options import options_from


def test_select_slices_takes_whole_slices_evenly_spread():
    coords = np.array([(v, s, y, 0) for v in range(3) for s in range(5) for y in range(4)])
    assert len(select_slices(coords, None)) == 60
    pos = select_slices(coords, 8)
    picked = coords[pos]
    keys = {(int(v), int(s)) for v, s in picked[:, :2]}
    assert keys == {(0, 3), (2, 1)}  # middle slices of two equal bins of the 15, each complete
    assert len(pos) == 8
    pos = select_slices(coords, 13)  # 3 whole slices fit; never a partial one
    assert len(pos) == 12 and {(int(v), int(s)) for v, s in coords[pos][:, :2]} == {(0, 2), (1, 2), (2, 2)}
    one = np.array([(0, 0, y, 0) for y in range(10)])
    assert select_slices(one, 4).tolist() == [0, 1, 2, 3]
    uneven = np.array([(0, s, y, 0) for s in range(6) for y in range(1 if s in (0, 5) else 5)])
    pos = select_slices(uneven, 12)  # the most evenly spread whole slices that fit: 4 of the 6 (12 patches)
    assert len(pos) == 12 and {int(s) for s in uneven[pos][:, 1]} == {0, 2, 3, 5}


def test_nlm_removes_noise_and_trained_levels():
    g = np.random.default_rng(0)
    clean = -np.ones((2, 1, 32, 32), np.float32)
    clean[:, :, 8:24, 8:24] = 0.5
    noisy = clean + 0.1 * g.standard_normal(clean.shape).astype(np.float32)
    den = nlm_denoise(noisy, 0.1, 0.8)
    c, n, d = (torch.from_numpy(a) for a in (clean, np.clip(noisy, -1, 1), den))
    assert image_scores(c, d)["psnr"].mean() > image_scores(c, n)["psnr"].mean() + 6
    assert trained_noise_levels(0.1) == [0.1]
    assert trained_noise_levels([0.05, 0.15]) == [0.05, 0.1, 0.15]


def _opts(cfg):
    return options_from(DenoiseEvalOptions, cfg, "eval")


def test_options_reject_bad_values():
    with pytest.raises(ConfigError, match="ddim_stepz"):
        _opts({"ddim_stepz": [5]})
    with pytest.raises(ConfigError, match="eval.supervised option.*step"):
        _opts({"supervised": {"step": 5}})
    with pytest.raises(ConfigError, match="no diffusion method"):
        _opts({"ddpm": False, "ddim_steps": []})
    with pytest.raises(ConfigError, match="eval.mask"):
        _opts({"mask": "brain"})
    with pytest.raises(ConfigError, match="noise_levels"):
        _opts({"noise_levels": [-0.1]})


def test_new_options_reject_bad_values():
    with pytest.raises(ConfigError, match="bm3d_sigma"):
        _opts({"bm3d_sigma": "guess"})
    with pytest.raises(ConfigError, match="bm3d_max_slices"):
        _opts({"bm3d_max_slices": 0})
    with pytest.raises(ConfigError, match="val_patches"):
        _opts({"val_patches": 0})
    assert _opts({"nlm_val_patches": 7}).val_patches == 7  # the old name still loads older checkpoints' configs


def test_near_ties_on_validation_go_to_the_cheaper_candidate():
    means = {"ddim_10": {"psnr": 30.0}, "ddim_50": {"psnr": 30.0002}, "ddim_25": {"psnr": float("nan")}}
    assert best(means, ["ddim_10", "ddim_25", "ddim_50"]) == "ddim_10"  # float noise does not pick the sampler
    means["ddim_50"]["psnr"] = 30.1
    assert best(means, ["ddim_10", "ddim_25", "ddim_50"]) == "ddim_50"
    assert best({"a": {"mae": 0.2}, "b": {"mae": 0.1}}, ["a", "b"], "mae") == "b"  # lower is better


def _fakes():
    """``tests/protocols/fakes_denoise.py``, loaded by path (tests are not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fakes_denoise", Path(__file__).with_name("fakes_denoise.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_on_the_fakes_every_level_reads_each_test_patch_once_after_choosing_on_validation(tmp_path):
    from meddiff.protocols import get_protocol

    model, data, cfg = _fakes().make(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = get_protocol("denoise")(model, data, {**cfg, "noise_levels": [0.1, 0.2]}, tmp_path / "out", "cpu")
    # selection read train (the supervised U-Net's pairs) and val; the test split once per level, after it
    assert [s for s, _ in data.reads] == ["train", "train", "val", "val", "test", "test"]
    assert data.reads[-2:] == [("test", 0.1), ("test", 0.2)]
    assert sorted(data.items_read["test"]) == sorted(2 * list(range(rep["n_patches"])))
    assert len(data.items_read["val"]) == 2 * cfg["val_patches"]  # the validation patches at each level
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    record = rep["selection"]
    assert record["splits_read"] == ["train", "val"] and record["chosen_on"] == "validation"
    assert record["choices"]["supervised_weights"]["chosen_on"] == "train"
    assert {c["chosen_on"] for k, c in record["choices"].items() if k != "supervised_weights"} == {"validation"}
    assert set(record["choices"]) == {"supervised_weights", "nlm_h_factor@0.1", "nlm_h_factor@0.2",
                                      "best_ddim_le_50@0.1", "model_method@0.1", "best_classical@0.1"}
    margin = rep["quality_bar"]["0.1"]["margins"]["best_classical"]["psnr"]
    assert margin["baseline_chosen_on"] == "validation" and margin["by"] == "volume"
    assert all(isinstance(v, float) for v in rep["summary"].values())
    assert (tmp_path / "out" / "report.json").is_file()
    assert (tmp_path / "out" / "results.csv").read_text().startswith("noise_std,method,psnr")
    assert rep["splits_read"] == {"select": ["train", "val"], "test": ["test"]}  # recorded by the skeleton
