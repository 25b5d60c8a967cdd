"""Paired bootstrap CI of a mean per-item difference, e.g. "DDPM PSNR - best classical baseline PSNR" over test slices.

Both methods are scored on the same items; the bootstrap resamples items (or subjects / volumes, keeping all their
slices, when ``subjects`` are given) and recomputes the mean of the per-item differences, so the interval reflects
how the two methods co-vary on the same slices. Image-level AUROC differences live in
``meddiff.metrics.detection.paired_difference``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.bootstrap import block_rows, check_boot_args, percentile_interval, resample_blocks
from meddiff.metrics.detection import to_numpy_1d


def paired_mean_difference(
    values_a: Any,
    values_b: Any,
    subjects: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Mean of ``a - b`` over items with a paired (optionally cluster) bootstrap percentile CI.

    Args:
        values_a, values_b: ``[N]`` finite per-item values of two methods on the same items (e.g. PSNR in dB).
        subjects: optional ``N`` ids (volume / patient): subjects are resampled with all their items.
        n_boot: replicates (>= 1); seed: RNG seed; ci: interval level in ``(0, 1)``.

    Returns:
        ``{"mean_a", "mean_b", "diff", "diff_ci": (lo, hi), "ci_excludes_0", "frac_diff_le_0", "n", "n_boot",
        "resampled": "items" | "subjects"}`` (+ ``"n_subjects"``). ``diff = mean_a - mean_b`` over items.
    """
    check_boot_args(n_boot, ci, minimum=1)
    a = to_numpy_1d(values_a, "values_a").astype(np.float64)
    b = to_numpy_1d(values_b, "values_b").astype(np.float64)
    if a.shape != b.shape or a.size == 0:
        raise DataError(f"values_a and values_b must be non-empty and of one length; got {a.size} and {b.size}.")
    bad = ~(np.isfinite(a) & np.isfinite(b))
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} items have NaN/inf values (first at index {int(np.argmax(bad))}); drop them first "
            "(e.g. PSNR of identical images is +inf: cap it with max_psnr)."
        )
    d = a - b
    if subjects is None:
        unit_of = np.arange(d.size)
        n_units = d.size
    else:
        subj = np.asarray([str(v) for v in subjects])
        if subj.shape != d.shape:
            raise DataError(f"subjects must have one id per item; got {subj.size} ids for {d.size} items.")
        _, unit_of = np.unique(subj, return_inverse=True)
        n_units = int(unit_of.max()) + 1
    unit_sum = np.bincount(unit_of, weights=d, minlength=n_units)
    unit_n = np.bincount(unit_of, minlength=n_units).astype(np.float64)
    boot = np.concatenate([
        unit_sum[draws].sum(axis=1) / unit_n[draws].sum(axis=1)
        for draws in resample_blocks([np.arange(n_units)], n_boot, seed, block_rows(n_units))
    ])
    lo, hi = percentile_interval(boot, ci)
    out: dict[str, Any] = {
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": float(d.mean()),
        "diff_ci": (lo, hi),
        "ci_excludes_0": bool(lo > 0.0 or hi < 0.0),
        "frac_diff_le_0": float(np.mean(boot <= 0.0)),
        "n": int(d.size),
        "n_boot": int(n_boot),
        "resampled": "items" if subjects is None else "subjects",
    }
    if subjects is not None:
        out["n_subjects"] = int(n_units)
    return out


def margin_over_best(
    values_model: Any,
    baselines: Mapping[str, Any],
    subjects: Sequence[Any] | None = None,
    val_means: Mapping[str, float] | None = None,
    higher_is_better: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """``paired_mean_difference`` of the model against the best baseline (per-item metric, e.g. PSNR).

    The best baseline has the best *validation* mean when ``val_means`` is given (``"baseline_chosen_on":
    "validation"``); otherwise the best test mean (``"test"``: a choice that can only shrink the model's margin).
    With ``higher_is_better=False`` (e.g. MAE) the difference is ``baseline - model``, so a positive margin always
    means the model is better.
    """
    if not baselines:
        raise ConfigError("baselines is empty; pass {name: per-item values} of at least one baseline.")
    sign = 1.0 if higher_is_better else -1.0
    if val_means is not None:
        missing = sorted(set(baselines) - set(val_means))
        if missing:
            raise ConfigError(f"val_means lacks baselines {missing}; give every baseline's validation mean.")
        best = max(baselines, key=lambda k: (sign * float(val_means[k]), k))
        chosen_on = "validation"
    else:
        best = max(baselines, key=lambda k: (sign * float(np.mean(to_numpy_1d(baselines[k], k))), k))
        chosen_on = "test"
    a, b = (values_model, baselines[best]) if higher_is_better else (baselines[best], values_model)
    res = paired_mean_difference(a, b, subjects, n_boot=n_boot, seed=seed, ci=ci)
    return {"baseline": best, "baseline_chosen_on": chosen_on, "higher_is_better": higher_is_better, **res}
