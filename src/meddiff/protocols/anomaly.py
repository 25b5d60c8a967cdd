"""The evaluation protocol every anomaly-detection experiment shares.

1. Reconstruct every validation image once per candidate reconstruction depth ``t_start``; score it under each
   candidate post-processing setting (map kind x median filter x reduction). The (depth, setting) with the best
   validation image AUROC is chosen, and the pixel threshold that maximises pooled validation Dice for it.
2. Reconstruct every test image once and score it with the chosen setting only: image AUROC/AUPRC with
   bootstrap 95% CIs (resampling subjects / patients where batches carry ``subject``, items otherwise), pixel
   AUROC/AUPRC (binned, bounded memory), Dice at the validation threshold, and the oracle best Dice (chosen on test:
   labelled ``oracle``, not a result), plus subject-level AUROC where the data has subjects.
3. Trivial baselines, evaluated by the same protocol beside the model:

   - mean intensity inside the region (image score) and the intensity itself (pixel map);
   - the nearest healthy training image (pixel-space L2 neighbour among a fixed seeded subset of <= 10,000
     healthy training images, inside the brain mask where there is one) and the mean healthy image (of the same
     images), each used as a "reconstruction": scored by the same scorer under the same candidate settings, each
     with its own setting and pixel threshold chosen on validation.

   ``report["margin_over_best_baseline"]`` is a paired bootstrap 95% CI of "model - best baseline" image AUROC (the
   best baseline chosen by validation AUROC); ``report["baselines_cost"]`` is what the healthy-set baselines cost.

The test split is touched once; nothing is chosen on it except the clearly labelled oracle numbers. ``chosen_on``
fields say what the code did: ``"validation"`` only when candidates were compared on validation items
(``n_validation_items``), ``"config"`` when the configured setting was kept; through a datamodule,
``selection["splits_read"]`` lists the splits selection asked for (``meddiff.protocols.base.ValidationView``).
The model is never changed: candidate depths are copies of its reconstruction config (``dataclasses.replace``)
passed to ``model.reconstruct(batch, recon)``, and the chosen one is written into the report (``reconstruction``).
``report["runtime"]`` records the precision the model's network actually ran with during the test pass (parameter
dtype, autocast) and torch's thread count (``meddiff.utils.cpu.cpu_report``). CT data (batches with ``subtypes``)
adds per-subtype results and figures (``meddiff.protocols.ct_report``).

Entry points: :func:`run` (the registry's, on a datamodule; writes the report files), and
:func:`evaluate_anomaly_detection` (on two loaders and optionally the healthy training set; returns the report).
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.anomaly.reconstruction import ReconstructionConfig
from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.errors import ConfigError
from meddiff.metrics.baselines import MAX_REFERENCE, intensity_map, mean_intensity_score
from meddiff.metrics.detection import aggregate_by_subject, detection_ci
from meddiff.metrics.pixel import PixelAccumulator, choose_threshold
from meddiff.protocols.base import Outcome, Protocol, ValidationView
from meddiff.protocols.common import (
    HEALTHY_BASELINES,
    LABELS,
    MEAN_INTENSITY,
    MODEL,
    SHORT,
    auroc_margin,
    build_healthy_baselines,
    check_healthy_baselines,
    load_healthy_reference,
    margin_summary,
    print_baseline_costs,
)
from meddiff.utils.cpu import cpu_report

__all__ = ["AnomalyProtocol", "AnomalySelection", "BaselineChoice", "EvalOptions", "evaluate_anomaly_detection",
           "print_report", "run", "select_on_validation", "evaluate_on_test"]

log = logging.getLogger(__name__)
MAP_MAX = {"l1": 2.0, "l2": 4.0, "ssim": 2.0}

#: the pixel-level key of the mean-intensity baseline (``report["pixel"]``; its image-level key is MEAN_INTENSITY)
PIXEL_INTENSITY = "baseline_intensity"


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
    baselines: Sequence[str] = ("nearest_healthy", "mean_healthy")  # healthy-set baselines ([] = mean intensity only)
    baseline_max_items: int = MAX_REFERENCE  # healthy training images they use at most (a fixed seeded subset)

    def candidates(self, default: ScoringConfig) -> list[ScoringConfig]:
        if not self.select_on_val:
            return [default]
        grid = itertools.product(_listify(self.map), _listify(self.median_size), _listify(self.reduction))
        return [default.with_(map=m, median_size=int(k), reduction=r, q=float(self.q)) for m, k, r in grid]

    def healthy_baselines(self) -> list[str]:
        """The requested healthy-set baselines (``eval.baselines``), checked."""
        names = None if self.baselines is None else [str(b) for b in _listify(self.baselines)]
        return check_healthy_baselines(names, self.baseline_max_items)


def _listify(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, str) else [v]


#: a method's healthy estimate of a batch: ``batch -> [B, C, H, W]`` in ``[-1, 1]``
ReconFn = Callable[[Mapping[str, Any]], torch.Tensor]


def _map_key(cfg: ScoringConfig) -> tuple:
    """What a pixel map depends on (not the reduction to an image score)."""
    return (cfg.map, cfg.median_size, cfg.erode_iterations)


@dataclass
class _Collected:
    """One pass over a split: per method (``model`` and each reconstruction baseline) and candidate setting, the
    image scores and pixel histograms; the mean-intensity baseline; labels, subjects and figure data."""

    scores: dict[str, dict[int, list[torch.Tensor]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    pixel: dict[str, dict[int, PixelAccumulator]] = field(default_factory=lambda: defaultdict(dict))
    intensity: list[torch.Tensor] = field(default_factory=list)
    pixel_intensity: PixelAccumulator | None = None
    labels: list[torch.Tensor] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    subtypes: list[torch.Tensor] = field(default_factory=list)  # [B, K] per batch, when batches carry "subtypes"
    ids: list[str] = field(default_factory=list)
    examples: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    compute: dict[str, Any] | None = None  # what the model's network ran with (first batch; see _observe_compute)

    def cat(self, method: str, j: int = 0) -> np.ndarray:
        return torch.cat(self.scores[method][j]).double().numpy()

    def y(self) -> np.ndarray:
        return torch.cat(self.labels).numpy() if self.labels else np.zeros(0, dtype=np.int64)

    def intensity_scores(self) -> np.ndarray:
        return torch.cat(self.intensity).double().numpy()

    def subject_ids(self) -> list[str] | None:
        """One subject id per item when every batch carried ``subject``; None otherwise."""
        return list(self.subjects) if self.subjects and len(self.subjects) == sum(len(t) for t in self.labels) else None


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _reconstruct(model: Any, batch: Mapping[str, Any], recon: ReconstructionConfig | None) -> torch.Tensor:
    """The model's healthy estimate; ``recon`` None = the model's own settings (models without a reconstruction
    config take no ``recon`` argument)."""
    return model.reconstruct(batch) if recon is None else model.reconstruct(batch, recon)


def _model_fn(model: Any, recon: ReconstructionConfig | None) -> ReconFn:
    return lambda batch: _reconstruct(model, batch, recon)


_PRECISION_NAMES = {"float32": "32-true", "bfloat16": "bf16-true", "float16": "16-true", "float64": "64-true"}
_MIXED_NAMES = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}


@contextmanager
def _observe_compute(info: dict[str, Any]) -> Iterator[None]:
    """Record in ``info`` what the first module with parameters that runs inside the block computed with: its
    parameter dtype, its output dtype and the autocast state at that moment (a global forward hook, removed after)."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if info:
            return
        p = next(module.parameters(recurse=False), None)
        if p is None:
            return
        out = output if torch.is_tensor(output) else next(
            (o for o in (output if isinstance(output, (tuple, list)) else ()) if torch.is_tensor(o)), None)
        dev = p.device.type
        autocast = torch.is_autocast_enabled(dev)
        info.update(
            observed=f"{type(module).__name__} forward",
            param_dtype=str(p.dtype).removeprefix("torch."),
            output_dtype=None if out is None else str(out.dtype).removeprefix("torch."),
            autocast=str(torch.get_autocast_dtype(dev)).removeprefix("torch.") if autocast else None,
        )

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _precision_name(info: Mapping[str, Any]) -> str:
    """Lightning-style name of what was observed: ``bf16-mixed`` under bf16 autocast, ``32-true`` for float32, ..."""
    if info.get("autocast"):
        return _MIXED_NAMES.get(info["autocast"], f"{info['autocast']}-mixed")
    dtype = info.get("param_dtype") or info.get("output_dtype") or "unknown"
    return _PRECISION_NAMES.get(dtype, dtype)


@torch.no_grad()
def _pass(
    loader: Iterable,
    methods: Mapping[str, tuple[ReconFn, list[ScoringConfig]]],
    opts: EvalOptions,
    device: torch.device,
    desc: str,
    keep_examples: int = 0,
    observe: bool = False,
) -> _Collected:
    """One pass: each method (``model`` first) reconstructs each batch once and its reconstruction is scored under
    every candidate of that method; pixel histograms per distinct map; the mean-intensity baseline alongside.
    ``observe``: record what the model's network computed with on the first batch (``out.compute``)."""
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
        has_mask = "mask" in batch
        for name, (fn, candidates) in methods.items():
            if observe and name == MODEL and out.compute is None:
                info: dict[str, Any] = {}
                with _observe_compute(info):
                    healthy = fn(batch)
                if not info:  # no network ran (a stand-in model): say what its reconstruction was
                    info = {"observed": "reconstruction output", "param_dtype": None,
                            "output_dtype": str(healthy.dtype).removeprefix("torch."), "autocast": None}
                out.compute = info
            else:
                healthy = fn(batch)
            healthy = healthy.float()
            pixel_for = {}  # the first candidate of each distinct map gets the pixel histogram
            for j, cfg in enumerate(candidates):
                pixel_for.setdefault(_map_key(cfg), j)
            for j, cfg in enumerate(candidates):
                res = score_batch(x.float(), healthy, region, cfg)
                out.scores[name][j].append(res["score"].cpu())
                if has_mask and pixel_for[_map_key(cfg)] == j:
                    acc = out.pixel[name].setdefault(j, PixelAccumulator(opts.pixel_bins, MAP_MAX.get(cfg.map, 2.0)))
                    acc.update(res["map"], batch["mask"], res["region"])
                if name == MODEL and j == 0 and keep_examples \
                        and sum(len(e) for e in out.examples["image"]) < keep_examples:
                    out.examples["image"].append(x.cpu())
                    out.examples["recon"].append(healthy.cpu())
                    out.examples["map"].append(res["map"].cpu())
                    out.examples["label"].append(labels.cpu())
                    if has_mask:
                        out.examples["mask"].append(batch["mask"].cpu())
                    if "subtypes" in batch:
                        out.examples["subtypes"].append(batch["subtypes"].cpu())
                        out.examples["id"].append([str(v) for v in batch.get("id", [""] * x.shape[0])])
        out.intensity.append(mean_intensity_score(x.float(), region).cpu())
        if has_mask:
            if out.pixel_intensity is None:
                out.pixel_intensity = PixelAccumulator(opts.pixel_bins, 1.0)
            base_map = intensity_map(x.float())
            if region is not None:
                base_map = base_map * region
            out.pixel_intensity.update(base_map, batch["mask"], region)
        out.labels.append(labels.cpu())
        subj = batch.get("subject")
        if subj is not None:
            out.subjects.extend([str(s) for s in subj])
        if "subtypes" in batch:
            out.subtypes.append(batch["subtypes"].cpu())
            out.ids.extend(str(v) for v in batch.get("id", [""] * x.shape[0]))
    return out


# ------------------------------------------------------------------------------------------------- baselines
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
    """What validation chose: the scoring setting, the reconstruction (None = the model's own), the pixel
    thresholds, each healthy-set baseline's own choice, and the record written into ``report["selection"]``."""

    scoring: ScoringConfig
    recon: ReconstructionConfig | None
    threshold: float | None
    base_threshold: float | None
    record: dict[str, Any]
    baselines: dict[str, BaselineChoice] = field(default_factory=dict)
    base_val_auroc: float | None = None  # the mean-intensity baseline's validation AUROC


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
    default = model.scoring_cfg
    candidates = opts.candidates(default)
    baselines = _healthy_baselines(healthy, opts, device, default)
    chosen_idx, threshold, base_threshold, base_val_auroc = 0, None, None, None
    chosen_recon: ReconstructionConfig | None = None
    record: dict[str, Any] = {}
    compared = False
    if val_loader is not None:
        best: tuple[float, ReconstructionConfig | None, int, _Collected] | None = None
        first: _Collected | None = None
        rows = []
        for k, recon in enumerate(_depth_candidates(model, opts)):
            t_start = _t_start(model, recon)
            methods = {MODEL: (_model_fn(model, recon), candidates)}
            if k == 0:  # the baselines do not depend on the depth: scored on the first pass only
                methods.update({name: (b.reconstruct, candidates) for name, b in baselines.items()})
            val = _pass(val_loader, methods, opts, device, f"val t_start={t_start}: reconstruct + score")
            if first is None:
                first = val
            y_val = val.y()
            record["n_validation_items"] = int(y_val.size)
            if len(np.unique(y_val)) < 2:
                log.warning("Validation split has %s: keeping the configured scoring %s.",
                            "no items" if y_val.size == 0 else "one class only", default)
                best = (float("nan"), recon, 0, val)
                break
            aurocs = [_auroc(val.cat(MODEL, j), y_val) for j in range(len(candidates))]
            rows += [{"t_start": t_start, **c.as_dict(), "val_auroc": a} for c, a in zip(candidates, aurocs)]
            j = int(np.argmax(aurocs))
            compared = True
            if best is None or aurocs[j] > best[0]:
                best = (aurocs[j], recon, j, val)
        assert best is not None and first is not None
        val_auroc, chosen_recon, chosen_idx, val = best
        if compared:
            record.update(candidates=rows, image_auroc=val_auroc, t_start=_t_start(model, chosen_recon))
            pix = _matching_pixel_acc(val.pixel[MODEL], candidates, chosen_idx)
        else:  # nothing compared: the model's own depth; a threshold only from a pass at that depth
            chosen_recon, chosen_idx = None, 0
            pix = _matching_pixel_acc(val.pixel[MODEL], candidates, 0) if opts.t_start is None else None
        threshold = _threshold(pix)
        if threshold is not None:
            record["pixel_threshold"] = threshold
            record["pixel_dice_at_threshold"] = pix.dice_at(threshold)  # type: ignore[union-attr]
            record["threshold_chosen_on"] = "validation"
        base_threshold = _threshold(first.pixel_intensity)
        y_first = first.y()
        base_record: dict[str, Any] = {}
        if compared:
            base_val_auroc = _auroc(first.intensity_scores(), y_first)
            base_record["val_auroc"] = base_val_auroc
        if base_threshold is not None:
            base_record["pixel_threshold"] = base_threshold
        if base_record:
            record[MEAN_INTENSITY] = base_record
        for name, b in baselines.items():
            if compared:
                aurocs = [_auroc(first.cat(name, j), y_first) for j in range(len(candidates))]
                jb = int(np.argmax(aurocs))
                b.scoring, b.val_auroc, b.chosen_on = candidates[jb], aurocs[jb], "validation"
            else:
                jb = 0
            b.threshold = _threshold(_matching_pixel_acc(first.pixel[name], candidates, jb))
    # derived from what happened above: candidates were compared on validation items, or the config was kept
    record = {"chosen_on": "validation" if compared else "config", **record}
    if baselines:
        record["baselines"] = {name: b.record() for name, b in baselines.items()}
    return AnomalySelection(candidates[chosen_idx], chosen_recon, threshold, base_threshold, record, baselines,
                            base_val_auroc)


# ------------------------------------------------------------------------------------------------------ test
def _pixel_entry(acc: PixelAccumulator, threshold: float | None) -> dict[str, Any]:
    pix = acc.compute()
    entry = {"auroc": pix["auroc"], "auprc": pix["auprc"],
             "oracle_dice": pix["oracle_dice"], "oracle_threshold": pix["oracle_threshold"]}
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
) -> Outcome:
    """One pass over the test split with the selected settings (model and each baseline): the report and the data
    for its figures.

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

    methods = {MODEL: (_model_fn(model, selection.recon), [chosen])}
    methods.update({name: (b.reconstruct, [b.scoring]) for name, b in selection.baselines.items()})
    test = _pass(test_loader, methods, opts, device, "test: reconstruct + score",
                 keep_examples=4 * opts.n_figure_rows, observe=True)
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
    if selection.baselines:
        report["baselines_cost"] = {name: b.cost.as_dict() for name, b in selection.baselines.items()}
    compute = test.compute or {}
    report["runtime"] = {**cpu_report(_precision_name(compute) if compute else None), "device": str(device),
                         "compute": compute}
    report["summary"] = _summary(report)
    figures = {
        "curves": {("model" if k == MODEL else f"baseline ({LABELS.get(k, k)})"): (s, y) for k, s in scores.items()},
        "examples": {k: torch.cat(v) if torch.is_tensor(v[0]) else sum(v, []) for k, v in test.examples.items()},
    }
    if test.subtypes:
        from meddiff.protocols.ct_report import per_subtype_detection, subtype_summary

        subtypes = torch.cat(test.subtypes).numpy()
        per = per_subtype_detection(scores, y, subtypes, subtype_names, n_boot=opts.n_boot, seed=opts.seed,
                                    subjects=subjects)
        report["image"]["per_subtype"] = per
        report["summary"].update(subtype_summary(per))
        figures["items"] = {"id": test.ids, "subject": test.subjects, "label": y, "subtypes": subtypes,
                            "model": scores[MODEL], "baseline": scores[MEAN_INTENSITY],
                            "baselines": {k: v for k, v in scores.items() if k not in (MODEL, MEAN_INTENSITY)}}
    return Outcome(report, figures)


def evaluate_anomaly_detection(
    model,
    val_loader: Iterable | None,
    test_loader: Iterable,
    opts: EvalOptions,
    device: torch.device | str = "cpu",
    subtype_names: Sequence[str] | None = None,
    healthy: Any = None,
) -> dict[str, Any]:
    """:func:`select_on_validation` then :func:`evaluate_on_test` on loaders: the report (JSON-ready) plus
    ``_figures`` (the plot data). ``model`` needs ``scoring_cfg``, ``schedule`` and ``reconstruct(batch[, recon])``.
    ``healthy``: the healthy training set (map-style, items ``{"image": [C, H, W], ...}``) for the nearest-healthy
    and mean-healthy baselines; None = the mean-intensity baseline only.
    """
    selection = select_on_validation(model, val_loader, opts, device, healthy=healthy)
    outcome = evaluate_on_test(model, test_loader, opts, selection, device, subtype_names)
    return {**outcome.report, "_figures": outcome.figures}


def _training_set(data: ValidationView, opts: EvalOptions) -> tuple[Any, str | None]:
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


class AnomalyProtocol(Protocol):
    """The anomaly-detection protocol on a datamodule (``val_dataloader``, ``test_dataloader``, optional
    ``subtype_names``; ``train_dataloader().dataset`` for the healthy-set baselines); writes ``report.json``,
    ``metrics.csv``, ``roc.png``, ``anomaly_grid.png`` and, for CT, the per-subtype outputs of
    ``meddiff.protocols.ct_report``."""

    name = "anomaly"
    options = EvalOptions

    def select(self, model: Any, data: ValidationView, opts: EvalOptions, device: torch.device) -> AnomalySelection:
        healthy, why_not = _training_set(data, opts)
        if why_not is not None and opts.healthy_baselines():
            log.warning("Healthy-set baselines skipped: %s.", why_not)
        val_loader = None
        if opts.select_on_val:  # only then is the val split read (and recorded in splits_read)
            # the labelled val split alone (with data.aucp_holdout > 0 val_dataloader() also yields the known-healthy
            # pool, which has no labels to select on)
            labelled = getattr(data, "val_labelled_dataloader", None)
            val_loader = labelled() if callable(labelled) else data.val_dataloader()
        selection = select_on_validation(model, val_loader, opts, device, healthy=healthy)
        selection.record["splits_read"] = data.splits_read  # what selection asked the datamodule for
        if why_not is not None and opts.healthy_baselines():
            selection.record["baselines_skipped"] = why_not
        return selection

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


def _methods(report: Mapping[str, Any]) -> list[str]:
    """Report keys of the model and every baseline, model first."""
    return [k for k in report["image"] if k != "per_subtype"]


def print_report(report: dict[str, Any]) -> None:
    """A rich table: the model beside every baseline, with CIs, and one line saying whether it beats the best."""
    from rich.console import Console
    from rich.table import Table

    methods = _methods(report)
    img = report["image"]
    resampled = img[MODEL].get("resampled", "items")
    table = Table(title=f"Test results (n={report['n_test']}); settings chosen on "
                        f"{report['selection'].get('chosen_on', '?')}; 95% CIs resample {resampled}")
    table.add_column("metric")
    for m in methods:
        table.add_column("model" if m == MODEL else LABELS.get(m, m), justify="right")

    def value(d: Mapping | None, k: str) -> str:
        return "-" if not d else f"{d[k]:.3f}"

    def ci(d: Mapping | None, k: str) -> str:
        return "-" if not d else "[{:.3f}, {:.3f}]".format(*d[f"{k}_ci"])

    for key, name in (("auroc", "image AUROC"), ("auprc", "image AUPRC")):
        table.add_row(name, *(value(img[m], key) for m in methods))
        table.add_row("  95% CI", *(ci(img[m], key) for m in methods))
    if "subject" in report:
        table.add_row("subject AUROC", *(value(report["subject"].get(m), "auroc") for m in methods))
    if "pixel" in report:
        pix = report["pixel"]
        cols = [pix.get(PIXEL_INTENSITY if m == MEAN_INTENSITY else m, {}) for m in methods]
        for key, name in (("auroc", "pixel AUROC"), ("auprc", "pixel AUPRC"),
                          ("dice_at_val_threshold", "Dice @ val threshold"),
                          ("oracle_dice", "Dice (oracle, test-chosen)")):
            if key in pix[MODEL]:
                table.add_row(name, *(f"{c[key]:.3f}" if key in c else "-" for c in cols))
    console = Console()
    console.print(table)
    if len(methods) > 1:
        note = "; the healthy-image ones scored like reconstructions, each with its own post-processing and " \
            "threshold chosen on validation" if any(m in HEALTHY_BASELINES.values() for m in methods) else ""
        console.print("Baselines: " + ", ".join(LABELS.get(m, m) for m in methods if m != MODEL) + note + ".")
    margin = report.get("margin_over_best_baseline")
    if margin:
        console.print(margin["verdict"])
    console.print(f"scoring: {report['scoring']}")
    rt = report.get("runtime")
    if rt:
        console.print(f"precision {rt.get('precision')}, {rt.get('torch_threads')} torch thread(s) on {rt.get('device')}")
    print_baseline_costs(report.get("baselines_cost"), LABELS, console)


def _matching_pixel_acc(accs: Mapping[int, PixelAccumulator], candidates: list[ScoringConfig],
                        chosen: int) -> PixelAccumulator | None:
    """The validation pixel accumulator with the chosen map and filter (pixel maps do not depend on reduction)."""
    for j, acc in accs.items():
        if _map_key(candidates[j]) == _map_key(candidates[chosen]):
            return acc
    return None


def _summary(report: dict[str, Any]) -> dict[str, float]:
    img = report["image"]
    s = {
        "image_auroc": img[MODEL]["auroc"],
        "image_auprc": img[MODEL]["auprc"],
        "baseline_image_auroc": img[MEAN_INTENSITY]["auroc"],
    }
    if "pixel" in report:
        p = report["pixel"][MODEL]
        s.update(pixel_auroc=p["auroc"], pixel_auprc=p["auprc"], pixel_oracle_dice=p["oracle_dice"])
        if "dice_at_val_threshold" in p:
            s["pixel_dice"] = p["dice_at_val_threshold"]
        s["baseline_pixel_auprc"] = report["pixel"][PIXEL_INTENSITY]["auprc"]
    if "subject" in report and MODEL in report["subject"]:
        s["subject_auroc"] = report["subject"][MODEL]["auroc"]
    for name in HEALTHY_BASELINES.values():
        if name in img:
            s[f"{SHORT[name]}_image_auroc"] = img[name]["auroc"]
        if name in report.get("pixel", {}):
            s[f"{SHORT[name]}_pixel_auprc"] = report["pixel"][name]["auprc"]
            if "dice_at_val_threshold" in report["pixel"][name]:
                s[f"{SHORT[name]}_pixel_dice"] = report["pixel"][name]["dice_at_val_threshold"]
    s.update(margin_summary(report.get("margin_over_best_baseline"), "image_auroc"))
    return s
