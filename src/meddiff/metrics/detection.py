"""Image-level detection metrics: AUROC and AUPRC with stratified bootstrap confidence intervals, the cluster
(subject / patient) bootstrap, and paired bootstrap CIs of a model's margin over a baseline.

Scores: larger = more anomalous. Labels: 0 healthy / 1 anomalous. Point estimates come from scikit-learn
(``roc_auc_score``, ``average_precision_score``). The bootstrap resamples positives and negatives separately
(each replicate keeps ``n_pos`` positives and ``n - n_pos`` negatives, so both classes are always present) and
is vectorised: a replicate is a vector of multiplicities over the original samples, and AUROC (trapezoid, ties
count one half) and average precision (step rule, as scikit-learn) are computed for a whole block of
replicates at once from weighted cumulative sums over the samples sorted once. The draws come in blocks of bounded
memory (``~4e6`` numbers) from ``meddiff.metrics.bootstrap``, which every bootstrap of the package shares. The CI is
the percentile interval of the replicates.

Where items come in clusters (slices of one patient/volume), items are not independent and an item bootstrap
gives intervals that are too narrow: ``detection_ci(..., subjects=...)`` resamples subjects (each keeps all its
items; subjects stratified by composition). ``paired_difference`` applies the *same* replicate weights to two
score vectors of the same items (model and baseline), so the CI of "model - baseline" reflects the correlation
between them; it resamples subjects when ``subjects`` are given.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.bootstrap import block_rows, check_boot_args, percentile_interval, resample_blocks


def to_numpy_1d(x: Any, name: str) -> np.ndarray:
    """A 1D numpy copy of a tensor / array / sequence (``DataError`` if it is not 1D after squeezing)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        arr = arr.squeeze()
        if arr.ndim == 0:
            arr = arr.reshape(1)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1D (one value per image); got shape {np.asarray(x).shape}.")
    return arr


def check_scores_labels(scores: Any, labels: Any, need_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``scores [N]`` (finite floats) and ``labels [N]`` (0/1) to numpy.

    Returns:
        ``(scores float64 [N], labels bool [N])``.

    Raises:
        DataError: mismatched lengths, non-finite scores, labels other than 0/1, or (``need_both``) a single
            class.
    """
    s = to_numpy_1d(scores, "scores").astype(np.float64)
    y_raw = to_numpy_1d(labels, "labels")
    if s.shape != y_raw.shape:
        raise DataError(
            f"scores and labels must have the same length; got {s.shape[0]} and {y_raw.shape[0]}."
        )
    if s.size == 0:
        raise DataError("scores are empty; at least one healthy and one anomalous image are needed.")
    bad = ~np.isfinite(s)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} scores are NaN/inf (first at index {int(np.argmax(bad))}); drop those images "
            "(e.g. empty brain masks scored with empty_value=nan) before computing metrics."
        )
    uniq = np.unique(y_raw)
    if not np.isin(uniq, [0, 1]).all():
        raise DataError(f"labels must be 0 (healthy) or 1 (anomalous); found values {uniq.tolist()[:10]}.")
    y = y_raw.astype(bool)
    if need_both:
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            only = "anomalous (1)" if n_pos else "healthy (0)"
            raise DataError(
                f"only one class present: all {y.size} labels are {only}; AUROC/AUPRC need both healthy and "
                "anomalous images in the evaluated set."
            )
    return s, y


def weighted_auroc_ap(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for many sample weightings at once.

    Args:
        scores: ``[N]`` float; labels: ``[N]`` bool; weights: ``[R, N]`` non-negative (e.g. bootstrap counts),
            each row with positive total weight on both classes.

    Returns:
        ``(auroc [R], ap [R])``, equal to scikit-learn's ``roc_auc_score`` / ``average_precision_score`` with
        ``sample_weight=weights[r]``.
    """
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = labels[order]
    w = np.asarray(weights, dtype=np.float64)[:, order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each distinct score (descending)
    tp = np.cumsum(w * y, axis=1)[:, ends]
    fp = np.cumsum(w * ~y, axis=1)[:, ends]
    tpr = tp / tp[:, -1:]
    fpr = fp / fp[:, -1:]
    zeros = np.zeros((w.shape[0], 1))
    tpr0 = np.concatenate([zeros, tpr], axis=1)
    fpr0 = np.concatenate([zeros, fpr], axis=1)
    auroc = np.sum(np.diff(fpr0, axis=1) * (tpr0[:, 1:] + tpr0[:, :-1]) * 0.5, axis=1)
    pred_pos = tp + fp
    precision = np.divide(tp, pred_pos, out=np.zeros_like(tp), where=pred_pos > 0)
    ap = np.sum(np.diff(tpr0, axis=1) * precision, axis=1)
    return auroc, ap


def _strata_weight_blocks(
    strata: Sequence[np.ndarray], n_units: int, n_boot: int, seed: int, expand: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Bootstrap replicate weights in blocks: each stratum of units resampled with replacement to its own size.

    Yields ``[r, N]`` float64 multiplicities (``sum(r) = n_boot``); with ``expand`` (unit of each item, ``[N]``)
    a unit's multiplicity is given to every one of its items (the cluster bootstrap).
    """
    n_items = n_units if expand is None else expand.size
    for draws in resample_blocks(strata, n_boot, seed, block_rows(max(n_units, n_items))):
        r = draws.shape[0]
        offsets = (np.arange(r) * n_units)[:, None]
        w = np.bincount((draws + offsets).ravel(), minlength=r * n_units).reshape(r, n_units).astype(np.float64)
        yield w if expand is None else w[:, expand]


def _item_weight_blocks(y: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Stratified item bootstrap: positives and negatives resampled separately."""
    return _strata_weight_blocks((np.flatnonzero(y), np.flatnonzero(~y)), y.size, n_boot, seed)


def _cluster_weight_blocks(y: np.ndarray, subjects: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Cluster bootstrap: subjects resampled with replacement, each keeping all its items.

    Subjects are stratified by composition (all anomalous / mixed / all healthy), each stratum resampled to its own
    size, so every replicate holds both classes whenever the data does.
    """
    _, inv = np.unique(subjects, return_inverse=True)
    n_sub = int(inv.max()) + 1
    n_pos = np.bincount(inv, weights=y.astype(np.float64), minlength=n_sub)
    n_all = np.bincount(inv, minlength=n_sub)
    kind = np.where(n_pos == n_all, 2, np.where(n_pos > 0, 1, 0))
    strata = [idx for idx in (np.flatnonzero(kind == k) for k in (2, 1, 0)) if idx.size]
    return _strata_weight_blocks(strata, n_sub, n_boot, seed, expand=inv)


def _bootstrap(s: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    aurocs, aps = [], []
    for w in _item_weight_blocks(y, n_boot, seed):
        a, p = weighted_auroc_ap(s, y, w)
        aurocs.append(a)
        aps.append(p)
    return np.concatenate(aurocs), np.concatenate(aps)


def image_level(
    scores: Any, labels: Any, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict[str, Any]:
    """Image-level AUROC / AUPRC with stratified-bootstrap percentile confidence intervals.

    Args:
        scores: ``[N]`` finite anomaly scores (tensor, array or sequence), larger = more anomalous.
        labels: ``[N]`` 0 healthy / 1 anomalous; both classes must be present.
        n_boot: bootstrap replicates (0 = no CI: the intervals are ``(nan, nan)``).
        seed: RNG seed; the same inputs and seed give the same intervals.
        ci: interval level in ``(0, 1)``.

    Returns:
        ``{"auroc": float, "auroc_ci": (lo, hi), "auprc": float, "auprc_ci": (lo, hi), "n": int,
        "n_pos": int}``; AUROC in ``[0, 1]``, AUPRC in ``(0, 1]`` (chance level = ``n_pos / n``).
    """
    check_boot_args(n_boot, ci)
    s, y = check_scores_labels(scores, labels)
    auroc = float(roc_auc_score(y, s))
    auprc = float(average_precision_score(y, s))
    if n_boot > 0:
        boot_auroc, boot_ap = _bootstrap(s, y, n_boot, seed)
        auroc_ci, auprc_ci = percentile_interval(boot_auroc, ci), percentile_interval(boot_ap, ci)
    else:
        auroc_ci = auprc_ci = (float("nan"), float("nan"))
    return {
        "auroc": auroc,
        "auroc_ci": auroc_ci,
        "auprc": auprc,
        "auprc_ci": auprc_ci,
        "n": int(y.size),
        "n_pos": int(y.sum()),
    }


def roc_curve_points(scores: Any, labels: Any) -> dict[str, np.ndarray]:
    """ROC curve for plotting: ``{"fpr": [K], "tpr": [K], "thresholds": [K]}`` (scikit-learn ``roc_curve``)."""
    s, y = check_scores_labels(scores, labels)
    fpr, tpr, thr = roc_curve(y, s)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr}


def pr_curve_points(scores: Any, labels: Any) -> dict[str, np.ndarray]:
    """Precision-recall curve for plotting: ``{"precision": [K+1], "recall": [K+1], "thresholds": [K]}``."""
    s, y = check_scores_labels(scores, labels)
    precision, recall, thr = precision_recall_curve(y, s)
    return {"precision": precision, "recall": recall, "thresholds": thr}


def aggregate_by_subject(
    scores: Any, labels: Any, subjects: Sequence[str], reduction: str = "mean"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Slice scores to subject scores (subject label = 1 if any of its slices is anomalous).

    Args:
        scores: ``[N]`` slice scores; labels: ``[N]`` 0/1; subjects: ``N`` subject ids.
        reduction: ``"mean"`` or ``"max"`` over a subject's slices.

    Returns:
        ``(subject_ids sorted, scores [S] float64, labels [S] int64)``.
    """
    if reduction not in ("mean", "max"):
        raise ConfigError(f"unknown subject reduction {reduction!r}; choose one of ['mean', 'max'].")
    s, y = check_scores_labels(scores, labels, need_both=False)
    subj = np.asarray([str(v) for v in subjects])
    if subj.shape != s.shape:
        raise DataError(
            f"subjects must have one id per score; got {subj.shape[0]} ids for {s.shape[0]} scores."
        )
    ids, inv = np.unique(subj, return_inverse=True)
    counts = np.bincount(inv, minlength=ids.size)
    if reduction == "mean":
        out = np.bincount(inv, weights=s, minlength=ids.size) / counts
    else:
        out = np.full(ids.size, -np.inf)
        np.maximum.at(out, inv, s)
    lab = np.zeros(ids.size, dtype=np.int64)
    np.maximum.at(lab, inv, y.astype(np.int64))
    return ids.tolist(), out, lab


def _check_subjects(subjects: Sequence[Any] | None, n: int) -> np.ndarray | None:
    if subjects is None:
        return None
    subj = np.asarray([str(v) for v in subjects])
    if subj.shape != (n,):
        raise DataError(f"subjects must have one id per score; got {subj.size} ids for {n} scores.")
    return subj


def _weight_blocks(y: np.ndarray, subj: np.ndarray | None, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    return _item_weight_blocks(y, n_boot, seed) if subj is None else _cluster_weight_blocks(y, subj, n_boot, seed)


def detection_ci(
    scores: Any,
    labels: Any,
    subjects: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Image-level AUROC / AUPRC with a bootstrap CI that resamples subjects when ``subjects`` are given.

    Args:
        scores: ``[N]`` item scores (larger = more anomalous); labels: ``[N]`` 0/1 (both classes present).
        subjects: ``N`` subject / patient ids (None = items are independent: the stratified item bootstrap of
            ``image_level``, with identical numbers).
        n_boot, seed, ci: as ``image_level``.

    Returns:
        ``image_level``'s keys (point estimates over items) plus ``"resampled": "items" | "subjects"`` and, with
        subjects, ``"n_subjects"``.
    """
    check_boot_args(n_boot, ci)
    s, y = check_scores_labels(scores, labels)
    subj = _check_subjects(subjects, s.size)
    if subj is None:
        return {**image_level(s, y.astype(int), n_boot=n_boot, seed=seed, ci=ci), "resampled": "items"}
    out: dict[str, Any] = {
        "auroc": float(roc_auc_score(y, s)),
        "auprc": float(average_precision_score(y, s)),
        "n": int(y.size),
        "n_pos": int(y.sum()),
        "n_subjects": int(np.unique(subj).size),
        "resampled": "subjects",
    }
    if n_boot > 0:
        boots = [weighted_auroc_ap(s, y, w) for w in _cluster_weight_blocks(y, subj, n_boot, seed)]
        out["auroc_ci"] = percentile_interval(np.concatenate([b[0] for b in boots]), ci)
        out["auprc_ci"] = percentile_interval(np.concatenate([b[1] for b in boots]), ci)
    else:
        out["auroc_ci"] = out["auprc_ci"] = (float("nan"), float("nan"))
    return out


def paired_difference(
    scores_model: Any,
    scores_baseline: Any,
    labels: Any,
    subjects: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Paired bootstrap CI of "model - baseline" image AUROC (and AUPRC) on the same items.

    Every replicate draws one set of resampling weights and evaluates *both* score vectors with it, so the
    interval reflects how the two scores co-vary on the same items (identical scores give exactly 0).

    Args:
        scores_model, scores_baseline: ``[N]`` scores of the same items in the same order.
        labels: ``[N]`` 0/1; subjects: optional ``N`` ids (then subjects are resampled, see ``detection_ci``).
        n_boot: replicates (0: the point differences only, no CI); seed, ci: as ``image_level``.

    Returns:
        ``{"auroc_model", "auroc_baseline", "auroc_diff", "auroc_diff_ci": (lo, hi), "auprc_model",
        "auprc_baseline", "auprc_diff", "auprc_diff_ci", "frac_diff_le_0" (share of replicates where the model's
        AUROC margin is <= 0), "ci_excludes_0" (lo > 0 or hi < 0), "n", "n_pos", "n_boot", "resampled"}``
        (+ ``"n_subjects"``); with ``n_boot=0`` without the ``_ci``, ``frac_diff_le_0`` and ``ci_excludes_0`` keys.
    """
    check_boot_args(n_boot, ci)
    sm, y = check_scores_labels(scores_model, labels)
    sb, _ = check_scores_labels(scores_baseline, labels)  # same length as labels, hence as the model's scores
    subj = _check_subjects(subjects, sm.size)
    if n_boot == 0:
        auroc_m, auroc_b = float(roc_auc_score(y, sm)), float(roc_auc_score(y, sb))
        auprc_m, auprc_b = float(average_precision_score(y, sm)), float(average_precision_score(y, sb))
        point: dict[str, Any] = {"auroc_model": auroc_m, "auroc_baseline": auroc_b, "auroc_diff": auroc_m - auroc_b,
                                 "auprc_model": auprc_m, "auprc_baseline": auprc_b, "auprc_diff": auprc_m - auprc_b,
                                 "n": int(y.size), "n_pos": int(y.sum()), "n_boot": 0}
        return point
    diffs_auroc, diffs_ap = [], []
    for w in _weight_blocks(y, subj, n_boot, seed):
        am, pm = weighted_auroc_ap(sm, y, w)
        ab, pb = weighted_auroc_ap(sb, y, w)
        diffs_auroc.append(am - ab)
        diffs_ap.append(pm - pb)
    d_auroc = np.concatenate(diffs_auroc)
    d_ap = np.concatenate(diffs_ap)
    auroc_m, auroc_b = float(roc_auc_score(y, sm)), float(roc_auc_score(y, sb))
    auprc_m, auprc_b = float(average_precision_score(y, sm)), float(average_precision_score(y, sb))
    lo, hi = percentile_interval(d_auroc, ci)
    out: dict[str, Any] = {
        "auroc_model": auroc_m,
        "auroc_baseline": auroc_b,
        "auroc_diff": auroc_m - auroc_b,
        "auroc_diff_ci": (lo, hi),
        "auprc_model": auprc_m,
        "auprc_baseline": auprc_b,
        "auprc_diff": auprc_m - auprc_b,
        "auprc_diff_ci": percentile_interval(d_ap, ci),
        "frac_diff_le_0": float(np.mean(d_auroc <= 0.0)),
        "ci_excludes_0": bool(lo > 0.0 or hi < 0.0),
        "n": int(y.size),
        "n_pos": int(y.sum()),
        "n_boot": int(n_boot),
        "resampled": "items" if subj is None else "subjects",
    }
    if subj is not None:
        out["n_subjects"] = int(np.unique(subj).size)
    return out


def margin_over_best_baseline(
    scores_model: Any,
    baselines: Mapping[str, Any],
    labels: Any,
    subjects: Sequence[Any] | None = None,
    val_auroc: Mapping[str, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """``paired_difference`` of the model against the best of several baselines.

    The best baseline is the one with the highest *validation* AUROC when ``val_auroc`` (name -> AUROC) is given
    (``"baseline_chosen_on": "validation"``). Without it, the one with the highest test AUROC is taken
    (``"baseline_chosen_on": "test"``): a choice on test that can only make the model's margin smaller, never larger.

    Returns:
        ``paired_difference``'s dict plus ``"baseline"`` (its name) and ``"baseline_chosen_on"``.
    """
    if not baselines:
        raise ConfigError("baselines is empty; pass {name: scores} of at least one baseline.")
    if val_auroc is not None:
        missing = sorted(set(baselines) - set(val_auroc))
        if missing:
            raise ConfigError(f"val_auroc lacks baselines {missing}; give every baseline's validation AUROC.")
        best = max(baselines, key=lambda k: (float(val_auroc[k]), k))
        chosen_on = "validation"
    else:
        test_auroc = {k: detection_ci(v, labels, n_boot=0)["auroc"] for k, v in baselines.items()}
        best = max(baselines, key=lambda k: (test_auroc[k], k))
        chosen_on = "test"
    res = paired_difference(scores_model, baselines[best], labels, subjects, n_boot=n_boot, seed=seed, ci=ci)
    return {"baseline": best, "baseline_chosen_on": chosen_on, **res}


def margin_verdict(margin: Mapping[str, Any], what: str = "image AUROC margin", label: str | None = None) -> str:
    """One plain sentence: does the model beat the best baseline (paired 95% CI of its AUROC margin)?

    Args:
        margin: ``margin_over_best_baseline``'s dict (``"baseline"``, ``"baseline_chosen_on"``, ``"auroc_diff"`` and,
            when a bootstrap ran, ``"auroc_diff_ci"``).
        what: the margin's name in the sentence, e.g. ``"AD vs CN volume AUROC margin"``.
        label: the baseline's display name (default ``margin["baseline"]``).

    Returns:
        "beats" when the CI lies above 0, "is WORSE" when below, "does NOT beat" when it holds 0, and "no verdict"
        without a CI.
    """
    name = margin["baseline"] if label is None else label
    where = "chosen on validation" if margin.get("baseline_chosen_on") == "validation" else "the best on test"
    what = f"{what} {margin['auroc_diff']:+.3f}"
    if "auroc_diff_ci" not in margin:
        return f"Model vs the best baseline ({name}, {where}): {what}; no CI (eval.n_boot=0), so no verdict."
    lo, hi = margin["auroc_diff_ci"]
    stated = f"{what} [{lo:+.3f}, {hi:+.3f}] (paired 95% CI)"
    if lo > 0:
        return f"The model beats the best baseline ({name}, {where}): {stated} excludes 0."
    if hi < 0:
        return f"The model is WORSE than the best baseline ({name}, {where}): {stated} is below 0."
    return f"The model does NOT beat the best baseline ({name}, {where}): {stated} includes 0."
