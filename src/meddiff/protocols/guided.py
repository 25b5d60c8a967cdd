"""Evaluation protocol ``guided``: translate MRI slices toward healthy (CN) and analyse them per volume (seed 004).

``run(model, datamodule, eval_cfg, out_dir, device) -> report`` (the registry :mod:`meddiff.protocols` runs it for
models with ``eval_protocol = "guided"``, e.g. :class:`meddiff.models.guided.GuidedDiffusion`).

Data come through public per-volume APIs only (:class:`VolumeDataModule`: ``volumes(split)`` and
``input_volumes(spec, label)``, e.g. :class:`meddiff.data.adni_slices.ADNISliceDataModule`). The model is never
changed: ``eval.*`` translation overrides make a copy of its ``translate`` settings, and its device and
train/eval flags are restored after the run.

Volumes: the test split of the DataModule, or ``eval.input`` = a ``.nii``/``.nii.gz`` volume (class from
``eval.input_label``, optional), a ``dataset.json`` (every entry; paths relative to the json's dir) or one
``dataset.json``-style record ``{"image": ..., "label": 1..5}`` (the seed's ``--infDict``). Slices are made with
the DataModule's slice settings, so they match training. ``max_volumes`` caps the count (classes interleaved so a
cap keeps every class); ``slice_stride`` keeps every k-th slice of a volume (quick looks).

Per slice (input ``x`` vs healthy counterfactual ``h``, both ``[1, S, S]`` in ``[-1, 1]``, whole image as in the
seed, data range 2): SSIM (11-px Gaussian window), PSNR (dB, capped at ``max_psnr``), MS-SSIM with
``ms_ssim_scales`` scales (default 3: the standard 5 need >= 176 px; 3 fit from 44 px, so 64 and 128 px runs use
the same definition; the first 3 standard betas rescaled to the full sum), and the anomaly score = mean of
``|x - h|`` inside the brain mask (the model's ``scoring`` config). VSI (``eval.vsi``, on by default): meddiff's
torch VSI (:func:`meddiff.metrics.image_quality.image_scores`, whole image, data range 2). LPIPS (``lpips_torch_home``:
a ``$TORCH_HOME`` holding the torchvision AlexNet weights) and FID (``fid_weights``: torch-fidelity Inception
weights; per volume, inputs vs counterfactuals) run only when their weights (and packages) are there; otherwise
they are skipped with a one-line warning.

Per volume: ``volumes/<volume>_similarity.png`` (SSIM, MS-SSIM across slices) and ``volumes/<volume>_psnr.png``;
for all volumes ``ssim_all_volumes.png``; ``slice_metrics.csv`` (every slice), ``outlier_slices.csv`` (slices with
SSIM < ``ssim_outlier``, worst first) and ``worst_slices.png`` (input | healthy | |x - h| of the ``n_worst``
lowest-SSIM slices); ``volume_scores.csv``.

Classification use: a volume's score reduces its slice scores (``mean`` | ``median`` | ``p90`` | ``max``); the
reduction is chosen on the *validation* volumes (best AUROC of non-CN vs CN), as are the reduction and the sign of
the trivial baseline (mean intensity inside the brain mask; atrophy can make it go either way). Baselines beside the
model (``eval.baselines``): the nearest healthy training slice (:class:`meddiff.metrics.baselines.NearestHealthy`,
pixel-space L2 inside the brain mask) and the mean healthy slice (``MeanHealthy``), both from a fixed seeded subset of
<= ``baseline_max_items`` CN training slices; a slice's baseline score is the model's scorer applied to
``|x - baseline(x)|`` (mean inside the brain mask), reduced to a volume score with the baseline's own reduction chosen
on validation. Selection runs first, sees the DataModule through :class:`meddiff.protocols.base.ValidationView` and
asks only for ``volumes("train")`` (the CN reference) and ``volumes("val")``; ``selection["chosen_on"]`` and
``selection["splits_read"]`` record what it read. Then the test volumes are read once: AUROC/AUPRC with 95 % CIs
that resample subjects (:func:`meddiff.metrics.detection.detection_ci`) of AD vs CN, each class vs CN and
any-non-CN vs CN, model beside every baseline; ``report["margin_over_best_baseline"]``: a paired bootstrap CI of
"model - best baseline" AUROC (AD vs CN; the best baseline by validation AUROC) with a one-line verdict;
``report["baselines_cost"]``; and ``roc_ad_vs_cn.png``. Everything is written atomically (:mod:`meddiff.utils.io`) into ``out_dir``;
``report.json`` and ``metrics.csv`` (the summary) last.

A broken volume in a batch run (unreadable file, bad label, failure while translating) is skipped and listed in
``report["skipped"]`` (with a warning); a single-volume input that fails raises a ``DataError`` naming it.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from meddiff.data.adni_slices import Volumes, VolumeSource
from meddiff.data.formats.adni_json import CLASS_NAMES
from meddiff.data.preprocess.mri_slices import VolumeData
from meddiff.errors import ConfigError, DataError
from meddiff.protocols.base import ValidationView, evaluating, write_report
from meddiff.protocols.common import (
    LABELS,
    MEAN_INTENSITY,
    auroc_margin,
    build_healthy_baselines,
    check_healthy_baselines,
    margin_summary,
    print_baseline_costs,
    print_summary,
    write_csv,
)
from meddiff.utils.options import options_from

log = logging.getLogger(__name__)

__all__ = [
    "REDUCTIONS",
    "GuidedEvalOptions",
    "HealthyBaselines",
    "MetricSkippedWarning",
    "VolumeData",
    "VolumeDataModule",
    "VolumeResult",
    "VolumeSource",
    "choose_on_validation",
    "classification",
    "healthy_baselines",
    "reduce_slices",
    "run",
    "translate_many",
    "translate_volume",
]

#: slice -> volume score reductions tried on validation
REDUCTIONS: tuple[str, ...] = ("mean", "median", "p90", "max")


class MetricSkippedWarning(UserWarning):
    """A metric was skipped (missing weights or packages); the report says which and why."""


@dataclass
class GuidedEvalOptions:
    """``eval:`` options of the guided protocol (``configs/eval/guided.yaml``; ``+eval.<key>=`` on the CLI).

    Translation overrides (``None`` = the model's ``translate`` setting): ``guidance_scale``, ``t_start``,
    ``num_steps``, ``invert``. Inputs: ``input``, ``input_label``, ``max_volumes``, ``val_max_volumes``,
    ``slice_stride``. Analysis: ``ssim_outlier``, ``n_worst``, ``ms_ssim_scales``, ``max_psnr``, ``reductions``,
    ``n_boot``, ``seed``, ``volume_plots``. Baselines: ``baselines``, ``baseline_max_items``. Optional metrics:
    ``vsi``, ``lpips_torch_home``, ``fid_weights``.
    """

    input: Any = None
    input_label: int | str | None = None
    guidance_scale: float | None = None
    t_start: int | None = None
    num_steps: int | None = None
    invert: bool | None = None
    max_volumes: int | None = None
    val_max_volumes: int | None = None
    slice_stride: int = 1
    batch_size: int = 64
    ssim_outlier: float = 0.6
    n_worst: int = 8
    ms_ssim_scales: int = 3
    max_psnr: float = 100.0
    reductions: Sequence[str] = REDUCTIONS
    n_boot: int = 1000
    seed: int = 0
    volume_plots: bool = True
    vsi: bool = True
    baselines: Sequence[str] = ("nearest_healthy", "mean_healthy")  # healthy-set baselines ([] = mean intensity)
    baseline_max_items: int = 5000  # CN training slices they use at most (a fixed seeded subset)
    lpips_torch_home: str | None = None
    fid_weights: str | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming a bad option (run by :func:`meddiff.utils.options.options_from`)."""
        if self.guidance_scale is not None and not float(self.guidance_scale) >= 0:
            raise ConfigError(
                f"eval.guidance_scale={self.guidance_scale!r} must be >= 0 (0 = unconditional, ~3 = the seed's)."
            )
        for name in ("max_volumes", "val_max_volumes"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"eval.{name}={v!r} must be >= 1 or null (all volumes).")
        if int(self.slice_stride) < 1 or int(self.batch_size) < 1 or int(self.n_worst) < 0:
            raise ConfigError(
                f"eval.slice_stride={self.slice_stride}, eval.batch_size={self.batch_size} must be >= 1 and "
                f"eval.n_worst={self.n_worst} >= 0."
            )
        if not -1.0 <= float(self.ssim_outlier) <= 1.0:
            raise ConfigError(
                f"eval.ssim_outlier={self.ssim_outlier!r} must be an SSIM value in [-1, 1] (seed: 0.6)."
            )
        if int(self.ms_ssim_scales) < 1:
            raise ConfigError(f"eval.ms_ssim_scales={self.ms_ssim_scales!r} must be >= 1 (3 for 64-128 px).")
        self.reductions = tuple(str(r) for r in (self.reductions or ()))
        bad = [r for r in self.reductions if r not in REDUCTIONS]
        if not self.reductions or bad:
            raise ConfigError(
                f"eval.reductions={list(self.reductions)} must be a non-empty subset of {list(REDUCTIONS)}."
            )
        if isinstance(self.n_boot, bool) or int(self.n_boot) < 0:
            raise ConfigError(f"eval.n_boot={self.n_boot!r} must be an integer >= 0.")
        names = [self.baselines] if isinstance(self.baselines, str) else list(self.baselines or ())
        self.baselines = tuple(str(b) for b in names)
        check_healthy_baselines(self.baselines, self.baseline_max_items)

    def translate_overrides(self) -> dict[str, Any]:
        """The ``model.translate`` overrides (None = keep the model's value)."""
        return {
            "guidance_scale": self.guidance_scale,
            "t_start": self.t_start,
            "num_steps": self.num_steps,
            "invert": self.invert,
        }




# ------------------------------------------------------------------------------------------ data access
@runtime_checkable
class VolumeDataModule(Protocol):
    """What the guided protocol reads from a DataModule (public, per volume)."""

    def volumes(self, split: str) -> Volumes:
        """The volumes of ``split`` (``val`` / ``test``)."""
        ...

    def input_volumes(self, spec: Any, input_label: Any = None, what: str = "input") -> Volumes:
        """Volumes named by ``eval.input`` (a ``.nii.gz``, a ``dataset.json`` or a record)."""
        ...


def _interleave_cap(sources: list[VolumeSource], cap: int | None) -> list[VolumeSource]:
    """At most ``cap`` sources, taken round-robin over classes (each class in its original order)."""
    if cap is None or cap >= len(sources):
        return sources
    by_class: dict[Any, list[VolumeSource]] = {}
    for s in sources:
        by_class.setdefault(s.slice_label, []).append(s)
    out: list[VolumeSource] = []
    queues = [list(v) for _, v in sorted(by_class.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
    while len(out) < cap and any(queues):
        for q in queues:
            if q and len(out) < cap:
                out.append(q.pop(0))
    return out


# ------------------------------------------------------------------------------------------ healthy baselines
@dataclass
class HealthyBaselines:
    """Healthy-set baselines: report key -> ``reconstruct(x [B, 1, S, S], mask [B, 1, S, S]) -> [B, 1, S, S]``, and
    their costs (``BaselineCost``, updated by every query); ``note`` says why none were built."""

    reconstruct: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


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


# ------------------------------------------------------------------------------------------ optional metrics
class _OptionalMetrics:
    """LPIPS / FID when weights are supplied locally (and their packages import); VSI unless ``eval.vsi=false``."""

    def __init__(self, opts: GuidedEvalOptions, device: torch.device) -> None:
        self.skipped: dict[str, str] = {}
        self.lpips = None
        self.fid_factory: Callable[[], Any] | None = None
        if not opts.vsi:
            self.skipped["vsi"] = "disabled (eval.vsi=false)"
        if opts.lpips_torch_home:
            home = Path(opts.lpips_torch_home).expanduser()
            if not (home / "hub" / "checkpoints").is_dir():
                self._skip(
                    "lpips", f"LPIPS skipped: {str(home)!r} has no hub/checkpoints with the AlexNet weights."
                )
            else:
                try:
                    os.environ["TORCH_HOME"] = str(home)
                    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                    self.lpips = (
                        LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=False)
                        .to(device)
                        .eval()
                    )
                except Exception as exc:  # ImportError (torchvision), missing weights, ...
                    self._skip(
                        "lpips", f"LPIPS skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    )
        else:
            self._skip(
                "lpips", "LPIPS skipped: no local weights (set eval.lpips_torch_home to a $TORCH_HOME)."
            )
        if opts.fid_weights:
            path = Path(opts.fid_weights).expanduser()
            try:
                if not path.is_file():
                    raise FileNotFoundError(f"{str(path)!r} not found")
                from torchmetrics.image.fid import FrechetInceptionDistance

                FrechetInceptionDistance(
                    feature=2048, normalize=True, feature_extractor_weights_path=str(path)
                )

                def make() -> Any:
                    return FrechetInceptionDistance(
                        feature=2048, normalize=True, feature_extractor_weights_path=str(path)
                    ).to(device)

                self.fid_factory = make
            except Exception as exc:
                self._skip("fid", f"FID skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        else:
            self._skip("fid", "FID skipped: no local Inception weights (set eval.fid_weights).")

    def _skip(self, name: str, message: str) -> None:
        self.skipped[name] = message
        warnings.warn(message, MetricSkippedWarning, stacklevel=3)

    @torch.no_grad()
    def lpips_per_slice(self, x: torch.Tensor, h: torch.Tensor) -> np.ndarray | None:
        if self.lpips is None:
            return None
        rgb = lambda t: t.repeat(1, 3, 1, 1) if t.shape[1] == 1 else t  # noqa: E731
        return np.array([float(self.lpips(rgb(x[i : i + 1]), rgb(h[i : i + 1]))) for i in range(x.shape[0])])

    @torch.no_grad()
    def fid_volume(self, x: torch.Tensor, h: torch.Tensor) -> float | None:
        if self.fid_factory is None or x.shape[0] < 2:
            return None
        fid = self.fid_factory()
        to01 = lambda t: ((t.repeat(1, 3, 1, 1) if t.shape[1] == 1 else t) + 1) / 2  # noqa: E731
        fid.update(to01(x), real=True)
        fid.update(to01(h), real=False)
        return float(fid.compute())


# ------------------------------------------------------------------------------------------ per volume
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


@dataclass
class VolumeResult:
    """Per-slice arrays ``[N]`` of one translated volume (+ its worst slices' images for the figure)."""

    source: VolumeSource
    ids: list[str]
    axes: np.ndarray
    indices: np.ndarray
    metrics: dict[str, np.ndarray]  # ssim, psnr, ms_ssim[, lpips]
    score: np.ndarray  # anomaly score per slice (mean |x - h| in the brain mask)
    baseline: np.ndarray  # mean intensity in the brain mask per slice
    fid: float | None = None
    worst: list[tuple[float, int, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    ms_ssim_scales: int = 0  # MS-SSIM scales used (the requested count, fewer if the slice is too small)
    baselines: dict[str, np.ndarray] = field(default_factory=dict)  # healthy-set baseline score per slice


@torch.no_grad()
def translate_volume(
    model: Any,
    source: VolumeSource,
    translate_cfg: Any,
    opts: GuidedEvalOptions,
    device: torch.device,
    extra: _OptionalMetrics | None = None,
    keep_worst: int = 0,
    baselines: HealthyBaselines | None = None,
) -> VolumeResult:
    """Translate every ``slice_stride``-th slice of a volume toward healthy and measure it (and score it with each
    healthy-set baseline's reconstruction through the model's scorer)."""
    from meddiff.anomaly.scoring import score_batch
    from meddiff.metrics.baselines import mean_intensity_score
    from meddiff.metrics.image_quality import image_scores, ms_ssim, ms_ssim_scales

    data = source.load()
    keep = np.arange(0, data.images.shape[0], int(opts.slice_stride))
    images, masks = data.images[keep], data.masks[keep]
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(
            f"{source.name or source.volume_id}: no slices to evaluate (shape {tuple(images.shape)})."
        )
    if not torch.isfinite(images).all():
        raise DataError(f"{source.name or source.volume_id}: slices hold NaN/inf values.")
    h, w = images.shape[-2:]
    scales = min(int(opts.ms_ssim_scales), ms_ssim_scales(h, w))
    cols: dict[str, list[np.ndarray]] = {"ssim": [], "psnr": [], "ms_ssim": [], "vsi": [], "lpips": []}
    score, base, xs, hs = [], [], [], []
    refs = baselines.reconstruct if baselines is not None else {}
    base_scores: dict[str, list[np.ndarray]] = {k: [] for k in refs}
    worst: list[tuple[float, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    gen = torch.Generator(device=device).manual_seed(int(translate_cfg.seed))
    for start in range(0, images.shape[0], int(opts.batch_size)):
        x = images[start : start + int(opts.batch_size)].to(device)
        m = masks[start : start + int(opts.batch_size)].to(device)
        healthy = model.healthy_counterfactual(x, translate_cfg, generator=gen)
        if not torch.isfinite(healthy).all():
            raise DataError(f"{source.name or source.volume_id}: the translation produced NaN/inf.")
        q = image_scores(x, healthy, dynamic_range=2.0, max_psnr=float(opts.max_psnr))
        cols["ssim"].append(q["ssim"].cpu().numpy())
        cols["psnr"].append(q["psnr"].cpu().numpy())
        if opts.vsi:
            cols["vsi"].append(q["vsi"].cpu().numpy())
        cols["ms_ssim"].append(
            ms_ssim(x, healthy, data_range=2.0, scales=scales).cpu().numpy()
            if scales >= 1
            else np.full(x.shape[0], np.nan)
        )
        if extra is not None:
            lp = extra.lpips_per_slice(x, healthy)
            if lp is not None:
                cols["lpips"].append(lp)
        sc = score_batch(x, healthy, m, model.scoring_cfg)
        score.append(sc["score"].float().cpu().numpy())
        base.append(mean_intensity_score(x, m).cpu().numpy())
        for key, recon in refs.items():
            base_scores[key].append(score_batch(x, recon(x, m), m, model.scoring_cfg)["score"].float().cpu().numpy())
        if extra is not None and extra.fid_factory is not None:
            xs.append(x.cpu())
            hs.append(healthy.cpu())
        if keep_worst > 0:
            for j, s in enumerate(cols["ssim"][-1].tolist()):
                item = (-float(s), start + j, x[j].cpu(), healthy[j].cpu(), sc["map"][j].cpu())
                if len(worst) < keep_worst:
                    heapq.heappush(worst, item)
                else:
                    heapq.heappushpop(worst, item)
    metrics = {k: np.concatenate(v).astype(np.float64) for k, v in cols.items() if v}
    fid = extra.fid_volume(torch.cat(xs), torch.cat(hs)) if (extra is not None and xs) else None
    ids = [f"{source.volume_id}:{int(a)}:{int(i)}" for a, i in zip(data.axes[keep], data.indices[keep])]
    return VolumeResult(
        source,
        ids,
        data.axes[keep],
        data.indices[keep],
        metrics,
        np.concatenate(score).astype(np.float64),
        np.concatenate(base).astype(np.float64),
        fid,
        [(-a, b, c, d, e) for a, b, c, d, e in worst],
        scales,
        {k: np.concatenate(v).astype(np.float64) for k, v in base_scores.items()},
    )


def translate_many(
    model: Any,
    sources: Sequence[VolumeSource],
    translate_cfg: Any,
    opts: GuidedEvalOptions,
    device: torch.device,
    extra: _OptionalMetrics | None = None,
    keep_worst: int = 0,
    batch: bool = True,
    what: str = "test",
    baselines: HealthyBaselines | None = None,
) -> tuple[list[VolumeResult], list[dict[str, str]]]:
    """:func:`translate_volume` over many volumes; with ``batch`` a failing volume is skipped and listed."""
    from tqdm.auto import tqdm

    results, skipped = [], []
    for src in tqdm(sources, desc=f"guided translation ({what})", leave=False, disable=len(sources) < 2):
        try:
            results.append(translate_volume(model, src, translate_cfg, opts, device, extra, keep_worst, baselines))
        except Exception as exc:
            if not batch:
                if isinstance(exc, DataError):
                    raise
                raise DataError(f"{src.name or src.volume_id}: {type(exc).__name__}: {exc}") from exc
            reason = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            skipped.append({"volume": src.volume_id, "reason": reason})
    if sources and not results:
        listing = "; ".join(f"{s['volume']}: {s['reason']}" for s in skipped[:5])
        raise DataError(f"none of the {len(sources)} {what} volumes could be evaluated ({listing}).")
    return results, skipped


# ------------------------------------------------------------------------------------------ classification
def _binary(
    results: Sequence[VolumeResult], values: np.ndarray, positive: set[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 labels of CN (0) vs the ``positive`` slice labels (1); other volumes dropped."""
    lab = np.array([r.source.slice_label or 0 for r in results])
    keep = (lab == 1) | np.isin(lab, list(positive))
    return values[keep], (lab[keep] != 1).astype(np.int64)


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


# ------------------------------------------------------------------------------------------ outputs
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-100:] or "volume"



def _finite_mean(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _slice_rows(results: Sequence[VolumeResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        for j, sid in enumerate(r.ids):
            row = {
                "volume": r.source.volume_id,
                "class": r.source.class_name,
                "id": sid,
                "axis": int(r.axes[j]),
                "index": int(r.indices[j]),
                "score": float(r.score[j]),
                "mean_intensity": float(r.baseline[j]),
                **{k: float(v[j]) for k, v in r.baselines.items()},
            }
            row.update({k: float(v[j]) for k, v in r.metrics.items()})
            rows.append(row)
    return rows


def write_figures(results: Sequence[VolumeResult], opts: GuidedEvalOptions, out_dir: Path) -> dict[str, Any]:
    """Per-volume metric curves, SSIM over all volumes and the worst slices; returns the written paths."""
    from meddiff.viz.figures import save_anomaly_grid, save_metric_curves

    written: dict[str, Any] = {"volumes": {}}
    if opts.volume_plots:
        for r in results:
            x = np.arange(len(r.ids))
            sim = {
                k.upper().replace("_", "-"): r.metrics[k]
                for k in ("ssim", "ms_ssim", "vsi", "lpips")
                if k in r.metrics
            }
            name = _safe(r.source.volume_id)
            title = f"{r.source.volume_id} ({r.source.class_name}): slices sagittal | coronal | axial"
            p1 = save_metric_curves(
                out_dir / "volumes" / f"{name}_similarity.png",
                x,
                sim,
                "slice (axis-major)",
                "similarity to healthy counterfactual",
                title=title,
            )
            p2 = save_metric_curves(
                out_dir / "volumes" / f"{name}_psnr.png",
                x,
                {"PSNR": r.metrics["psnr"]},
                "slice (axis-major)",
                "PSNR [dB]",
                title=title,
            )
            written["volumes"][r.source.volume_id] = [
                str(p1.relative_to(out_dir)),
                str(p2.relative_to(out_dir)),
            ]
    n = max(len(r.ids) for r in results)
    series = {}
    for r in results:
        v = np.full(n, np.nan)
        v[: len(r.ids)] = r.metrics["ssim"]
        series[f"{r.source.volume_id} ({r.source.class_name})"] = v
    written["ssim_all_volumes"] = str(
        save_metric_curves(
            out_dir / "ssim_all_volumes.png",
            np.arange(n),
            series,
            "slice (axis-major)",
            "SSIM",
            title=f"SSIM across slices, {len(results)} volumes",
        ).relative_to(out_dir)
    )
    worst = sorted(
        (w for r in results for w in [(a, r, b, c, d, e) for a, b, c, d, e in r.worst]), key=lambda t: t[0]
    )[: int(opts.n_worst)]
    if worst:
        images = torch.stack([w[3] for w in worst])
        recons = torch.stack([w[4] for w in worst])
        maps = torch.stack([w[5] for w in worst])
        names = ", ".join(f"{w[1].ids[w[2]]} ({w[0]:.3f})" for w in worst[:3])
        written["worst_slices"] = str(
            save_anomaly_grid(
                out_dir / "worst_slices.png",
                images,
                recons,
                maps,
                n_rows=len(worst),
                title=f"lowest SSIM slices (outlier threshold {opts.ssim_outlier}): {names}",
            ).relative_to(out_dir)
        )
    return written



# ------------------------------------------------------------------------------------------ entry point
def select(
    model: Any,
    data: ValidationView,
    tcfg: Any,
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
        val_sources = _interleave_cap(val_sources, opts.val_max_volumes)
        val_results, val_bad = translate_many(
            model, val_sources, tcfg, opts, device, None, 0, True, "val", baselines=baselines
        )
    choice = choose_on_validation(val_results, opts.reductions)
    if not val_results:
        choice["chosen_on"] = "defaults"
    choice["splits_read"] = data.splits_read  # what selection actually asked the DataModule for
    return choice, [{**s, "split": "val"} for s in val_bad]


def run(
    model: Any,
    datamodule: Any,
    eval_cfg: Mapping[str, Any] | GuidedEvalOptions | None,
    out_dir: str | Path,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Translate the test volumes (or ``eval.input``) toward healthy; similarity analysis and classification.

    Args:
        model: a ``GuidedDiffusion`` (``healthy_counterfactual``, ``translate_cfg``, ``scoring_cfg``); not changed.
        datamodule: a :class:`VolumeDataModule` (e.g. the ADNI slice DataModule; its slice settings slice
            ``eval.input`` volumes so they match training).
        eval_cfg: :class:`GuidedEvalOptions` fields (unknown keys are a :class:`ConfigError`).
        out_dir: output folder (created).
        device: torch device (default: the model's).

    Returns:
        The JSON-ready report (also written to ``out_dir/report.json``) with ``summary`` floats.
    """
    opts = options_from(GuidedEvalOptions, eval_cfg, "eval")
    if not isinstance(datamodule, VolumeDataModule):
        raise ConfigError(
            f"the guided protocol reads whole volumes through datamodule.volumes(split) and "
            f"datamodule.input_volumes(spec); {type(datamodule).__name__} has neither. Use data=adni_slices."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # eval overrides go into a copy of the model's translate settings (with_overrides returns a new config)
    tcfg = model.translate_cfg.with_overrides(**opts.translate_overrides()).validate(
        model.schedule.num_train_timesteps, model.num_classes
    )
    with evaluating(model, device) as model:
        # 1. choices on validation only (the view refuses test attributes); the baselines' CN reference from train
        view = ValidationView(datamodule)
        refs = healthy_baselines(view, opts, device)
        choice, val_skipped = select(model, view, tcfg, opts, device, refs)
        if refs.note:
            choice["baselines_skipped"] = refs.note
        # 2. the test volumes (or eval.input), touched once
        if opts.input is not None:
            vols = datamodule.input_volumes(opts.input, opts.input_label, what="eval.input")
        else:
            vols = datamodule.volumes("test")  # volumes the DataModule could not load are listed in skipped
        sources = _interleave_cap(vols.sources, opts.max_volumes)
        extra = _OptionalMetrics(opts, device)
        results, bad = translate_many(
            model, sources, tcfg, opts, device, extra, keep_worst=int(opts.n_worst), batch=vols.batch, what="test",
            baselines=refs,
        )
    skipped = list(vols.skipped) + bad + val_skipped
    cls_section, curves = classification(results, choice, opts.n_boot, opts.seed)
    margin_section = margin(results, choice, opts.n_boot, opts.seed)
    base_keys = list(refs.reconstruct)

    # tables and figures
    rows = _slice_rows(results)
    metric_cols = [k for k in ("ssim", "psnr", "ms_ssim", "vsi", "lpips") if any(k in r.metrics for r in results)]
    header = ["volume", "class", "id", "axis", "index", *metric_cols, "score", "mean_intensity", *base_keys]
    write_csv(out_dir / "slice_metrics.csv", rows, header)
    outliers = sorted((r for r in rows if r["ssim"] < float(opts.ssim_outlier)), key=lambda r: r["ssim"])
    write_csv(out_dir / "outlier_slices.csv", outliers, header)
    volumes: dict[str, Any] = {}
    vol_rows = []
    per_volume = volume_scores(results, choice)
    for i, r in enumerate(results):
        v = {
            "class": r.source.class_name,
            "slice_label": r.source.slice_label,
            "n_slices": len(r.ids),
            "mean": {k: _finite_mean(a) for k, a in r.metrics.items()},
            "min_ssim": float(np.nanmin(r.metrics["ssim"])),
            "n_outliers": int((r.metrics["ssim"] < float(opts.ssim_outlier)).sum()),
            "score": reduce_slices(r.score, choice["model_reduction"]),
            "baseline_score": float(per_volume[MEAN_INTENSITY][i]),
            **{k: float(per_volume[k][i]) for k in base_keys},
        }
        if r.fid is not None:
            v["fid"] = r.fid
        volumes[r.source.volume_id] = v
        vol_rows.append(
            {
                "volume": r.source.volume_id,
                "class": v["class"],
                "n_slices": v["n_slices"],
                **{f"mean_{k}": a for k, a in v["mean"].items()},
                "min_ssim": v["min_ssim"],
                "n_outliers": v["n_outliers"],
                "score": v["score"],
                "baseline_score": v["baseline_score"],
                **{k: v[k] for k in base_keys},
            }
        )
    vol_header = [
        "volume",
        "class",
        "n_slices",
        *[f"mean_{k}" for k in metric_cols],
        "min_ssim",
        "n_outliers",
        "score",
        "baseline_score",
        *base_keys,
    ]
    write_csv(out_dir / "volume_scores.csv", vol_rows, vol_header)
    figures = write_figures(results, opts, out_dir)
    if len(curves) >= 2:
        from meddiff.viz.figures import save_roc_pr

        save_roc_pr(out_dir / "roc_ad_vs_cn.png", curves, title="AD vs CN, volume level (test)")
        figures["roc_ad_vs_cn"] = "roc_ad_vs_cn.png"
    if skipped:
        listing = "; ".join(f"{s['volume']}: {s['reason']}" for s in skipped)
        warnings.warn(f"guided evaluation skipped {len(skipped)} volume(s): {listing}", stacklevel=2)

    all_metrics = {k: np.concatenate([r.metrics[k] for r in results if k in r.metrics]) for k in metric_cols}
    slice_means = {k: _finite_mean(v) for k, v in all_metrics.items()}

    def pick(key: str, comp: str, field_: str = "auroc") -> float:
        d = cls_section[key].get(comp, {})
        return float(d.get(field_, float("nan"))) if "skipped" not in d else float("nan")

    summary = {
        "ssim_mean": slice_means.get("ssim", float("nan")),
        "psnr_mean": slice_means.get("psnr", float("nan")),
        "ms_ssim_mean": slice_means.get("ms_ssim", float("nan")),
        "vsi_mean": slice_means.get("vsi", float("nan")),
        "auroc_ad_vs_cn": pick("model", "AD_vs_CN"),
        "auroc_ad_vs_cn_ci_lo": float(
            cls_section["model"].get("AD_vs_CN", {}).get("auroc_ci", (math.nan,) * 2)[0]
        ),
        "auroc_ad_vs_cn_ci_hi": float(
            cls_section["model"].get("AD_vs_CN", {}).get("auroc_ci", (math.nan,) * 2)[1]
        ),
        "baseline_auroc_ad_vs_cn": pick("baseline_mean_intensity", "AD_vs_CN"),
        "auroc_any_vs_cn": pick("model", "any_vs_CN"),
        "baseline_auroc_any_vs_cn": pick("baseline_mean_intensity", "any_vs_CN"),
        **{f"{k}_auroc_ad_vs_cn": pick(k, "AD_vs_CN") for k in base_keys},
        "n_volumes": float(len(results)),
        "n_slices": float(len(rows)),
        "n_outlier_slices": float(len(outliers)),
        "n_skipped": float(len(skipped)),
    }
    if "lpips" in slice_means:
        summary["lpips_mean"] = slice_means["lpips"]
    summary.update(margin_summary(margin_section, "auroc"))
    report: dict[str, Any] = {
        "protocol": "guided",
        "translate": asdict(tcfg),
        "scoring": model.scoring_cfg.as_dict(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "input": opts.input if opts.input is None or isinstance(opts.input, str) else dict(opts.input),
        "ms_ssim_scales": {
            "requested": int(opts.ms_ssim_scales),
            "used": sorted({r.ms_ssim_scales for r in results}),
            "note": "standard 5 scales need >= 176 px; 3 scales (first 3 betas rescaled) from 44 px",
        },
        "similarity": {
            "whole_image": True,
            "data_range": 2.0,
            "slice_means": slice_means,
            "ssim_outlier": float(opts.ssim_outlier),
        },
        "metrics_skipped": extra.skipped,
        "selection": choice,
        "classification": cls_section,
        "margin_over_best_baseline": margin_section,
        "baselines_cost": {k: c.as_dict() for k, c in refs.cost.items()},
        "volumes": volumes,
        "outliers": outliers[:200],
        "skipped": skipped,
        "figures": figures,
        "summary": summary,
    }
    write_report(report, out_dir)  # report.json + metrics.csv, last
    _print_summary(summary, choice, report)
    return report


def _print_summary(summary: Mapping[str, float], choice: Mapping[str, Any], report: Mapping[str, Any]) -> None:
    log.info("guided evaluation: %s", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    m = report.get("margin_over_best_baseline")
    verdict = m["verdict"] if m else "No margin over the baselines: the test volumes lack CN or non-CN."
    log.info("%s", verdict)
    print_summary(summary, f"Guided translation toward CN (volume reduction {choice['model_reduction']!r}, "
                           f"chosen on {choice.get('chosen_on', '?')})", [verdict])
    print_baseline_costs(report.get("baselines_cost"), LABELS)
