"""Selection on validation: the depth and scoring setting of the model, each healthy-set baseline's own setting,
the pixel thresholds; nothing here reads the test split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from meddiff.anomaly.scoring import ScoringConfig
from meddiff.metrics.detection import detection_ci
from meddiff.metrics.image_threshold import f1_max_threshold
from meddiff.metrics.pixel import PixelAccumulator, choose_threshold
from meddiff.protocols.base import ValidationView
from meddiff.protocols.common import (
    MEAN_INTENSITY,
    MODEL,
    build_healthy_baselines,
    load_healthy_reference,
)

from .cost import choose, cost_record, sampling_candidates, unet_cost
from .interfaces import ReconFn
from .options import EvalOptions
from .passes import Collected, matching_pixel_acc, model_fn, run_pass

__all__ = ["AnomalySelection", "BaselineChoice", "healthy_training_set", "select_on_validation"]

log = logging.getLogger(__name__)


@dataclass
class BaselineChoice:
    """A healthy-set baseline and what validation chose for it (its own setting and pixel threshold)."""

    reconstruct: ReconFn
    cost: Any  # meddiff.metrics.baselines.BaselineCost (updated by every query)
    scoring: ScoringConfig
    threshold: float | None = None
    val_auroc: float | None = None
    chosen_on: str = "config"

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"chosen_on": self.chosen_on, "scoring": self.scoring.as_dict()}
        if self.val_auroc is not None:
            out["val_auroc"] = self.val_auroc
        if self.threshold is not None:
            out["pixel_threshold"] = self.threshold
        return out


def _healthy_baselines(healthy: Any, opts: EvalOptions, device: torch.device,
                       default: ScoringConfig) -> dict[str, BaselineChoice]:
    """The requested healthy-set baselines built from ``healthy`` (map-style dataset of ``{"image": ...}`` items,
    e.g. the training set; label-1 items skipped): one load of a fixed seeded subset of <= ``baseline_max_items``."""
    kinds = opts.healthy_baselines()
    if not kinds or healthy is None:
        return {}
    ref, n_total, seconds = load_healthy_reference(healthy, opts.baseline_max_items, opts.seed)
    built = build_healthy_baselines(ref, kinds, device, n_healthy_total=n_total, fit_seconds=seconds)
    return {key: BaselineChoice(_batch_fn(b.reconstruct), b.cost, default) for key, b in built.items()}


def _batch_fn(reconstruct: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> ReconFn:
    """A baseline's ``reconstruct(x, region)`` as a batch -> healthy estimate function."""
    return lambda b: reconstruct(b["image"].float(), b.get("brain_mask"))


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(detection_ci(scores, labels, n_boot=0)["auroc"])


def _threshold(acc: PixelAccumulator | None) -> float | None:
    return None if acc is None else choose_threshold(acc)


# ------------------------------------------------------------------------------------------------- selection
@dataclass
class AnomalySelection:
    """What validation chose: the scoring setting, the sampling (a copy of ``model.sampling``; None = the model's
    own), the pixel thresholds, each healthy-set baseline's own choice, and the record written into
    ``report["selection"]``."""

    scoring: ScoringConfig
    sampling: Any | None
    threshold: float | None
    base_threshold: float | None
    record: dict[str, Any]
    baselines: dict[str, BaselineChoice] = field(default_factory=dict)
    base_val_auroc: float | None = None  # the mean-intensity baseline's validation AUROC


def _depth_candidates(model: Any, opts: EvalOptions) -> list[Any | None]:
    """Copies of the model's reconstruction config (a dataclass with ``t_start``), one per ``eval.t_start`` x
    ``eval.draws`` x ``eval.steps`` (validated); ``[None]`` = as is (:func:`.cost.sampling_candidates`)."""
    return sampling_candidates(model, opts)


def _sampling_fields(sampling: Any | None) -> dict[str, Any]:
    """The tried sampling fields of a candidate row (draws, steps, UNet cost); {} for the model's own settings."""
    if sampling is None:
        return {}
    return {"draws": getattr(sampling, "draws", None), "steps": getattr(sampling, "steps", None),
            "unet_cost": unet_cost(sampling)}


def _t_start(model: Any, sampling: Any | None) -> int | None:
    cfg = sampling if sampling is not None else getattr(model, "sampling", None)
    return getattr(cfg, "t_start", None)


def select_on_validation(
    model: Any,
    val_loader: Iterable | None,
    opts: EvalOptions,
    device: torch.device | str = "cpu",
    healthy: Any = None,
) -> AnomalySelection:
    """Choose (depth, post-processing) by validation image AUROC and the pixel threshold by validation Dice, for
    the model and, separately, for each healthy-set baseline built from ``healthy`` (the healthy training set).

    ``val_loader`` None (``eval.select_on_val=false``) keeps the model's configured settings for all.
    """
    device = torch.device(device)
    default = model.anomaly_val.scoring
    candidates = opts.candidates(default)
    baselines = _healthy_baselines(healthy, opts, device, default)
    chosen_idx, threshold, base_threshold, base_val_auroc = 0, None, None, None
    chosen_sampling: Any | None = None
    record: dict[str, Any] = {}
    compared = False
    if val_loader is not None:
        best: tuple[float, Any | None, int, Collected] | None = None
        first: Collected | None = None
        rows = []
        per_setting: list[tuple[float, Any | None, int, Collected]] = []  # each setting's best scoring (cost rule)
        for k, sampling in enumerate(_depth_candidates(model, opts)):
            t_start = _t_start(model, sampling)
            methods = {MODEL: (model_fn(model, sampling), candidates)}
            if k == 0:  # the baselines do not depend on the depth: scored on the first pass only
                methods.update({name: (b.reconstruct, candidates) for name, b in baselines.items()})
            val = run_pass(val_loader, methods, opts, device, f"val t_start={t_start}: reconstruct + score")
            if first is None:
                first = val
            y_val = val.y()
            record["n_validation_items"] = int(y_val.size)
            if len(np.unique(y_val)) < 2:
                log.warning("Validation split has %s: keeping the configured scoring %s.",
                            "no items" if y_val.size == 0 else "one class only", default)
                best = (float("nan"), sampling, 0, val)
                break
            aurocs = [_auroc(val.cat(MODEL, j), y_val) for j in range(len(candidates))]
            cost = _sampling_fields(sampling)
            rows += [{"t_start": t_start, **cost, **c.as_dict(), "val_auroc": a} for c, a in zip(candidates, aurocs)]
            j = int(np.argmax(aurocs))
            compared = True
            per_setting.append((aurocs[j], sampling, j, val))
        if compared:  # the best setting, or with eval.cost_delta the cheapest one within delta of it
            costs = [unet_cost(r) for _, r, _, _ in per_setting]
            k = choose([a for a, _, _, _ in per_setting], costs, opts.cost_delta)
            best = per_setting[k]
            if len(per_setting) > 1 or opts.cost_delta is not None:
                record["cost_rule"] = cost_record([a for a, _, _, _ in per_setting], costs, k, opts.cost_delta)
        assert best is not None and first is not None
        val_auroc, chosen_sampling, chosen_idx, val = best
        if compared:
            record.update(candidates=rows, image_auroc=val_auroc, t_start=_t_start(model, chosen_sampling))
            pix = matching_pixel_acc(val.pixel[MODEL], candidates, chosen_idx)
        else:  # nothing compared: the model's own depth; a threshold only from a pass at that depth
            chosen_sampling, chosen_idx = None, 0
            pix = matching_pixel_acc(val.pixel[MODEL], candidates, 0) if opts.t_start is None else None
        threshold = _threshold(pix)
        if threshold is not None:
            record["pixel_threshold"] = threshold
            record["pixel_dice_at_threshold"] = pix.dice_at(threshold)  # type: ignore[union-attr]
            record["threshold_chosen_on"] = "validation"
        if compared:  # the image-level operating point (meddiff-predict's `anomalous` column), F1-max on validation
            image_thr, image_f1 = f1_max_threshold(val.cat(MODEL, chosen_idx), val.y())
            record.update(image_threshold=image_thr, image_f1_at_threshold=image_f1,
                          image_threshold_rule="F1-max on validation (anomalous when score >= threshold)")
        base_threshold = _threshold(first.pixel_intensity)
        y_first = first.y()
        base_record: dict[str, Any] = {}
        if compared:
            base_val_auroc = _auroc(first.intensity_scores(), y_first)
            base_record["val_auroc"] = base_val_auroc
        if base_threshold is not None:
            base_record["pixel_threshold"] = base_threshold
        if base_record:  # its validation AUROC and pixel threshold come from the validation pass
            record[MEAN_INTENSITY] = {"chosen_on": "validation", **base_record}
        for name, b in baselines.items():
            if compared:
                aurocs = [_auroc(first.cat(name, j), y_first) for j in range(len(candidates))]
                jb = int(np.argmax(aurocs))
                b.scoring, b.val_auroc, b.chosen_on = candidates[jb], aurocs[jb], "validation"
            else:
                jb = 0
            b.threshold = _threshold(matching_pixel_acc(first.pixel[name], candidates, jb))
    # derived from what happened above: candidates were compared on validation items, or the config was kept
    record = {"chosen_on": "validation" if compared else "config", **record}
    if baselines:
        record["baselines"] = {name: b.record() for name, b in baselines.items()}
    return AnomalySelection(candidates[chosen_idx], chosen_sampling, threshold, base_threshold, record, baselines,
                            base_val_auroc)


def healthy_training_set(data: ValidationView, opts: EvalOptions) -> tuple[Any, str | None]:
    """The healthy training dataset for the baselines, or ``(None, why not)``."""
    if not opts.healthy_baselines():
        return None, "eval.baselines is empty"
    get = getattr(data, "train_dataloader", None)
    if not callable(get):
        return None, "the datamodule has no train_dataloader"
    dataset = getattr(get(), "dataset", None)
    if dataset is None or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return None, "the training loader has no map-style dataset"
    return dataset, None
