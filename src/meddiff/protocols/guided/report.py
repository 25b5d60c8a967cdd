"""The guided report: per-volume and per-slice tables, the summary floats, the report dict, figures (per-volume
metric curves, SSIM over all volumes, worst slices, ROC AD vs CN) and the printed summary with the verdict."""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.protocols.base import Outcome
from meddiff.protocols.common import (
    LABELS,
    MEAN_INTENSITY,
    margin_summary,
    print_baseline_costs,
    print_summary,
    write_csv,
)

from .options import GuidedEvalOptions
from .select import volume_scores
from .translate import VolumeResult

__all__ = ["assemble_report", "translation_record", "write_figures", "write_outputs"]

log = logging.getLogger(__name__)

#: per-slice similarity metrics, in table order
SIMILARITY = ("ssim", "psnr", "ms_ssim", "vsi", "lpips")


def translation_record(sampling: Any) -> dict[str, Any]:
    """``report["translate"]``: the translation settings used (the copy of ``model.sampling`` with the ``eval.*``
    overrides), under the report's key names (``num_steps`` = ``sampling.steps``)."""
    return {"t_start": int(sampling.t_start), "num_steps": sampling.steps,
            "guidance_scale": sampling.guidance_scale, "invert": sampling.invert,
            "target_class": sampling.target_class, "seed": sampling.seed}


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


def assemble_report(model: Any, results: Sequence[VolumeResult], selection: Any, opts: GuidedEvalOptions,
                    cls_section: dict[str, Any], curves: dict[str, Any], margin_section: dict[str, Any] | None,
                    metrics_skipped: dict[str, str], skipped: list[dict[str, str]]) -> Outcome:
    """The JSON-ready report (``summary`` floats) and, for :func:`write_outputs`, the rows of the CSV tables, the
    results (figures) and the ROC curves."""
    choice = selection.choice
    base_keys = list(selection.baselines.reconstruct)
    rows = _slice_rows(results)
    metric_cols = [k for k in SIMILARITY if any(k in r.metrics for r in results)]
    outliers = sorted((r for r in rows if r["ssim"] < float(opts.ssim_outlier)), key=lambda r: r["ssim"])
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
            "score": float(per_volume["model"][i]),
            "baseline_score": float(per_volume[MEAN_INTENSITY][i]),
            **{k: float(per_volume[k][i]) for k in base_keys},
        }
        if r.fid is not None:
            v["fid"] = r.fid
        volumes[r.source.volume_id] = v
        vol_rows.append({"volume": r.source.volume_id, "class": v["class"], "n_slices": v["n_slices"],
                         **{f"mean_{k}": a for k, a in v["mean"].items()}, "min_ssim": v["min_ssim"],
                         "n_outliers": v["n_outliers"], "score": v["score"], "baseline_score": v["baseline_score"],
                         **{k: v[k] for k in base_keys}})
    all_metrics = {k: np.concatenate([r.metrics[k] for r in results if k in r.metrics]) for k in metric_cols}
    slice_means = {k: _finite_mean(v) for k, v in all_metrics.items()}

    def pick(key: str, comp: str, field_: str = "auroc") -> float:
        d = cls_section[key].get(comp, {})
        return float(d.get(field_, float("nan"))) if "skipped" not in d else float("nan")

    ad_ci = cls_section["model"].get("AD_vs_CN", {}).get("auroc_ci", (math.nan,) * 2)
    summary = {
        "ssim_mean": slice_means.get("ssim", float("nan")),
        "psnr_mean": slice_means.get("psnr", float("nan")),
        "ms_ssim_mean": slice_means.get("ms_ssim", float("nan")),
        "vsi_mean": slice_means.get("vsi", float("nan")),
        "auroc_ad_vs_cn": pick("model", "AD_vs_CN"),
        "auroc_ad_vs_cn_ci_lo": float(ad_ci[0]),
        "auroc_ad_vs_cn_ci_hi": float(ad_ci[1]),
        "baseline_auroc_ad_vs_cn": pick(MEAN_INTENSITY, "AD_vs_CN"),
        "auroc_any_vs_cn": pick("model", "any_vs_CN"),
        "baseline_auroc_any_vs_cn": pick(MEAN_INTENSITY, "any_vs_CN"),
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
        "translate": translation_record(selection.sampling),
        "scoring": model.anomaly_val.scoring.as_dict(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "input": opts.input if opts.input is None or isinstance(opts.input, str) else dict(opts.input),
        "ms_ssim_scales": {
            "requested": int(opts.ms_ssim_scales),
            "used": sorted({r.ms_ssim_scales for r in results}),
            "note": "standard 5 scales need >= 176 px; 3 scales (first 3 betas rescaled) from 44 px",
        },
        "similarity": {"whole_image": True, "data_range": 2.0, "slice_means": slice_means,
                       "ssim_outlier": float(opts.ssim_outlier)},
        "metrics_skipped": metrics_skipped,
        "selection": choice,
        "classification": cls_section,
        "margin_over_best_baseline": margin_section,
        "baselines_cost": {k: c.as_dict() for k, c in selection.baselines.cost.items()},
        "volumes": volumes,
        "outliers": outliers[:200],
        "skipped": skipped,
        "figures": {},
        "summary": summary,
    }
    header = ["volume", "class", "id", "axis", "index", *metric_cols, "score", "mean_intensity", *base_keys]
    vol_header = ["volume", "class", "n_slices", *[f"mean_{k}" for k in metric_cols], "min_ssim", "n_outliers",
                  "score", "baseline_score", *base_keys]
    tables = {"slice_metrics.csv": (rows, header), "outlier_slices.csv": (outliers, header),
              "volume_scores.csv": (vol_rows, vol_header)}
    return Outcome(report, {"results": results, "curves": curves, "tables": tables, "opts": opts})


def write_outputs(outcome: Outcome, out_dir: Path) -> None:
    """The CSV tables and figures (their paths into ``report["figures"]``), the skipped-volume warning and the
    printed summary with the verdict."""
    report, figures = outcome.report, outcome.figures
    opts = figures["opts"]
    for name, (rows, header) in figures["tables"].items():
        write_csv(out_dir / name, rows, header)
    written = write_figures(figures["results"], opts, out_dir)
    if len(figures["curves"]) >= 2:
        from meddiff.viz.figures import save_roc_pr

        save_roc_pr(out_dir / "roc_ad_vs_cn.png", figures["curves"], title="AD vs CN, volume level (test)")
        written["roc_ad_vs_cn"] = "roc_ad_vs_cn.png"
    report["figures"] = written
    skipped = report["skipped"]
    if skipped:
        listing = "; ".join(f"{s['volume']}: {s['reason']}" for s in skipped)
        warnings.warn(f"guided evaluation skipped {len(skipped)} volume(s): {listing}", stacklevel=2)
    _print_summary(report)


def _print_summary(report: Mapping[str, Any]) -> None:
    summary, choice = report["summary"], report["selection"]
    log.info("guided evaluation: %s", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    m = report.get("margin_over_best_baseline")
    verdict = m["verdict"] if m else "No margin over the baselines: the test volumes lack CN or non-CN."
    log.info("%s", verdict)
    print_summary(summary, f"Guided translation toward CN (volume reduction {choice['model_reduction']!r}, "
                           f"chosen on {choice.get('chosen_on', '?')})", [verdict])
    print_baseline_costs(report.get("baselines_cost"), LABELS)
