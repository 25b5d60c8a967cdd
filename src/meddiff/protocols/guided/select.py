"""Selection on validation only: the healthy reference of the baselines (CN training volumes), then the slice ->
volume reduction of the model, the reduction and sign of the mean-intensity baseline and each healthy-set
baseline's reduction, all by AUROC (non-CN vs CN) on the validation volumes."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from meddiff.errors import ConfigError, DataError
from meddiff.protocols.base import ValidationView, chosen_on
from meddiff.protocols.common import MEAN_INTENSITY, build_healthy_baselines

from .options import REDUCTIONS, GuidedEvalOptions
from .translate import HealthyBaselines, VolumeResult, interleave_cap, translate_many

__all__ = ["GuidedSelection", "choose_on_validation", "healthy_baselines", "reduce_slices", "select_on_validation",
           "volume_scores"]

log = logging.getLogger(__name__)


def healthy_baselines(data: Any, opts: GuidedEvalOptions, device: torch.device) -> HealthyBaselines:
    """The ``eval.baselines`` built from the CN volumes of ``data.volumes("train")``.

    At most ``baseline_max_items`` slices: each CN volume contributes a seeded subset of at most
    ``ceil(max / n_cn_volumes)`` slices (one volume in memory at a time), then a seeded subset of the pool if it is
    still larger. No training volumes (e.g. ``eval.input`` without the training data): no baselines, ``note`` says so.
    """
    from meddiff.metrics.baselines import reference_subset

    if not opts.baselines:
        return HealthyBaselines(note="eval.baselines is empty")
    t0 = time.perf_counter()
    try:
        sources = [s for s in data.volumes("train").sources if s.slice_label == 1]
    except (DataError, ConfigError, OSError) as exc:
        log.warning("Healthy-set baselines skipped: no training volumes (%s).", exc)
        return HealthyBaselines(note=f"no training volumes: {exc}")
    if not sources:
        return HealthyBaselines(note="no CN volume in the training split")
    per_volume = math.ceil(int(opts.baseline_max_items) / len(sources))
    images, masks, n_total = [], [], 0
    for k, src in enumerate(sources):
        d = src.load()
        n_total += int(d.images.shape[0])
        idx = reference_subset(int(d.images.shape[0]), per_volume, int(opts.seed) + k)
        images.append(d.images[idx].float())
        masks.append(d.masks[idx])
    ref = torch.cat(images)
    if ref.shape[0] > int(opts.baseline_max_items):
        ref = ref[reference_subset(int(ref.shape[0]), int(opts.baseline_max_items), int(opts.seed))]
    built = build_healthy_baselines(ref, list(opts.baselines), device, n_healthy_total=n_total,
                                    fit_seconds=time.perf_counter() - t0)
    return HealthyBaselines({k: b.reconstruct for k, b in built.items()}, {k: b.cost for k, b in built.items()})


def reduce_slices(scores: np.ndarray, reduction: str) -> float:
    """Volume score from its slice scores ``[N]``: ``mean`` | ``median`` | ``p90`` | ``max`` (NaNs ignored)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return float("nan")
    if reduction == "mean":
        return float(s.mean())
    if reduction == "median":
        return float(np.median(s))
    if reduction == "p90":
        return float(np.percentile(s, 90))
    if reduction == "max":
        return float(s.max())
    raise ConfigError(f"unknown slice reduction {reduction!r}; choose one of {list(REDUCTIONS)}.")


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(scores)
    if ok.sum() < 2 or len(set(labels[ok].tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(labels[ok], scores[ok]))


def choose_on_validation(val: Sequence[VolumeResult], reductions: Sequence[str]) -> dict[str, Any]:
    """Pick the model's slice->volume reduction, the mean-intensity baseline's reduction and sign, and each healthy-set
    baseline's reduction (``VolumeResult.baselines``; distances, sign +1) on validation volumes.

    Criterion: AUROC of any non-CN class vs CN (ties: first in ``reductions``; the baseline prefers sign +1).
    Without both classes among the validation volumes the defaults (``reductions[0]``, sign +1) are kept and
    ``chosen_on`` is ``"defaults"``. ``best_val_auroc``: each baseline's validation AUROC at its choice (used to
    name the best baseline for the margin).
    """
    names = list(val[0].baselines) if val else []
    out: dict[str, Any] = {
        "chosen_on": "validation",
        "n_val_volumes": len(val),
        "criterion": "AUROC non-CN vs CN",
        "model_reduction": reductions[0],
        "baseline_reduction": reductions[0],
        "baseline_sign": 1,
        "val_auroc": {},
        "val_auroc_baseline": {},
        "baselines": {k: {"reduction": reductions[0]} for k in names},
        "best_val_auroc": {},
    }
    labels = np.array([int((r.source.slice_label or 1) != 1) for r in val])
    if len(val) < 2 or len(set(labels.tolist())) < 2:
        out["note"] = "validation lacks CN or non-CN volumes: defaults kept"
        out["chosen_on"] = "defaults"
        return out
    best_m, best_b = (-1.0, None), (-1.0, None)
    for red in reductions:
        m = np.array([reduce_slices(r.score, red) for r in val])
        b = np.array([reduce_slices(r.baseline, red) for r in val])
        am = _auroc(m, labels)
        out["val_auroc"][red] = am
        if np.isfinite(am) and am > best_m[0]:
            best_m = (am, red)
        for sign in (1, -1):
            ab = _auroc(sign * b, labels)
            out["val_auroc_baseline"][f"{red}{'+' if sign > 0 else '-'}"] = ab
            if np.isfinite(ab) and ab > best_b[0]:
                best_b = (ab, (red, sign))
    if best_m[1] is not None:
        out["model_reduction"] = best_m[1]
    if best_b[1] is not None:
        out["baseline_reduction"], out["baseline_sign"] = best_b[1]
        out["best_val_auroc"][MEAN_INTENSITY] = best_b[0]
    for name in names:
        table = {red: _auroc(np.array([reduce_slices(r.baselines[name], red) for r in val]), labels) for red in reductions}
        finite = [red for red in reductions if np.isfinite(table[red])]
        rec = out["baselines"][name]
        rec["val_auroc"] = table
        if finite:
            best = max(finite, key=lambda red: (table[red], -reductions.index(red)))  # ties: first candidate
            rec["reduction"] = best
            out["best_val_auroc"][name] = table[best]
    return out


def select_on_validation(
    model: Any,
    data: ValidationView,
    sampling: Any,
    opts: GuidedEvalOptions,
    device: torch.device,
    baselines: HealthyBaselines | None = None,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Choose the slice -> volume reduction (and the baseline's reduction and sign) on the validation volumes.

    Returns ``(choice, skipped validation volumes)``. With ``eval.input`` the training data may be absent: then
    there are no validation volumes and the defaults are kept (``choice["note"]`` says so).
    """
    try:
        val_sources = data.volumes("val").sources
    except DataError as exc:
        if opts.input is None:
            raise
        log.warning("No validation volumes (%s); the slice -> volume reduction keeps its default.", exc)
        val_sources = []
    val_results: list[VolumeResult] = []
    val_bad: list[dict[str, str]] = []
    if val_sources:
        val_sources = interleave_cap(val_sources, opts.val_max_volumes)
        val_results, val_bad = translate_many(
            model, val_sources, sampling, opts, device, None, 0, True, "val", baselines=baselines
        )
    choice = choose_on_validation(val_results, opts.reductions)
    # what selection actually asked the DataModule for, and whether validation volumes were compared at all
    choice["chosen_on"] = chosen_on(data.splits_read, choice["chosen_on"] == "validation", "defaults")
    choice["splits_read"] = data.splits_read
    for rec in choice["baselines"].values():  # each healthy-set baseline's reduction: chosen with the model's
        rec["chosen_on"] = choice["chosen_on"]
    return choice, [{**s, "split": "val"} for s in val_bad]


@dataclass
class GuidedSelection:
    """What selection chose: the translation settings (a copy of ``model.sampling`` with the ``eval.*`` overrides), the
    healthy-set baselines (their reference from the CN training volumes), the reductions and their record
    (``choice``: written as ``report["selection"]``), and validation volumes that could not be evaluated."""

    sampling: Any
    baselines: HealthyBaselines
    choice: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)


def volume_scores(results: Sequence[VolumeResult], choice: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Volume scores ``[V]`` of the model and every baseline, each reduced with its choice from validation."""
    out = {
        "model": np.array([reduce_slices(r.score, choice["model_reduction"]) for r in results]),
        MEAN_INTENSITY: float(choice["baseline_sign"])
        * np.array([reduce_slices(r.baseline, choice["baseline_reduction"]) for r in results]),
    }
    for key, rec in (choice.get("baselines") or {}).items():
        out[key] = np.array([reduce_slices(r.baselines[key], rec["reduction"]) for r in results])
    return out
