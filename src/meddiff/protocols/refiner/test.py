"""The refiner protocol's one pass over the test split (and over the AUCp pools), with what was selected.

- **AUCp** (label-free): known-healthy images (the held-out ``known_healthy_val`` pool) = 0 against every image of
  an unlabelled pool = 1 — the unannotated mixed set (*transductive*) and the test images (*inductive*, scored
  from the same pass, labels not used).
- **Inductive** (test) and **transductive** (the mixed set; its folder labels are joined by id here, for scoring
  only): image AUROC/AUPRC with 95% bootstrap CIs that **resample subjects** (all their slices) wherever items
  carry a subject, subject-level AUROC, the paired refined − coarse difference and the paired margin of the primary
  estimate over the baseline **chosen on validation** (``select``), each with its verdict and ``resampled``.
- **Steps sweep**: the coarse estimate and refinements with ``eval.steps`` steps on the first ``steps_max_images``
  test images — a measurement: the headline is the model's own ``estimates`` (its configured ``model.sampling.steps``).
- **Checkpoints**: the numbers of the run's other saved checkpoints (copies of the model; scored in the same pass),
  by selection rule, and the **AUCp-selector measurement** over all of them (:mod:`.selector`: AUCp beside the
  labelled-validation and test AUROC, their Spearman correlation, the regret of each rule) — never a choice.
- **Pixel** AUROC/AUPRC and Dice at the validation threshold (oracle Dice labelled as such) where test masks exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.aucp import aucp, debiased_auc
from meddiff.metrics.detection import aggregate_by_subject, detection_ci, paired_difference
from meddiff.metrics.pixel import PixelAccumulator
from meddiff.protocols.base import Outcome
from meddiff.protocols.common import auroc_margin
from meddiff.protocols.refiner.interfaces import StepSweepable, implements, refinement_info, with_steps
from meddiff.protocols.refiner.options import LABELS_MIXED, LABELS_NONE, LABELS_TEST, RefinerEvalOptions
from meddiff.protocols.refiner.report import build_report
from meddiff.protocols.refiner.scoring import (
    CKPT,
    Scored,
    Scorer,
    baseline_scorer,
    model_scorer,
    score_pool,
    steps_scorer,
)
from meddiff.protocols.refiner.select import RefinerSelection
from meddiff.protocols.refiner.selector import PoolScores, measure, verdict
from meddiff.runs.checkpoint_selection import RULES_NEEDING_LABELS

NAN_CI = (float("nan"), float("nan"))
STEPS = "steps/"


def paired_auroc_difference(scores_a: Any, scores_b: Any, labels: Any, subjects: Sequence[Any] | None = None,
                            n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the same images with a paired bootstrap CI (one resample, both scores), resampling
    ``subjects`` (with all their images) when given.

    ``{"difference", "ci": (lo, hi), "n", "resampled"}`` (+ ``"n_subjects"``) plus ``"p_a_not_better"`` (share of
    replicates with a difference <= 0); ``n_boot=0``: no CI (nan, nan).
    """
    d = paired_difference(scores_a, scores_b, labels, subjects, n_boot=n_boot, seed=seed, ci=ci)
    out: dict[str, Any] = {"difference": d["auroc_diff"], "ci": d.get("auroc_diff_ci", NAN_CI), "n": d["n"],
                           "resampled": "items" if subjects is None else "subjects"}
    if subjects is not None:
        out["n_subjects"] = len({str(s) for s in subjects})
    if "frac_diff_le_0" in d:
        out["p_a_not_better"] = d["frac_diff_le_0"]
    return out


def aucp_entry(healthy: np.ndarray, unlabelled: np.ndarray, rho: float | None, healthy_pool: str,
               unlabelled_pool: str) -> dict[str, Any]:
    """AUCp of one scorer: scores of known-healthy vs an unlabelled pool. Takes scores only — no labels."""
    value = aucp(healthy, unlabelled)
    entry: dict[str, Any] = {"aucp": value, "n_known_healthy": int(healthy.size), "n_unlabelled": int(unlabelled.size),
                             "known_healthy_pool": healthy_pool, "unlabelled_pool": unlabelled_pool,
                             "labels_used": LABELS_NONE, "rho": rho}
    if rho is not None:
        entry["debiased_auc"] = debiased_auc(value, rho)
    return entry


def detection(scored: Scored, estimates: Sequence[str], baselines: Sequence[str], opts: RefinerEvalOptions,
              labels_used: str, baseline_values: Mapping[str, float] | None) -> dict[str, Any]:
    """Image and subject level AUROC/AUPRC (CIs by subject where subjects are known) of every scorer, the paired
    refined − coarse difference and the primary estimate's margin over the validation-chosen baseline."""
    y = scored.y
    if y is None:
        raise DataError("this pool carries no labels; it cannot be scored for AUROC.")
    clusters = scored.clusters
    names = [*estimates, *baselines]
    res: dict[str, Any] = {"labels_used": labels_used, "n": int(y.size), "n_pos": int(y.sum()),
                           "resampled": "items" if clusters is None else "subjects", "image": {}}
    for name in names:
        res["image"][name] = detection_ci(scored.get(name), y, clusters, n_boot=opts.n_boot, seed=opts.seed)
    if len(set(scored.subjects)) < len(scored.subjects):
        res["subject"] = {}
        for name in names:
            _, s, ys = aggregate_by_subject(scored.get(name), y, scored.subjects, opts.subject_reduction)
            if 0 < ys.sum() < ys.size:  # one score per subject: the bootstrap resamples subjects
                res["subject"][name] = {**detection_ci(s, ys, n_boot=opts.n_boot, seed=opts.seed),
                                        "resampled": "subjects"}
    if "refined" in estimates and "coarse" in estimates:
        res["refined_minus_coarse"] = paired_auroc_difference(scored.get("refined"), scored.get("coarse"), y,
                                                              clusters, opts.n_boot, opts.seed)
    if baselines:  # the margin over the best baseline, the best by its validation number (common.auroc_margin)
        top = estimates[-1]
        m = auroc_margin(scored.get(top), {n: scored.get(n) for n in baselines}, y, baseline_values, clusters,
                         n_boot=opts.n_boot, seed=opts.seed, what=f"{top} image AUROC margin")
        res["model_minus_best_baseline"] = {"model": top, "resampled": res["resampled"], **m}
    return res


def _labels_by_id(datamodule: Any, ids: Sequence[str]) -> np.ndarray:
    """Folder labels of the unannotated pool's images, in ``ids`` order (transductive scoring only)."""
    ds = datamodule.pool_dataset("mixed_labelled")
    by_id = {r.id: r.label for r in ds.records}
    return np.asarray([by_id[i] for i in ids], dtype=np.int64)


def _valid_steps(model: Any, steps: Sequence[int]) -> tuple[list[int], dict[int, str]]:
    ok, skipped = [], {}
    for s in steps:
        try:
            model.check_sampling(with_steps(model, s), "eval.steps")
            ok.append(int(s))
        except ConfigError as exc:
            skipped[int(s)] = str(exc)
    return ok, skipped


def steps_rows(test: Scored, skipped: Mapping[int, str], seconds: Mapping[str, float],
               all_steps: Sequence[int]) -> list[dict[str, Any]]:
    """Inductive AUROC and seconds per image of the coarse estimate and of each step count (measurement only)."""
    coarse = test.get(STEPS + "coarse")
    n = coarse.size
    y = test.y[:n]

    def auroc(s: np.ndarray) -> float | None:  # None: the first images hold one class only
        return detection_ci(s, y, n_boot=0)["auroc"] if 0 < int(y.sum()) < y.size else None

    rows: list[dict[str, Any]] = [{"estimate": "coarse", "steps": 0, "auroc": auroc(coarse), "n": int(n),
                                   "sec_per_image": seconds["coarse"] / n}]
    for s in all_steps:
        s = int(s)
        if s in skipped:
            rows.append({"estimate": "refined", "steps": s, "skipped": skipped[s]})
            continue
        rows.append({"estimate": "refined", "steps": s, "auroc": auroc(test.get(f"{STEPS}{s}")), "n": int(n),
                     "sec_per_image": (seconds[f"refined@{s}"] + seconds["coarse"]) / n})
    return rows


def _pixel(accs: Mapping[str, PixelAccumulator], thresholds: Mapping[str, float]) -> dict[str, Any]:
    """Pixel AUROC/AUPRC, Dice at the validation threshold and the oracle Dice (chosen on test: not a result)."""
    out: dict[str, Any] = {}
    for name, acc in accs.items():
        try:
            entry: dict[str, Any] = {k: v for k, v in acc.compute().items()}
        except DataError:
            continue
        entry["oracle_note"] = "oracle_dice: threshold chosen on test (an upper bound, not a result)"
        if name in thresholds:
            entry["val_threshold"] = thresholds[name]
            entry["dice_at_val_threshold"] = acc.dice_at(thresholds[name])
        out[name] = entry
    return out


def _compact(parts: Mapping[str, Any], name: str, prefix: str = "") -> dict[str, Any]:
    ind, tra = parts["inductive"]["image"][prefix + name], parts["transductive"]["image"][prefix + name]
    return {"inductive_auroc": ind["auroc"], "inductive_auroc_ci": ind["auroc_ci"],
            "resampled": ind.get("resampled", "items"), "transductive_auroc": tra["auroc"],
            "aucp_transductive": parts["aucp"][prefix + name]["transductive"]["aucp"],
            "aucp_inductive": parts["aucp"][prefix + name]["inductive"]["aucp"]}


def _checkpoint_entries(parts: Mapping[str, Any], sel: RefinerSelection, primary: str) -> dict[str, Any]:
    """Each kept checkpoint's numbers (its primary estimate) by selection rule, the evaluated model's own under its
    matching rules."""
    out: dict[str, Any] = {}
    for rule, path in sel.rules.items():
        entry: dict[str, Any] = {"path": str(path), "needs_labels": rule in RULES_NEEDING_LABELS,
                                 "is_evaluated_model": rule in sel.matched}
        saved = next((e for e in sel.saved if rule in e.rules), None)
        if rule in sel.matched:
            entry.update(_compact(parts, primary))
        elif saved is not None and saved.key in sel.copies:
            entry.update(_compact(parts, primary, f"{CKPT}{saved.key}/"))
        else:
            entry["error"] = saved.error if saved is not None and saved.error else "not loaded"
        out[rule] = entry
    return out


def _selector(parts: Mapping[str, Any], sel: RefinerSelection, healthy: Scored, mixed: Scored, primary: str,
              kh_pool: str, opts: RefinerEvalOptions) -> dict[str, Any] | None:
    """The AUCp-selector measurement over every saved checkpoint that loads (:mod:`.selector`); None without any."""
    rows, names = [], {}
    for e in sel.saved:
        if not (e.is_model or e.key in sel.copies):
            continue
        name = primary if e.is_model else f"{CKPT}{e.key}/{primary}"
        names[e.key] = name
        val, y = None, sel.val.y if sel.val is not None else None
        if y is not None and name in sel.val.scores and 0 < int(y.sum()) < y.size:
            val = detection_ci(sel.val.get(name), y, n_boot=0)["auroc"]
        test = parts["inductive"]["image"][name]
        rows.append({"key": e.key, "step": e.step, "rules": e.rules, "is_evaluated_model": e.is_model,
                     "aucp": parts["aucp"][name]["transductive"]["aucp"], "val_auroc": val,
                     "test_auroc": test["auroc"], "test_auroc_ci": test["auroc_ci"]})
    if not rows:
        return None

    def pool(scored: Scored) -> PoolScores:
        return PoolScores({k: scored.get(n) for k, n in names.items()}, scored.subjects, scored.y)

    val_pool = pool(sel.val) if sel.val is not None and all(n in sel.val.scores for n in names.values()) else None
    m = measure(rows, pool(healthy), pool(mixed), val_pool, opts.n_boot, opts.seed)
    return {"note": "a measurement, not a choice: the evaluated checkpoint and the headline are the run's selection",
            "estimate": primary, "aucp": f"transductive AUCp: {kh_pool} = 0 vs mixed = 1 (labels used: none)",
            "val_auroc": "image AUROC on labelled_val", "test_auroc": "inductive image AUROC on test (one pass)",
            "checkpoints": rows, **m, "verdict": verdict(m)}


def evaluate_test(model: Any, datamodule: Any, opts: RefinerEvalOptions, sel: RefinerSelection,
                  device: torch.device) -> Outcome:
    """AUCp, inductive and transductive numbers, the steps sweep and the other checkpoints: one pass per pool,
    the test split read once (``datamodule.test_dataloader()``)."""
    rho = opts.rho if opts.rho is not None else getattr(model, "aucp_rho", None)
    scorers: dict[str, Scorer] = {"model": model_scorer(model)}
    if sel.baselines is not None:
        scorers["baselines"] = baseline_scorer(sel.baselines, model.anomaly_val.scoring)
    for key, other in sel.copies.items():  # every saved checkpoint: scored in the same passes (test read once)
        scorers[f"checkpoint:{key}"] = model_scorer(other, prefix=f"{CKPT}{key}/")
    kh_pool = "known_healthy_val" if datamodule.has_pool("known_healthy_val") else "known_healthy"
    p, cap = opts.progress, opts.max_images
    healthy = score_pool(datamodule.pool_loader(kh_pool), scorers, device, cap, "known healthy", p)
    # the unannotated pool is read WITHOUT labels ("mixed"); its labels come separately, for scoring only
    mixed = score_pool(datamodule.pool_loader("mixed"), scorers, device, cap, "unannotated pool", p)

    test_scorers = dict(scorers)
    pixel: dict[str, PixelAccumulator] = {}
    if opts.pixel:
        test_scorers["model"] = model_scorer(model, pixel=pixel)
        if sel.baselines is not None:
            test_scorers["baselines"] = baseline_scorer(sel.baselines, model.anomaly_val.scoring, pixel)
    sweep_seconds: dict[str, float] = {}
    sweep = implements(model, StepSweepable) and bool(opts.steps)
    if sweep:
        ok_steps, skipped = _valid_steps(model, opts.steps)
        test_scorers["steps"] = steps_scorer(model, ok_steps, opts.steps_max_images, sweep_seconds)
    test = score_pool(datamodule.test_dataloader(), test_scorers, device, cap, "test", p)  # the one test pass

    keys = list(test.scores)
    estimates = [k for k in keys if not k.startswith(("baseline_", STEPS, CKPT))]
    baselines = sel.baselines.names if sel.baselines is not None else []
    names = [*estimates, *baselines]
    parts: dict[str, Any] = {"aucp": {}}
    for name in names + [k for k in keys if k.startswith(CKPT)]:
        parts["aucp"][name] = {
            "transductive": aucp_entry(healthy.get(name), mixed.get(name), rho, kh_pool, "mixed (unannotated)"),
            "inductive": aucp_entry(healthy.get(name), test.get(name), rho, kh_pool, "test (read without labels)"),
        }
    if kh_pool == "known_healthy":
        parts["aucp_note"] = ("data.val_fraction=0: the healthy side of AUCp is the known-healthy TRAINING set, "
                              "which the models fit; AUCp is then optimistic.")
    parts["inductive"] = detection(test, estimates, baselines, opts, LABELS_TEST, sel.baseline_values)
    mixed.labels = [_labels_by_id(datamodule, mixed.ids)]
    parts["transductive"] = detection(mixed, estimates, baselines, opts, LABELS_MIXED, sel.baseline_values)
    for part, pool in (("inductive", test), ("transductive", mixed)):  # other checkpoints: their primary estimate
        for k in (k for k in keys if k.startswith(CKPT) and k.endswith("/" + estimates[-1])):
            parts[part]["image"][k] = detection_ci(pool.get(k), pool.y, pool.clusters, n_boot=opts.n_boot,
                                                   seed=opts.seed)
    parts["pools_read"] = [kh_pool, "mixed", "mixed_labelled", "test"]  # test: one pass, test_dataloader()
    n_all = max(1, healthy.n + mixed.n + test.n)
    seconds = {k: healthy.seconds.get(k, 0.0) + mixed.seconds.get(k, 0.0) + test.seconds.get(k, 0.0)
               for k in test.seconds if k != "steps"}
    parts["seconds_per_image"] = {k: v / n_all for k, v in seconds.items()}
    if sweep:
        parts["steps"] = steps_rows(test, skipped, sweep_seconds, opts.steps)
        parts["steps_note"] = (f"a measurement on test, not a choice: the headline uses model.sampling.steps="
                               f"{model.sampling.steps}")
    if opts.pixel and pixel:
        parts["pixel"] = _pixel(pixel, sel.pixel_thresholds)
    if opts.compare_checkpoints and sel.rules:
        parts["checkpoints"] = _checkpoint_entries(parts, sel, estimates[-1])
    selector = _selector(parts, sel, healthy, mixed, estimates[-1], kh_pool, opts) if opts.compare_checkpoints else None
    if selector is not None:
        parts["aucp_selector"] = selector
    for part in ("inductive", "transductive"):  # the copies' rows live under "checkpoints", not beside the model
        parts[part]["image"] = {k: v for k, v in parts[part]["image"].items() if not k.startswith(CKPT)}
    parts["aucp"] = {k: v for k, v in parts["aucp"].items() if not k.startswith(CKPT)}
    curves = {name: (test.get(name), test.y) for name in names}
    report = build_report(model, opts, sel, parts, estimates, refinement_info(model), asdict(opts))
    figures: dict[str, Any] = {"curves": curves}
    if selector is not None:
        figures["aucp_selector"] = selector
    return Outcome(report=report, figures=figures)
