"""The one pass over the test split with what validation chose: the model, the published fixed scoring on the same
reconstructions, every baseline; image and pixel metrics with CIs, the margin over the best baseline, add-ons."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import numpy as np
import torch

from meddiff.metrics.detection import aggregate_by_subject, detection_ci
from meddiff.metrics.image_threshold import at_threshold
from meddiff.metrics.pixel import PixelAccumulator
from meddiff.protocols.base import Outcome
from meddiff.protocols.common import LABELS, MEAN_INTENSITY, MODEL, auroc_margin
from meddiff.utils.cpu import cpu_report

from .addons import addon_fields, addon_for
from .cost import unet_cost
from .generalisation import evaluate_generalisation, generalisation_summary
from .options import EvalOptions
from .passes import matching_pixel_acc, model_fn, precision_name, run_pass
from .report import PIXEL_INTENSITY, summary
from .select import AnomalySelection

__all__ = ["FIXED_SCORING_NOTE", "evaluate_on_test"]

#: what ``report["fixed_scoring"]`` is
FIXED_SCORING_NOTE = (
    "a fixed scoring (no selection): the model's configured scoring with eval.fixed_scoring on top (without it, what "
    "eval.select_on_val=false reports); rsna_pddpm and its demo set pDDPM's published scoring, L1 map, median "
    "filter 5, mean over the brain mask. Scored on the same test reconstructions as the validation-chosen setting "
    "(one test pass)."
)


def _pixel_entry(acc: PixelAccumulator, threshold: float | None) -> dict[str, Any]:
    pix = acc.compute()
    entry = {"auroc": pix["auroc"], "auprc": pix["auprc"],
             "oracle_dice": pix["oracle_dice"], "oracle_threshold": pix["oracle_threshold"],
             "aupro": pix["aupro"], "f1_max": pix["f1_max"]}
    if threshold is not None:
        entry["dice_at_val_threshold"] = acc.dice_at(threshold)
        entry["val_threshold"] = threshold
    return entry


def _margin(scores: Mapping[str, np.ndarray], y: np.ndarray, subjects: list[str] | None,
            val_auroc: Mapping[str, float | None], opts: EvalOptions) -> dict[str, Any]:
    """Paired CI of "model - best baseline" image AUROC; the best by validation AUROC when every baseline has one."""
    base = {k: v for k, v in scores.items() if k != MODEL}
    return auroc_margin(scores[MODEL], base, y, val_auroc, subjects=subjects, n_boot=opts.n_boot, seed=opts.seed)


def evaluate_on_test(
    model: Any,
    test_loader: Iterable,
    opts: EvalOptions,
    selection: AnomalySelection,
    device: torch.device | str = "cpu",
    subtype_names: Sequence[str] | None = None,
    field_names: Mapping[str, Sequence[str] | None] | None = None,
) -> Outcome:
    """One pass over the test split with the selected settings (model and each baseline): the report and the data
    for its figures.

    The model's reconstructions are also scored with its configured scoring, unchanged
    (``report["fixed_scoring"]``, summary ``fixed_*``; :data:`FIXED_SCORING_NOTE`). Batches carrying an add-on
    field (``meddiff.protocols.anomaly.addons``, e.g. ``subtypes`` ``[B, K]`` on RSNA CT) switch that add-on on;
    ``field_names`` names each field's columns (``subtype_names``: the ``subtypes`` columns).
    """
    device = torch.device(device)
    names = {"subtypes": subtype_names, **(field_names or {})}
    chosen, threshold, base_threshold = selection.scoring, selection.threshold, selection.base_threshold
    fixed = opts.fixed(model.anomaly_val.scoring)
    report: dict[str, Any] = {"protocol": "The evaluation protocol every anomaly-detection experiment shares."}
    report["selection"] = selection.record
    report["scoring"] = chosen.as_dict()
    sampling = selection.sampling if selection.sampling is not None else getattr(model, "sampling", None)
    if is_dataclass(sampling) and hasattr(sampling, "t_start"):
        report["reconstruction"] = asdict(sampling)

    methods = {MODEL: (model_fn(model, selection.sampling), [chosen, fixed])}  # one reconstruction, two scorings
    methods.update({name: (b.reconstruct, [b.scoring]) for name, b in selection.baselines.items()})
    t0 = time.perf_counter()
    test = run_pass(test_loader, methods, opts, device, "test: reconstruct + score",
                    keep_examples=4 * opts.n_figure_rows, observe=True, fields=addon_fields(),
                    cache_healthy=opts.generalisation_max_items if opts.generalisation else 0)
    test_seconds = time.perf_counter() - t0
    y = test.y()
    subjects = test.subject_ids()
    scores = {MODEL: test.cat(MODEL), MEAN_INTENSITY: test.intensity_scores(),
              **{name: test.cat(name) for name in selection.baselines}}
    report["n_test"] = int(y.size)
    if subjects is not None:
        report["n_test_subjects"] = len(set(subjects))
    report["image"] = {name: detection_ci(s, y, subjects=subjects, n_boot=opts.n_boot, seed=opts.seed)
                       for name, s in scores.items()}
    val_auroc = {MEAN_INTENSITY: selection.base_val_auroc,
                 **{name: b.val_auroc for name, b in selection.baselines.items()}}
    report["margin_over_best_baseline"] = _margin(scores, y, subjects, val_auroc, opts)
    image_thr = selection.record.get("image_threshold")
    if image_thr is not None:  # applied, never fitted, on test
        report["image_at_val_threshold"] = at_threshold(scores[MODEL], y, image_thr)
    if subjects is not None and len(set(subjects)) < len(subjects):
        subj_report = {}
        for name, s in scores.items():
            _, ss, yy = aggregate_by_subject(s, y, subjects)
            if len(np.unique(yy)) == 2:
                subj_report[name] = detection_ci(ss, yy, n_boot=opts.n_boot, seed=opts.seed)
        if subj_report:
            report["subject"] = subj_report
    if 0 in test.pixel[MODEL]:
        report["pixel"] = {MODEL: _pixel_entry(test.pixel[MODEL][0], threshold)}
        for name, b in selection.baselines.items():
            if 0 in test.pixel[name]:
                report["pixel"][name] = _pixel_entry(test.pixel[name][0], b.threshold)
        if test.pixel_intensity is not None:
            report["pixel"][PIXEL_INTENSITY] = _pixel_entry(test.pixel_intensity, base_threshold)
    report["fixed_scoring"] = _fixed_scoring(test, fixed, y, subjects, opts, [chosen, fixed])
    if selection.baselines:
        report["baselines_cost"] = {name: b.cost.as_dict() for name, b in selection.baselines.items()}
    compute = test.compute or {}
    report["runtime"] = {**cpu_report(precision_name(compute) if compute else None), "device": str(device),
                         "compute": compute}
    report["cost"] = _cost(test, test_seconds, int(y.size), sampling)
    if opts.generalisation:  # after every test number and the baselines' cost: those stay as without the check
        t0 = time.perf_counter()
        report["generalisation"] = evaluate_generalisation(model, test, scores, selection, val_auroc, opts, device)
        report["generalisation"]["seconds"] = time.perf_counter() - t0
    report["summary"] = {**summary(report), **generalisation_summary(report.get("generalisation"))}
    figures: dict[str, Any] = {
        "curves": {("model" if k == MODEL else f"baseline ({LABELS.get(k, k)})"): (s, y) for k, s in scores.items()},
        "examples": {k: torch.cat(v) if torch.is_tensor(v[0]) else sum(v, []) for k, v in test.examples.items()},
    }
    for name, values in test.fields.items():  # add-ons switched on by the batch fields they need
        addon = addon_for(name)
        figures.update(addon.extend(report, scores, y, subjects, torch.cat(values).numpy(), test.ids,
                                    names.get(name), opts))
        figures.setdefault("addons", []).append(name)
    return Outcome(report, figures)


def _cost(test: Any, seconds: float, n: int, sampling: Any) -> dict[str, Any]:
    """What the test pass cost: wall seconds in all and per image (every method and baseline of the pass), the
    model's own share (reconstruction + scoring) per image, and UNet forwards per image and patch of the chosen
    sampling (None when the model reconstructs its own way, e.g. one forward of a DAE)."""
    per = (lambda v: v / n) if n else (lambda v: None)
    return {"test_pass_seconds": seconds, "n_images": n, "seconds_per_image": per(seconds),
            "model_seconds_per_image": per(float(test.seconds.get(MODEL, 0.0))),
            "unet_forwards_per_image_per_patch": unet_cost(sampling) if is_dataclass(sampling) else None,
            "note": "wall time of the one test pass (model, fixed scoring and every baseline) / test images; "
                    "model_seconds_per_image: the model's reconstruction + scoring alone"}


def _fixed_scoring(test: Any, fixed: Any, y: np.ndarray, subjects: list[str] | None, opts: EvalOptions,
                   candidates: list[Any]) -> dict[str, Any]:
    """The model's test reconstructions scored with its configured scoring (candidate 1 of the model's pass)."""
    entry: dict[str, Any] = {"chosen_on": "config", "scoring": fixed.as_dict(), "note": FIXED_SCORING_NOTE,
                             "image": detection_ci(test.cat(MODEL, 1), y, subjects=subjects, n_boot=opts.n_boot,
                                                   seed=opts.seed)}
    acc = matching_pixel_acc(test.pixel[MODEL], candidates, 1)  # the same map as the chosen one shares its histogram
    if acc is not None:
        pix = acc.compute()
        entry["pixel"] = {"auroc": pix["auroc"], "auprc": pix["auprc"], "oracle_dice": pix["oracle_dice"],
                          "oracle_threshold": pix["oracle_threshold"], "aupro": pix["aupro"], "f1_max": pix["f1_max"]}
    return entry
