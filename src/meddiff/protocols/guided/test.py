"""The one test pass (the test volumes, or ``eval.input``), translated with the selected settings, and the
volume-level classification: each class vs CN, AD vs CN and any vs CN, model beside every baseline (each reduced as
chosen on validation), with the paired margin over the best baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from meddiff.protocols.base import Outcome
from meddiff.protocols.common import LABELS, auroc_margin

from .interfaces import CLASS_NAMES
from .options import GuidedEvalOptions
from .report import assemble_report
from .select import GuidedSelection, volume_scores
from .translate import OptionalMetrics, VolumeResult, interleave_cap, translate_many

__all__ = ["classification", "evaluate_on_test", "margin"]


def evaluate_on_test(model: Any, datamodule: Any, opts: GuidedEvalOptions, selection: GuidedSelection,
                     device: torch.device) -> Outcome:
    """Translate the test volumes (or ``eval.input``) once with ``selection``; the report and its table/figure data."""
    if opts.input is not None:
        vols = datamodule.input_volumes(opts.input, opts.input_label, what="eval.input")
    else:
        vols = datamodule.volumes("test")  # volumes the DataModule could not load are listed in skipped
    sources = interleave_cap(list(vols.sources), opts.max_volumes)
    extra = OptionalMetrics(opts, device)
    results, bad = translate_many(model, sources, selection.sampling, opts, device, extra,
                                  keep_worst=int(opts.n_worst), batch=vols.batch, what="test",
                                  baselines=selection.baselines)
    skipped = list(vols.skipped) + bad + selection.skipped
    cls_section, curves = classification(results, selection.choice, opts.n_boot, opts.seed)
    margin_section = margin(results, selection.choice, opts.n_boot, opts.seed)
    return assemble_report(model, results, selection, opts, cls_section, curves, margin_section, extra.skipped,
                           skipped)


def _binary(
    results: Sequence[VolumeResult], values: np.ndarray, positive: set[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 labels of CN (0) vs the ``positive`` slice labels (1); other volumes dropped."""
    lab = np.array([r.source.slice_label or 0 for r in results])
    keep = (lab == 1) | np.isin(lab, list(positive))
    return values[keep], (lab[keep] != 1).astype(np.int64)


def classification(
    test: Sequence[VolumeResult], choice: Mapping[str, Any], n_boot: int, seed: int
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Volume-level AUROC (with CIs resampling subjects) of each class vs CN, AD vs CN and any vs CN, for the model
    and every baseline (each with its reduction chosen on validation).

    Returns ``(report section, {curve label: (scores, labels)} for AD vs CN)``.
    """
    from meddiff.metrics.detection import detection_ci

    values = volume_scores(test, choice)
    subjects = np.array([_subject(r) for r in test])
    comparisons = {f"{name}_vs_CN": {k + 1} for k, name in enumerate(CLASS_NAMES) if k > 0}
    comparisons["any_vs_CN"] = {2, 3, 4, 5}
    section: dict[str, Any] = {key: {} for key in values}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for cname, pos in comparisons.items():
        for key, v in values.items():
            s, y = _binary(test, v, pos)
            subj, _ = _binary(test, subjects, pos)
            ok = np.isfinite(s)
            s, y, subj = s[ok], y[ok], subj[ok]
            if y.size < 2 or y.min() == y.max():
                section[key][cname] = {
                    "skipped": f"needs CN and {cname[:-6]} volumes; have {int((y == 0).sum())} CN "
                    f"and {int((y == 1).sum())} others",
                    "n": int(y.size),
                }
                continue
            section[key][cname] = detection_ci(s, y, subjects=list(subj), n_boot=int(n_boot), seed=int(seed))
            if cname == "AD_vs_CN":
                curves["guided CFG" if key == "model" else f"{LABELS.get(key, key)} (baseline)"] = (s, y)
    return section, curves


def _subject(r: VolumeResult) -> str:
    """The subject of a volume (``VolumeSource.subject`` when the source has one, else its volume id)."""
    return str(r.source.subject or r.source.volume_id)


def margin(
    test: Sequence[VolumeResult], choice: Mapping[str, Any], n_boot: int, seed: int
) -> dict[str, Any] | None:
    """Paired CI of "model - best baseline" volume AUROC, AD vs CN (any non-CN vs CN when there is no AD volume);
    the best baseline by validation AUROC when every baseline has one. None without both classes on test."""
    values = volume_scores(test, choice)
    subjects = np.array([_subject(r) for r in test])
    found = None
    for name, positive in (("AD_vs_CN", {5}), ("any_vs_CN", {2, 3, 4, 5})):
        _, lab = _binary(test, values["model"], positive)
        keep = np.all([np.isfinite(_binary(test, v, positive)[0]) for v in values.values()], axis=0)
        if keep.sum() >= 2 and len(set(lab[keep].tolist())) == 2:
            found = (name, positive, lab, keep)
            break
    if found is None:
        return None
    comparison, pos, y, ok = found
    scores = {k: _binary(test, v, pos)[0][ok] for k, v in values.items()}
    y, subj = y[ok], list(_binary(test, subjects, pos)[0][ok])
    base = {k: v for k, v in scores.items() if k != "model"}
    m = auroc_margin(scores["model"], base, y, choice.get("best_val_auroc"), subjects=subj, n_boot=n_boot, seed=seed,
                     what=f"{comparison.replace('_vs_', ' vs ')} volume AUROC margin")
    return {**m, "comparison": comparison}
