"""The paired margin of the model over the best trivial baseline, the best one chosen on validation, with a verdict.

Two kinds of margin, one rule: the baseline the model is compared with is the one with the best *validation*
number (``"baseline_chosen_on": "validation"``). Only when some baseline has no validation number (no labelled
validation data) is the best on test taken, labelled ``"test"``: a choice that can only shrink the model's margin.

- :func:`auroc_margin`: detection (AUROC of "model - best baseline", paired bootstrap over items or subjects).
- :func:`mean_margin`: a per-item metric (PSNR, SSIM, MAE: mean of "model - best baseline" over the same items).

Both return the metrics-layer dict plus ``"verdict"``: one plain sentence (beats / does NOT beat / is WORSE / no
verdict without a CI).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meddiff.metrics.detection import margin_over_best_baseline, margin_verdict
from meddiff.metrics.paired import margin_over_best

from .baselines import LABELS

__all__ = ["auroc_margin", "margin_summary", "mean_margin", "validation_values"]


def validation_values(baselines: Sequence[str], val: Mapping[str, float | None] | None) -> dict[str, float] | None:
    """``{baseline: validation value}`` when every baseline has a finite one; None otherwise (then the best
    baseline can only be picked on test)."""
    known = {k: float(v) for k, v in (val or {}).items() if k in baselines and v is not None and np.isfinite(v)}
    return known if set(known) == set(baselines) else None


def auroc_margin(
    model_scores: Any,
    baseline_scores: Mapping[str, Any],
    labels: Any,
    val_auroc: Mapping[str, float | None] | None,
    subjects: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    what: str = "image AUROC margin",
    labels_map: Mapping[str, str] = LABELS,
) -> dict[str, Any]:
    """Paired bootstrap CI of "model - best baseline" AUROC; the best baseline by ``val_auroc``.

    Args:
        model_scores: ``[N]`` model scores; baseline_scores: ``{report key: [N] scores}`` on the same items.
        labels: ``[N]`` 0/1; subjects: optional ``N`` ids (the bootstrap then resamples subjects).
        val_auroc: each baseline's validation AUROC (at its own validation-chosen setting); a missing or NaN entry
            means the best baseline is picked on test (``baseline_chosen_on: "test"``).
        n_boot: replicates (0: the point difference only, no CI, no verdict); seed: RNG seed.
        what: the margin's name in the verdict; labels_map: report key -> display name.

    Returns:
        ``meddiff.metrics.detection.margin_over_best_baseline``'s dict (``baseline``, ``baseline_chosen_on``,
        ``auroc_diff`` [+ ``auroc_diff_ci``], ...) plus ``baseline_val_auroc`` (when chosen on validation) and
        ``verdict``.
    """
    val = validation_values(list(baseline_scores), val_auroc)
    m = margin_over_best_baseline(model_scores, dict(baseline_scores), labels, subjects=subjects, val_auroc=val,
                                  n_boot=int(n_boot), seed=int(seed))
    if val is not None:
        m["baseline_val_auroc"] = val
    m["verdict"] = margin_verdict(m, what=what, label=labels_map.get(m["baseline"], m["baseline"]))
    return m


def mean_margin(
    model_values: Any,
    baseline_values: Mapping[str, Any],
    val_means: Mapping[str, float | None] | None,
    subjects: Sequence[Any] | None = None,
    higher_is_better: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    what: str = "margin",
    labels_map: Mapping[str, str] = LABELS,
) -> dict[str, Any]:
    """Paired bootstrap CI of the mean per-item margin of the model over the best baseline (positive = the model
    is better, whatever ``higher_is_better``); the best baseline by ``val_means`` (validation means).

    Returns ``meddiff.metrics.paired.margin_over_best``'s dict (``baseline``, ``baseline_chosen_on``, ``diff``,
    ``diff_ci``, ...) plus ``verdict``.
    """
    val = validation_values(list(baseline_values), val_means)
    m = margin_over_best(model_values, dict(baseline_values), subjects=subjects, val_means=val,
                         higher_is_better=higher_is_better, n_boot=max(int(n_boot), 1), seed=int(seed))
    name = labels_map.get(m["baseline"], m["baseline"])
    where = "chosen on validation" if m["baseline_chosen_on"] == "validation" else "the best on test"
    lo, hi = m["diff_ci"]
    stated = f"{what} {m['diff']:+.4g} [{lo:+.4g}, {hi:+.4g}] (paired 95% CI)"
    if lo > 0:
        m["verdict"] = f"The model beats the best baseline ({name}, {where}): {stated} excludes 0."
    elif hi < 0:
        m["verdict"] = f"The model is WORSE than the best baseline ({name}, {where}): {stated} is below 0."
    else:
        m["verdict"] = f"The model does NOT beat the best baseline ({name}, {where}): {stated} includes 0."
    return m


def margin_summary(margin: Mapping[str, Any] | None, metric: str) -> dict[str, float]:
    """Summary floats of an :func:`auroc_margin`: ``best_baseline_<metric>``, ``margin_<metric>`` and, with a CI,
    ``margin_<metric>_ci_lo`` / ``_ci_hi`` and ``model_beats_best_baseline`` (1.0 when the CI lies above 0)."""
    if not margin:
        return {}
    s = {f"best_baseline_{metric}": float(margin["auroc_baseline"]), f"margin_{metric}": float(margin["auroc_diff"])}
    if "auroc_diff_ci" in margin:
        s[f"margin_{metric}_ci_lo"], s[f"margin_{metric}_ci_hi"] = (float(v) for v in margin["auroc_diff_ci"])
        s["model_beats_best_baseline"] = float(margin["auroc_diff_ci"][0] > 0)
    return s
