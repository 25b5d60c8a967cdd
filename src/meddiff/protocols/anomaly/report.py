"""The anomaly report: summary floats, the printed table, figures (ROC/PR, example grid) and add-on outputs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meddiff.protocols.common import (
    HEALTHY_BASELINES,
    LABELS,
    MEAN_INTENSITY,
    MODEL,
    SHORT,
    margin_summary,
    print_baseline_costs,
)

from .addons import addon_for
from .generalisation import print_generalisation

__all__ = ["PIXEL_INTENSITY", "print_report", "summary", "write_outputs"]

#: the pixel-level key of the mean-intensity baseline (``report["pixel"]``; its image-level key is MEAN_INTENSITY)
PIXEL_INTENSITY = "baseline_intensity"


def summary(report: dict[str, Any]) -> dict[str, float]:
    """The headline floats: the model's image (and pixel, subject) numbers, each baseline's, the margin over the best
    baseline and the fixed (configured, for pDDPM the published) scoring's ``fixed_*`` numbers."""
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
        if "aupro" in p:  # anomalib / MVTec AD pixel metrics (AUPRO up to FPR 0.3, F1-max)
            s.update(pixel_aupro=p["aupro"], pixel_f1_max=p["f1_max"],
                     baseline_pixel_aupro=report["pixel"][PIXEL_INTENSITY]["aupro"])
    if "subject" in report and MODEL in report["subject"]:
        s["subject_auroc"] = report["subject"][MODEL]["auroc"]
    for name in HEALTHY_BASELINES.values():
        if name in img:
            s[f"{SHORT[name]}_image_auroc"] = img[name]["auroc"]
        if name in report.get("pixel", {}):
            s[f"{SHORT[name]}_pixel_auprc"] = report["pixel"][name]["auprc"]
            if "dice_at_val_threshold" in report["pixel"][name]:
                s[f"{SHORT[name]}_pixel_dice"] = report["pixel"][name]["dice_at_val_threshold"]
            if "aupro" in report["pixel"][name]:
                s[f"{SHORT[name]}_pixel_aupro"] = report["pixel"][name]["aupro"]
    s.update(margin_summary(report.get("margin_over_best_baseline"), "image_auroc"))
    fixed = report.get("fixed_scoring")
    if fixed:
        s["fixed_image_auroc"], s["fixed_image_auprc"] = fixed["image"]["auroc"], fixed["image"]["auprc"]
        if "pixel" in fixed:
            s["fixed_pixel_auroc"], s["fixed_pixel_auprc"] = fixed["pixel"]["auroc"], fixed["pixel"]["auprc"]
            if "aupro" in fixed["pixel"]:
                s["fixed_pixel_aupro"] = fixed["pixel"]["aupro"]
    return s


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
        for key, name in (("auroc", "pixel AUROC"), ("auprc", "pixel AUPRC"), ("aupro", "pixel AUPRO (FPR<=0.3)"),
                          ("f1_max", "pixel F1-max (oracle)"),
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
    fixed = report.get("fixed_scoring")
    if fixed:
        f = fixed["image"]
        console.print(f"fixed scoring {fixed['scoring']} (configured, not selected; pDDPM's published one for "
                      f"rsna_pddpm): image AUROC {f['auroc']:.3f}, AUPRC {f['auprc']:.3f} on the same test pass")
    rt = report.get("runtime")
    if rt:
        console.print(f"precision {rt.get('precision')}, {rt.get('torch_threads')} torch thread(s) on {rt.get('device')}")
    cost = report.get("cost")
    if cost and cost.get("seconds_per_image") is not None:
        console.print(f"evaluation: {cost['seconds_per_image']:.4f} s per test image (test pass wall time / "
                      f"{cost['n_images']} images), model alone {cost['model_seconds_per_image']:.4f} s; UNet "
                      f"forwards per image and patch: {cost.get('unet_forwards_per_image_per_patch') or '-'}")
    print_baseline_costs(report.get("baselines_cost"), LABELS, console)
    print_generalisation(report.get("generalisation"), console)


def write_outputs(report: dict[str, Any], figures: Mapping[str, Any], out_dir: Path) -> None:
    """``roc.png``, ``anomaly_grid.png``, the printed table and each add-on's outputs (e.g. CT subtypes)."""
    from meddiff.viz.figures import save_anomaly_grid, save_roc_pr

    save_roc_pr(out_dir / "roc.png", figures["curves"])
    ex = figures["examples"]
    if ex:
        save_anomaly_grid(out_dir / "anomaly_grid.png", ex["image"], ex["recon"], ex["map"], ex.get("mask"),
                          ex.get("label"), n_rows=8)
    print_report(report)
    for name in figures.get("addons", []):
        addon_for(name).write(report, figures, out_dir)
