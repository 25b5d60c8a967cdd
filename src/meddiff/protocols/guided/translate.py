"""Translating volumes toward healthy and measuring them, slice by slice: similarity (SSIM, PSNR, MS-SSIM, VSI,
optional LPIPS / FID), the anomaly score with the model's scorer, and each baseline's score (used by selection on
the validation volumes and by the one test pass)."""

from __future__ import annotations

import heapq
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.errors import DataError

from .interfaces import Volume
from .options import GuidedEvalOptions

__all__ = ["HealthyBaselines", "MetricSkippedWarning", "OptionalMetrics", "VolumeResult", "interleave_cap",
           "translate_many", "translate_volume"]


class MetricSkippedWarning(UserWarning):
    """A metric was skipped (missing weights or packages); the report says which and why."""


def interleave_cap(sources: list[Volume], cap: int | None) -> list[Volume]:
    """At most ``cap`` sources, taken round-robin over classes (each class in its original order)."""
    if cap is None or cap >= len(sources):
        return sources
    by_class: dict[Any, list[Volume]] = {}
    for s in sources:
        by_class.setdefault(s.slice_label, []).append(s)
    out: list[Volume] = []
    queues = [list(v) for _, v in sorted(by_class.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
    while len(out) < cap and any(queues):
        for q in queues:
            if q and len(out) < cap:
                out.append(q.pop(0))
    return out


@dataclass
class HealthyBaselines:
    """Healthy-set baselines: report key -> ``reconstruct(x [B, 1, S, S], mask [B, 1, S, S]) -> [B, 1, S, S]``, and
    their costs (``BaselineCost``, updated by every query); ``note`` says why none were built."""

    reconstruct: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


# ------------------------------------------------------------------------------------------ optional metrics
class OptionalMetrics:
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


@dataclass
class VolumeResult:
    """Per-slice arrays ``[N]`` of one translated volume (+ its worst slices' images for the figure)."""

    source: Volume
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
    source: Volume,
    sampling: Any,
    opts: GuidedEvalOptions,
    device: torch.device,
    extra: OptionalMetrics | None = None,
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
    gen = torch.Generator(device=device).manual_seed(int(sampling.seed))
    for start in range(0, images.shape[0], int(opts.batch_size)):
        x = images[start : start + int(opts.batch_size)].to(device)
        m = masks[start : start + int(opts.batch_size)].to(device)
        healthy = model.healthy_counterfactual(x, sampling, generator=gen)
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
        scoring = model.anomaly_val.scoring
        sc = score_batch(x, healthy, m, scoring)
        score.append(sc["score"].float().cpu().numpy())
        base.append(mean_intensity_score(x, m).cpu().numpy())
        for key, recon in refs.items():
            base_scores[key].append(score_batch(x, recon(x, m), m, scoring)["score"].float().cpu().numpy())
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
    sources: Sequence[Volume],
    sampling: Any,
    opts: GuidedEvalOptions,
    device: torch.device,
    extra: OptionalMetrics | None = None,
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
            results.append(translate_volume(model, src, sampling, opts, device, extra, keep_worst, baselines))
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
