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

The test split is touched once; nothing is chosen on it except the clearly labelled oracle numbers. The model is
never changed: candidate depths are copies of its reconstruction config (``dataclasses.replace``) passed to
``model.reconstruct(batch, recon)``, and the chosen one is written into the report (``reconstruction``). CT data
(batches with ``subtypes``) adds per-subtype results and figures (``meddiff.protocols.ct_report``).

Entry points: :func:`run` (the registry's, on a datamodule; writes the report files), and
:func:`evaluate_anomaly_detection` (on two loaders; returns the report only).
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.anomaly.reconstruction import ReconstructionConfig
from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.errors import ConfigError
from meddiff.metrics.baselines import intensity_map, mean_intensity_score
from meddiff.metrics.detection import aggregate_by_subject, image_level
from meddiff.metrics.pixel import PixelAccumulator, choose_threshold
from meddiff.protocols.base import Outcome, Protocol, ValidationView

__all__ = ["AnomalyProtocol", "AnomalySelection", "EvalOptions", "evaluate_anomaly_detection", "print_report",
           "run", "select_on_validation", "evaluate_on_test"]

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


def _reconstruct(model: Any, batch: Mapping[str, Any], recon: ReconstructionConfig | None) -> torch.Tensor:
    """The model's healthy estimate; ``recon`` None = the model's own settings (models without a reconstruction
    config take no ``recon`` argument)."""
    return model.reconstruct(batch) if recon is None else model.reconstruct(batch, recon)


@torch.no_grad()
def _pass(
    model,
    loader: Iterable,
    candidates: list[ScoringConfig],
    opts: EvalOptions,
    device: torch.device,
    desc: str,
    keep_examples: int = 0,
    recon: ReconstructionConfig | None = None,
) -> _Collected:
    """One pass: reconstruct each batch once (with ``recon``), score it under every candidate, accumulate pixel
    histograms."""
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
        healthy = _reconstruct(model, batch, recon).float()
        has_mask = "mask" in batch
        for j, cfg in enumerate(candidates):
            res = score_batch(x.float(), healthy, region, cfg)
            out.scores[j].append(res["score"].cpu())
            if has_mask and (j == 0 or cfg.reduction == candidates[0].reduction or len(candidates) == 1):
                acc = out.pixel.setdefault(j, PixelAccumulator(opts.pixel_bins, MAP_MAX[cfg.map]))
                acc.update(res["map"], batch["mask"], res["region"])
            if j == 0 and keep_examples and sum(len(e) for e in out.examples["image"]) < keep_examples:
                out.examples["image"].append(x.cpu())
                out.examples["recon"].append(healthy.cpu())
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


@dataclass
class AnomalySelection:
    """What validation chose: the scoring setting, the reconstruction (None = the model's own), the pixel
    thresholds, and the record written into ``report["selection"]``."""

    scoring: ScoringConfig
    recon: ReconstructionConfig | None
    threshold: float | None
    base_threshold: float | None
    record: dict[str, Any]


def _depth_candidates(model: Any, opts: EvalOptions) -> list[ReconstructionConfig | None]:
    """Copies of the model's reconstruction config, one per ``eval.t_start`` (validated); ``[None]`` = as is."""
    if opts.t_start is None:
        return [None]
    base = getattr(model, "recon_cfg", None)
    if not isinstance(base, ReconstructionConfig):
        raise ConfigError(
            f"eval.t_start={opts.t_start!r} tries reconstruction depths, but {type(model).__name__} has no "
            "partial-diffusion reconstruction (recon_cfg); remove eval.t_start."
        )
    out = []
    for t in _listify(opts.t_start):
        cfg = replace(base, t_start=int(t))
        cfg.validate(model.schedule.num_train_timesteps)
        out.append(cfg)
    return out


def _t_start(model: Any, recon: ReconstructionConfig | None) -> int | None:
    cfg = recon if recon is not None else getattr(model, "recon_cfg", None)
    return None if cfg is None else cfg.t_start


def select_on_validation(
    model: Any, val_loader: Iterable | None, opts: EvalOptions, device: torch.device | str = "cpu"
) -> AnomalySelection:
    """Choose (depth, post-processing) by validation image AUROC and the pixel threshold by validation Dice.

    ``val_loader`` None (``eval.select_on_val=false``) keeps the model's configured settings.
    """
    device = torch.device(device)
    default = model.scoring_cfg
    candidates = opts.candidates(default)
    chosen_idx, threshold, base_threshold, val_summary = 0, None, None, {}
    chosen_recon: ReconstructionConfig | None = None
    if val_loader is not None:
        # reconstruction depth candidates: one validation pass each (the model's own depth when none given)
        best: tuple[float, ReconstructionConfig | None, int, _Collected] | None = None
        rows = []
        for recon in _depth_candidates(model, opts):
            t_start = _t_start(model, recon)
            val = _pass(model, val_loader, candidates, opts, device, f"val t_start={t_start}: reconstruct + score",
                        recon=recon)
            y_val = torch.cat(val.labels).numpy()
            if len(np.unique(y_val)) < 2:
                log.warning("Validation split has one class only: keeping the configured scoring %s.", default)
                best = (float("nan"), recon, 0, val)
                break
            aurocs = [image_level(val.cat(j), y_val, n_boot=0)["auroc"] for j in range(len(candidates))]
            rows += [{"t_start": t_start, **c.as_dict(), "val_auroc": a} for c, a in zip(candidates, aurocs)]
            j = int(np.argmax(aurocs))
            if best is None or aurocs[j] > best[0]:
                best = (aurocs[j], recon, j, val)
        assert best is not None
        val_auroc, chosen_recon, chosen_idx, val = best
        if rows:
            val_summary.update(candidates=rows, image_auroc=val_auroc, t_start=_t_start(model, chosen_recon))
        pix = _matching_pixel_acc(val, candidates, chosen_idx)
        if pix is not None:
            threshold = choose_threshold(pix)
            val_summary["pixel_threshold"] = threshold
            val_summary["pixel_dice_at_threshold"] = pix.dice_at(threshold)
        if val.pixel_baseline is not None:
            base_threshold = choose_threshold(val.pixel_baseline)
    record = {"chosen_on": "validation" if val_loader is not None else "config", **val_summary}
    return AnomalySelection(candidates[chosen_idx], chosen_recon, threshold, base_threshold, record)


def evaluate_on_test(
    model: Any,
    test_loader: Iterable,
    opts: EvalOptions,
    selection: AnomalySelection,
    device: torch.device | str = "cpu",
    subtype_names: Sequence[str] | None = None,
) -> Outcome:
    """One pass over the test split with the selected setting: the report and the data for its figures.

    When test batches carry ``subtypes`` ``[B, K]`` (RSNA CT), ``report["image"]["per_subtype"]`` holds each subtype's
    AUROC/AUPRC (healthy slices vs slices with it, ``meddiff.protocols.ct_report``), named by ``subtype_names``.
    """
    device = torch.device(device)
    chosen, threshold, base_threshold = selection.scoring, selection.threshold, selection.base_threshold
    report: dict[str, Any] = {"protocol": __doc__.strip().splitlines()[0]}
    report["selection"] = selection.record
    report["scoring"] = chosen.as_dict()
    recon = selection.recon if selection.recon is not None else getattr(model, "recon_cfg", None)
    if isinstance(recon, ReconstructionConfig):
        report["reconstruction"] = asdict(recon)

    test = _pass(model, test_loader, [chosen], opts, device, "test: reconstruct + score",
                 keep_examples=4 * opts.n_figure_rows, recon=selection.recon)
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
    figures = {
        "curves": {"model": (s_model, y), "baseline (mean intensity)": (s_base, y)},
        "examples": {k: torch.cat(v) if torch.is_tensor(v[0]) else sum(v, []) for k, v in test.examples.items()},
    }
    if test.subtypes:
        from meddiff.protocols.ct_report import per_subtype_detection, subtype_summary

        subtypes = torch.cat(test.subtypes).numpy()
        per = per_subtype_detection({"model": s_model, "baseline_mean_intensity": s_base}, y, subtypes,
                                    subtype_names, n_boot=opts.n_boot, seed=opts.seed)
        report["image"]["per_subtype"] = per
        report["summary"].update(subtype_summary(per))
        figures["items"] = {"id": test.ids, "subject": test.subjects, "label": y, "subtypes": subtypes,
                            "model": s_model, "baseline": s_base}
    return Outcome(report, figures)


def evaluate_anomaly_detection(
    model,
    val_loader: Iterable | None,
    test_loader: Iterable,
    opts: EvalOptions,
    device: torch.device | str = "cpu",
    subtype_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """:func:`select_on_validation` then :func:`evaluate_on_test` on loaders: the report (JSON-ready) plus
    ``_figures`` (the plot data). ``model`` needs ``scoring_cfg``, ``schedule`` and ``reconstruct(batch[, recon])``.
    """
    selection = select_on_validation(model, val_loader, opts, device)
    outcome = evaluate_on_test(model, test_loader, opts, selection, device, subtype_names)
    return {**outcome.report, "_figures": outcome.figures}


class AnomalyProtocol(Protocol):
    """The anomaly-detection protocol on a datamodule (``val_dataloader``, ``test_dataloader``, optional
    ``subtype_names``); writes ``report.json``, ``metrics.csv``, ``roc.png``, ``anomaly_grid.png`` and, for CT,
    the per-subtype outputs of ``meddiff.protocols.ct_report``."""

    name = "anomaly"
    options = EvalOptions

    def select(self, model: Any, data: ValidationView, opts: EvalOptions, device: torch.device) -> AnomalySelection:
        return select_on_validation(model, data.val_dataloader() if opts.select_on_val else None, opts, device)

    def test(self, model: Any, datamodule: Any, opts: EvalOptions, selection: AnomalySelection,
             device: torch.device) -> Outcome:
        return evaluate_on_test(model, datamodule.test_dataloader(), opts, selection, device,
                         subtype_names=getattr(datamodule, "subtype_names", None))

    def write(self, outcome: Outcome, out_dir: Path) -> None:
        from meddiff.viz.figures import save_anomaly_grid, save_roc_pr

        report, figures = outcome.report, outcome.figures
        save_roc_pr(out_dir / "roc.png", figures["curves"])
        ex = figures["examples"]
        if ex:
            save_anomaly_grid(out_dir / "anomaly_grid.png", ex["image"], ex["recon"], ex["map"], ex.get("mask"),
                              ex.get("label"), n_rows=8)
        print_report(report)
        if "subtypes" in ex:  # CT (RSNA): per-subtype table and figures, segmentation overlays over the CT
            from meddiff.protocols.ct_report import write_ct_outputs

            write_ct_outputs(report, figures, out_dir)


def run(model: Any, datamodule: Any, eval_cfg: Any, out_dir: str | Path,
        device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The registry's entry: ``eval_cfg`` holds :class:`EvalOptions` fields; returns the report (also written)."""
    return AnomalyProtocol().run(model, datamodule, eval_cfg, out_dir, device)


def print_report(report: dict[str, Any]) -> None:
    """A rich table: model beside the trivial baseline, with CIs and the protocol."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Test results (n={report['n_test']}); post-processing chosen on validation")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("baseline", justify="right")
    im, ib = report["image"]["model"], report["image"]["baseline_mean_intensity"]

    def ci(d: dict, k: str) -> str:
        lo, hi = d[f"{k}_ci"]
        return f"{d[k]:.3f} [{lo:.3f}, {hi:.3f}]"

    table.add_row("image AUROC [95% CI]", ci(im, "auroc"), ci(ib, "auroc"))
    table.add_row("image AUPRC [95% CI]", ci(im, "auprc"), ci(ib, "auprc"))
    if "subject" in report:
        sm, sb = report["subject"].get("model"), report["subject"].get("baseline_mean_intensity")
        table.add_row("subject AUROC", ci(sm, "auroc") if sm else "-", ci(sb, "auroc") if sb else "-")
    if "pixel" in report:
        pm, pb = report["pixel"]["model"], report["pixel"].get("baseline_intensity", {})
        for key, name in (("auroc", "pixel AUROC"), ("auprc", "pixel AUPRC"),
                          ("dice_at_val_threshold", "Dice @ val threshold"), ("oracle_dice", "Dice (oracle, test-chosen)")):
            if key in pm:
                table.add_row(name, f"{pm[key]:.3f}", f"{pb[key]:.3f}" if key in pb else "-")
    Console().print(table)
    Console().print(f"scoring: {report['scoring']}")


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
