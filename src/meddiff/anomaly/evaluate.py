"""The evaluation protocol every anomaly-detection experiment shares.

1. Reconstruct every validation image once per candidate reconstruction depth ``t_start``; score it under each
   candidate post-processing setting (map kind x median filter x reduction). The (depth, setting) with the best
   validation image AUROC is chosen, and the pixel threshold that maximises pooled validation Dice for it.
2. Reconstruct every test image once and score it with the chosen setting only: image AUROC/AUPRC with
   bootstrap 95% CIs, pixel AUROC/AUPRC (binned, bounded memory), Dice at the validation threshold, and the
   oracle best Dice (chosen on test: labelled ``oracle``, not a result), plus subject-level AUROC where the data
   has subjects.
3. The trivial baseline (mean intensity inside the region; the intensity itself as pixel map) is evaluated by
   the same protocol beside the model.

The test split is touched once; nothing is chosen on it except the clearly labelled oracle numbers.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.metrics.baselines import intensity_map, mean_intensity_score
from meddiff.metrics.detection import aggregate_by_subject, image_level
from meddiff.metrics.pixel import PixelAccumulator, choose_threshold

log = logging.getLogger(__name__)
MAP_MAX = {"l1": 2.0, "l2": 4.0, "ssim": 2.0}


@dataclass
class EvalOptions:
    """Evaluation options (``eval:`` in the configs)."""

    select_on_val: bool = True
    map: Sequence[str] = ("l1",)
    median_size: Sequence[int] = (1, 3)
    reduction: Sequence[str] = ("mean", "max", "percentile")
    q: float = 99.0
    n_boot: int = 1000
    pixel_bins: int = 1000
    max_batches: int | None = None
    n_figure_rows: int = 8
    seed: int = 0
    t_start: Sequence[int] | int | None = None  # reconstruction depths tried on validation (None = the model's)

    def candidates(self, default: ScoringConfig) -> list[ScoringConfig]:
        if not self.select_on_val:
            return [default]
        grid = itertools.product(_listify(self.map), _listify(self.median_size), _listify(self.reduction))
        return [default.with_(map=m, median_size=int(k), reduction=r, q=float(self.q)) for m, k, r in grid]


def _listify(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, str) else [v]


@dataclass
class _Collected:
    scores: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    baseline: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    subtypes: list[torch.Tensor] = field(default_factory=list)  # [B, K] per batch, when batches carry "subtypes"
    ids: list[str] = field(default_factory=list)
    pixel: dict[int, PixelAccumulator] = field(default_factory=dict)
    pixel_baseline: PixelAccumulator | None = None
    examples: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def cat(self, key: int) -> np.ndarray:
        return torch.cat(self.scores[key]).double().numpy()


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def _pass(
    model,
    loader: Iterable,
    candidates: list[ScoringConfig],
    opts: EvalOptions,
    device: torch.device,
    desc: str,
    keep_examples: int = 0,
) -> _Collected:
    """One pass: reconstruct each batch once, score it under every candidate, accumulate pixel histograms."""
    out = _Collected()
    n_batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if opts.max_batches is not None and n_batches is not None:
        n_batches = min(n_batches, opts.max_batches)
    for i, batch in enumerate(tqdm(loader, desc=desc, total=n_batches, leave=False)):
        if opts.max_batches is not None and i >= opts.max_batches:
            break
        batch = _to(batch, device)
        x = batch["image"]
        region = batch.get("brain_mask")
        labels = batch.get("label", torch.zeros(x.shape[0], dtype=torch.long, device=device))
        recon = model.reconstruct(batch).float()
        has_mask = "mask" in batch
        for j, cfg in enumerate(candidates):
            res = score_batch(x.float(), recon, region, cfg)
            out.scores[j].append(res["score"].cpu())
            if has_mask and (j == 0 or cfg.reduction == candidates[0].reduction or len(candidates) == 1):
                acc = out.pixel.setdefault(j, PixelAccumulator(opts.pixel_bins, MAP_MAX[cfg.map]))
                acc.update(res["map"], batch["mask"], res["region"])
            if j == 0 and keep_examples and sum(len(e) for e in out.examples["image"]) < keep_examples:
                out.examples["image"].append(x.cpu())
                out.examples["recon"].append(recon.cpu())
                out.examples["map"].append(res["map"].cpu())
                out.examples["label"].append(labels.cpu())
                if has_mask:
                    out.examples["mask"].append(batch["mask"].cpu())
                if "subtypes" in batch:
                    out.examples["subtypes"].append(batch["subtypes"].cpu())
                    out.examples["id"].append([str(v) for v in batch.get("id", [""] * x.shape[0])])
        out.baseline.append(mean_intensity_score(x.float(), region).cpu())
        if has_mask:
            if out.pixel_baseline is None:
                out.pixel_baseline = PixelAccumulator(opts.pixel_bins, 1.0)
            base_map = intensity_map(x.float())
            if region is not None:
                base_map = base_map * region
            out.pixel_baseline.update(base_map, batch["mask"], region)
        out.labels.append(labels.cpu())
        subj = batch.get("subject")
        if subj is not None:
            out.subjects.extend([str(s) for s in subj])
        if "subtypes" in batch:
            out.subtypes.append(batch["subtypes"].cpu())
            out.ids.extend(str(v) for v in batch.get("id", [""] * x.shape[0]))
    return out


def evaluate_anomaly_detection(
    model,
    val_loader: Iterable | None,
    test_loader: Iterable,
    opts: EvalOptions,
    device: torch.device | str = "cpu",
    subtype_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the protocol; returns the report dict (JSON-ready) plus ``_figures`` data for plotting.

    When test batches carry ``subtypes`` ``[B, K]`` (RSNA CT), ``report["image"]["per_subtype"]`` holds each subtype's
    AUROC/AUPRC (healthy slices vs slices with it, ``meddiff.evaluation.ct_report``), named by ``subtype_names``.
    """
    device = torch.device(device)
    default = model.scoring_cfg
    candidates = opts.candidates(default)
    report: dict[str, Any] = {"protocol": __doc__.strip().splitlines()[0]}

    chosen_idx, threshold, val_summary = 0, None, {}
    base_threshold = None
    if val_loader is not None:
        # reconstruction depth candidates: one validation pass each (the model's own t_start when none given)
        t_list = [int(t) for t in _listify(opts.t_start)] if opts.t_start is not None else [model.recon_cfg.t_start]
        best: tuple[float, int, int, _Collected] | None = None
        rows = []
        for t_start in t_list:
            model.recon_cfg.t_start = t_start
            model.recon_cfg.validate(model.schedule.num_train_timesteps)
            val = _pass(model, val_loader, candidates, opts, device, f"val t_start={t_start}: reconstruct + score")
            y_val = torch.cat(val.labels).numpy()
            if len(np.unique(y_val)) < 2:
                log.warning("Validation split has one class only: keeping the configured scoring %s.", default)
                best = (float("nan"), t_start, 0, val)
                break
            aurocs = [image_level(val.cat(j), y_val, n_boot=0)["auroc"] for j in range(len(candidates))]
            rows += [{"t_start": t_start, **c.as_dict(), "val_auroc": a} for c, a in zip(candidates, aurocs)]
            j = int(np.argmax(aurocs))
            if best is None or aurocs[j] > best[0]:
                best = (aurocs[j], t_start, j, val)
        assert best is not None
        val_auroc, t_chosen, chosen_idx, val = best
        model.recon_cfg.t_start = t_chosen
        if rows:
            val_summary.update(candidates=rows, image_auroc=val_auroc, t_start=t_chosen)
        pix = _matching_pixel_acc(val, candidates, chosen_idx)
        if pix is not None:
            threshold = choose_threshold(pix)
            val_summary["pixel_threshold"] = threshold
            val_summary["pixel_dice_at_threshold"] = pix.dice_at(threshold)
        if val.pixel_baseline is not None:
            base_threshold = choose_threshold(val.pixel_baseline)
    chosen = candidates[chosen_idx]
    report["selection"] = {"chosen_on": "validation" if val_loader is not None else "config", **val_summary}
    report["scoring"] = chosen.as_dict()

    test = _pass(model, test_loader, [chosen], opts, device, "test: reconstruct + score",
                 keep_examples=4 * opts.n_figure_rows)
    y = torch.cat(test.labels).numpy()
    s_model, s_base = test.cat(0), torch.cat(test.baseline).double().numpy()
    report["n_test"] = int(y.size)
    report["image"] = {
        "model": image_level(s_model, y, n_boot=opts.n_boot, seed=opts.seed),
        "baseline_mean_intensity": image_level(s_base, y, n_boot=opts.n_boot, seed=opts.seed),
    }
    if test.subjects and len(set(test.subjects)) < len(test.subjects):
        subj_report = {}
        for name, s in (("model", s_model), ("baseline_mean_intensity", s_base)):
            _, ss, yy = aggregate_by_subject(s, y, test.subjects)
            if len(np.unique(yy)) == 2:
                subj_report[name] = image_level(ss, yy, n_boot=opts.n_boot, seed=opts.seed)
        if subj_report:
            report["subject"] = subj_report
    if 0 in test.pixel:
        pix = test.pixel[0].compute()
        entry = {"auroc": pix["auroc"], "auprc": pix["auprc"],
                 "oracle_dice": pix["oracle_dice"], "oracle_threshold": pix["oracle_threshold"]}
        if threshold is not None:
            entry["dice_at_val_threshold"] = test.pixel[0].dice_at(threshold)
            entry["val_threshold"] = threshold
        report["pixel"] = {"model": entry}
        if test.pixel_baseline is not None:
            pb = test.pixel_baseline.compute()
            base = {"auroc": pb["auroc"], "auprc": pb["auprc"], "oracle_dice": pb["oracle_dice"]}
            if base_threshold is not None:
                base["dice_at_val_threshold"] = test.pixel_baseline.dice_at(base_threshold)
            report["pixel"]["baseline_intensity"] = base
    report["summary"] = _summary(report)
    report["_figures"] = {
        "curves": {"model": (s_model, y), "baseline (mean intensity)": (s_base, y)},
        "examples": {k: torch.cat(v) if torch.is_tensor(v[0]) else sum(v, []) for k, v in test.examples.items()},
    }
    if test.subtypes:
        from meddiff.evaluation.ct_report import per_subtype_detection, subtype_summary

        subtypes = torch.cat(test.subtypes).numpy()
        per = per_subtype_detection({"model": s_model, "baseline_mean_intensity": s_base}, y, subtypes,
                                    subtype_names, n_boot=opts.n_boot, seed=opts.seed)
        report["image"]["per_subtype"] = per
        report["summary"].update(subtype_summary(per))
        report["_figures"]["items"] = {"id": test.ids, "subject": test.subjects, "label": y, "subtypes": subtypes,
                                       "model": s_model, "baseline": s_base}
    return report


def _matching_pixel_acc(val: _Collected, candidates: list[ScoringConfig], chosen: int) -> PixelAccumulator | None:
    """The validation pixel accumulator with the chosen map and filter (pixel maps do not depend on reduction)."""
    c = candidates[chosen]
    for j, acc in val.pixel.items():
        o = candidates[j]
        if (o.map, o.median_size, o.erode_iterations) == (c.map, c.median_size, c.erode_iterations):
            return acc
    return None


def _summary(report: dict[str, Any]) -> dict[str, float]:
    s = {
        "image_auroc": report["image"]["model"]["auroc"],
        "image_auprc": report["image"]["model"]["auprc"],
        "baseline_image_auroc": report["image"]["baseline_mean_intensity"]["auroc"],
    }
    if "pixel" in report:
        p = report["pixel"]["model"]
        s.update(pixel_auroc=p["auroc"], pixel_auprc=p["auprc"], pixel_oracle_dice=p["oracle_dice"])
        if "dice_at_val_threshold" in p:
            s["pixel_dice"] = p["dice_at_val_threshold"]
        s["baseline_pixel_auprc"] = report["pixel"]["baseline_intensity"]["auprc"]
    if "subject" in report and "model" in report["subject"]:
        s["subject_auroc"] = report["subject"]["model"]["auroc"]
    return s
