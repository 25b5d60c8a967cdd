"""The denoise report: tables per level and method, the quality bar (choices from validation, margins on test),
the record of every choice with what it was chosen on, and the summary of headline floats.

Shapes of the report (JSON-ready): ``results[level][method]`` metric rows; ``quality_bar[level]`` at the trained
level(s); ``selection.choices["<choice>@<level>"] = {"value", "chosen_on"}``; ``summary`` flat floats
(``"<metric>/<method>@<level>"`` and ``"bar/<key>@<level>"``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from meddiff.protocols.common import mean_margin, summary_floats
from meddiff.protocols.denoise.interfaces import DenoiseData
from meddiff.protocols.denoise.options import HIGHER_IS_BETTER, METRICS, DenoiseEvalOptions, is_diffusion
from meddiff.protocols.denoise.select import DenoiseSelection, LevelChoice
from meddiff.protocols.denoise.test import LevelScores, TestRun

#: the quality bar's choices recorded in ``report["selection"]["choices"]`` (all made on validation means)
BAR_CHOICES = ("best_ddim_le_50", "model_method", "best_classical")


def build_report(model: Any, datamodule: DenoiseData, opts: DenoiseEvalOptions, sel: DenoiseSelection,
                 run: TestRun, device: torch.device) -> dict[str, Any]:
    """The report of one evaluation from what was chosen (``sel``) and what the test pass measured (``run``)."""
    results = {lkey: s.results for lkey, s in run.levels.items()}
    quality = {f"{lv:g}": quality_entry(sel.levels_chosen[f"{lv:g}"], run.levels[f"{lv:g}"], opts)
               for lv in sel.levels if sel.in_bar(lv)}
    splits = datamodule.split_names()
    return {
        "protocol": "denoise",
        "settings": asdict(opts),
        "model": {"class": type(model).__name__, "T": sel.T, "prediction_type": model.schedule.prediction_type,
                  "timestep_spacing": getattr(model.sampling, "spacing", None),
                  "clip_sample": getattr(model.sampling, "clip", None),
                  "num_samples": opts.num_samples or getattr(model.sampling, "draws", 1)},
        "data": {"path": run.data_path, "test_volumes": splits["test"], "val_volumes": splits["val"],
                 "trained_noise_levels": sel.trained},
        "n_patches": run.n_patches,
        "n_slices": len(run.slice_keys),
        "batch_size": opts.batch_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "noise_levels": list(sel.levels),
        "methods": list(sel.methods),
        "results": results,
        "nlm": {lkey: c.nlm for lkey, c in sel.levels_chosen.items()} if opts.nlm else {},
        "bm3d": run.bm3d,
        "supervised": sel.supervised_info,
        # the validation means behind every choice and verdict of the quality bar (trained levels)
        "validation": {f"{lv:g}": _validation(sel.levels_chosen[f"{lv:g}"]) for lv in sel.levels
                       if sel.in_bar(lv)},
        "speed": speed_rows(sel, results),
        # mean |x - x_ref| between the diffusion methods' outputs (same seeds): ~0 means the samples hardly depend
        # on the sampler / starting noise (the model acts as a posterior-mean regressor); compare with the MAE
        "sampler_spread": {lkey: s.spread for lkey, s in run.levels.items()},
        "quality_bar": quality,
        "selection": selection_record(sel),
        "summary": summary(results, quality),
    }


def _validation(c: LevelChoice) -> dict[str, Any]:
    return {"chosen_on": c.chosen_on, "n_patches": c.n_patches, "means": c.means}


def selection_record(sel: DenoiseSelection) -> dict[str, Any]:
    """Every choice with its value and what it was chosen on, plus the splits the selection step read.

    ``chosen_on`` (top level) is what the choices at the noise levels were chosen on (``"validation"``); the
    supervised baseline's weights are fitted on the training pairs (its own ``chosen_on``: ``"train"``).
    """
    choices: dict[str, dict[str, Any]] = {}
    if sel.supervised_info is not None:
        choices["supervised_weights"] = {"value": sel.supervised_info.get("cache"),
                                         "chosen_on": sel.supervised_info["chosen_on"]}
    for lkey, c in sel.levels_chosen.items():
        if c.nlm:
            choices[f"nlm_h_factor@{lkey}"] = {"value": c.h_factor, "chosen_on": c.nlm["chosen_on"]}
        for name in BAR_CHOICES:
            if name in c.bar:
                choices[f"{name}@{lkey}"] = {"value": c.bar[name], "chosen_on": c.chosen_on}
    at_levels = list(dict.fromkeys(c.chosen_on for c in sel.levels_chosen.values() if c.chosen_on))
    return {"chosen_on": "+".join(at_levels) or None, "splits_read": list(sel.splits_read), "choices": choices}


def speed_rows(sel: DenoiseSelection, results: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Seconds per patch and quality of every method at every level (``speed.csv``)."""
    rows = []
    for level in sel.levels:
        for m in sel.methods:
            row = results[f"{level:g}"][m]
            rows.append({"noise_std": level, "method": m,
                         "sampler": m.split("_")[0] if is_diffusion(m) else "baseline",
                         "steps": (sel.T if m == "ddpm" else int(m.split("_")[1])) if is_diffusion(m) else None,
                         "sec_per_patch": row["sec_per_patch"], "n_patches": row["n_patches"],
                         "psnr": row["psnr"], "ssim": row["ssim"], "vsi": row["vsi"]})
    return rows


def quality_entry(choice: LevelChoice, test: LevelScores, opts: DenoiseEvalOptions) -> dict[str, Any]:
    """The quality bar at a trained level: choices and verdicts from ``choice`` (validation), margins on test.

    - ``best_ddim_le_50``, ``ddim_within_0.5db_of_ddpm``: chosen / decided on validation;
      ``test_ddpm_minus_best_ddim_psnr_db``: the same gap on test, for that DDIM.
    - ``model_method``: the diffusion method compared with the baselines (``ddpm``, else the best DDIM on validation).
    - ``best_classical``: noisy / NLM / BM3D with the best validation PSNR; ``margin_<metric>`` its paired test
      margin (model better > 0; mean over test slices, bootstrap CI over slices, or volumes when several), and the
      same against the supervised U-Net in ``margins["supervised"]``.
    """
    means = choice.means
    entry: dict[str, Any] = {"chosen_on": choice.chosen_on, "n_val_patches": choice.n_patches,
                             "val_psnr": {m: v["psnr"] for m, v in means.items()}}
    if not means:
        entry["note"] = "no validation patches: nothing chosen, no verdict"
        return entry
    res, bar = test.results, choice.bar
    if "best_ddim_le_50" in bar:
        entry["best_ddim_le_50"] = bar["best_ddim_le_50"]
        entry["val_ddpm_minus_best_ddim_psnr_db"] = bar["val_ddpm_minus_best_ddim_psnr_db"]
        entry["ddim_within_0.5db_of_ddpm"] = bar["ddim_within_0.5db_of_ddpm"]
        entry["test_ddpm_minus_best_ddim_psnr_db"] = res["ddpm"]["psnr"] - res[bar["best_ddim_le_50"]]["psnr"]
    model_m, classical = bar["model_method"], bar["best_classical"]
    entry["model_method"] = model_m
    entry["best_classical"] = classical
    margins: dict[str, dict[str, Any]] = {}
    for name, base in (("best_classical", classical), ("supervised", "supervised" if "supervised" in means else None)):
        if model_m is None or base is None:
            continue
        # the baseline was chosen by validation PSNR: that mean is what its chosen_on rests on, for every metric
        margins[name] = {k: paired_margin(test, model_m, base, k, opts, means[base]["psnr"]) for k in METRICS}
    entry["margins"] = margins
    for k, m in margins.get("best_classical", {}).items():
        if "diff" in m:
            entry[f"margin_{k}"] = m["diff"]
            entry[f"margin_{k}_ci_low"], entry[f"margin_{k}_ci_high"] = m["diff_ci"]
            entry[f"beats_best_classical_{k}"] = bool(m["diff_ci"][0] > 0)
    return entry


def paired_margin(test: LevelScores, model_m: str, base: str, metric: str, opts: DenoiseEvalOptions,
                  val_mean: float | None = None) -> dict[str, Any]:
    """Paired bootstrap CI of the mean per-slice margin of ``model_m`` over ``base`` in ``metric`` (model better > 0).

    ``base`` was chosen on validation (:func:`~meddiff.protocols.denoise.select.bar_choices`); the margin is the
    common one (:func:`meddiff.protocols.common.mean_margin`, with ``base`` the only candidate and ``val_mean`` the
    validation PSNR it was chosen by), so it carries ``baseline_chosen_on`` and a ``verdict``. A slice's value is the mean of the
    metric over its patches (the patch metrics of the tables; stitched slices would average the independent noise
    of overlapping patches). Only the test slices where both have a value count (a capped BM3D: its slices).
    Volumes are resampled with all their slices when the slices come from more than one volume.
    """
    a, b = test.per_slice[model_m][metric], test.per_slice[base][metric]
    ok = np.isfinite(a) & np.isfinite(b)
    out: dict[str, Any] = {"model": model_m, "baseline": base, "higher_is_better": HIGHER_IS_BETTER[metric],
                           "n_slices": int(ok.sum())}
    if ok.sum() < 2:
        out["note"] = "fewer than 2 test slices with values: no CI"
        return out
    vols = [test.slices[i][0] for i in np.flatnonzero(ok)]
    subjects = vols if len(set(vols)) > 1 else None
    out.update(mean_margin(a[ok], {base: b[ok]}, {base: val_mean}, subjects,
                           higher_is_better=HIGHER_IS_BETTER[metric], n_boot=opts.n_boot, seed=opts.seed,
                           what=f"{metric.upper()} margin of {model_m}"))
    out["diff_ci"] = list(out["diff_ci"])
    out["by"] = "volume" if subjects is not None else "slice"
    return out


def summary(results: dict[str, dict[str, dict[str, float]]], quality: dict[str, Any]) -> dict[str, float]:
    """Flat floats: ``"<metric>/<method>@<level>"`` of every table cell, ``"bar/<key>@<level>"`` of the bar."""
    out: dict[str, Any] = {}
    for lkey, res in results.items():
        for m, row in res.items():
            for k in (*METRICS, "sec_per_patch"):
                out[f"{k}/{m}@{lkey}"] = row[k]
    for lkey, entry in quality.items():
        for k, v in entry.items():
            if isinstance(v, (bool, int, float)):
                out[f"bar/{k}@{lkey}"] = v
    return summary_floats(out)
