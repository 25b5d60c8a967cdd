"""The refiner protocol's report: the JSON report (``report.json`` is written by the skeleton), its ``summary`` of
headline floats (``metrics.csv``), ``refiner_report.md``, ``roc.png`` and ``aucp_selector.png``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meddiff.protocols.common import margin_summary, print_summary, summary_floats
from meddiff.utils.io import atomic_write_text


def build_report(model: Any, opts: Any, sel: Any, parts: dict[str, Any], estimates: list[str],
                 refinement: dict[str, Any] | None, options: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready report: what was evaluated, what was chosen and on what, every number, the summary."""
    primary = estimates[-1]
    report: dict[str, Any] = {"protocol": "refiner", "model": type(model).__name__, "primary_estimate": primary,
                              "estimates": list(estimates), "options": options,
                              "scoring": model.anomaly_val.scoring.as_dict()}
    if refinement is not None:
        report["refinement"] = refinement
        report["headline_num_steps"] = refinement.get("num_steps")
    report["selection"] = sel.record
    parts = dict(parts)
    report["pools_read"] = {"selection": sel.record.get("pools_read", []), "test": parts.pop("pools_read", [])}
    report.update(parts)
    margin = report["inductive"].get("model_minus_best_baseline")
    if margin and "best_baseline" in sel.record:  # the pick (common.auroc_margin's, by the validation numbers)
        sel.record["best_baseline"].update(chosen=margin["baseline"], chosen_on=margin["baseline_chosen_on"])
    report["resampled"] = {part: report[part]["resampled"] for part in ("inductive", "transductive")}
    report["summary"] = summary(report, primary)
    return report


def summary(report: Mapping[str, Any], primary: str) -> dict[str, float]:
    """Headline floats: the primary estimate's inductive/transductive/AUCp numbers, the paired differences."""
    ind, tra = report["inductive"], report["transductive"]
    s = {
        "inductive_auroc": ind["image"][primary]["auroc"],
        "inductive_auprc": ind["image"][primary]["auprc"],
        "transductive_auroc": tra["image"][primary]["auroc"],
        "aucp_transductive": report["aucp"][primary]["transductive"]["aucp"],
        "aucp_inductive": report["aucp"][primary]["inductive"]["aucp"],
    }
    if "subject" in ind and primary in ind["subject"]:
        s["inductive_subject_auroc"] = ind["subject"][primary]["auroc"]
    if "refined_minus_coarse" in ind:
        s["coarse_inductive_auroc"] = ind["image"]["coarse"]["auroc"]
        s["refined_minus_coarse"] = ind["refined_minus_coarse"]["difference"]
        s["refined_minus_coarse_ci_lo"], s["refined_minus_coarse_ci_hi"] = ind["refined_minus_coarse"]["ci"]
    s.update(margin_summary(ind.get("model_minus_best_baseline"), "inductive_auroc"))
    sel = report.get("aucp_selector")
    if sel:  # the measurement's headline: the regret of AUCp selection and the rank agreement (not a choice)
        for key, v in (("aucp_selection_regret", sel["regret"].get("aucp")),
                       ("aucp_vs_val_auroc_spearman", sel["spearman_aucp_vs_val_auroc"]["rho"])):
            if v is not None:
                s[key] = v
    pix = report.get("pixel", {}).get(primary)
    if pix:
        s["pixel_auroc"], s["pixel_auprc"] = pix["auroc"], pix["auprc"]
        if "dice_at_val_threshold" in pix:
            s["pixel_dice"] = pix["dice_at_val_threshold"]
    return summary_floats(s)


def _fmt(d: Mapping[str, Any], key: str = "auroc") -> str:
    lo, hi = d.get(f"{key}_ci", (float("nan"), float("nan")))
    return f"{d[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _difference(d: Mapping[str, Any]) -> str:
    return (f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (paired bootstrap, resampling "
            f"{d.get('resampled', 'items')})")


def render_markdown(report: Mapping[str, Any]) -> str:
    """A short human-readable version of the report."""
    sel = report["selection"]
    lines = [f"# Refiner protocol: {report['model']} (headline estimate: {report['primary_estimate']})", "",
             f"Checkpoint selection rule: **{sel['rule']}**" + (" (needs labels)" if sel["needs_labels"] else ""), ""]
    best = sel.get("best_baseline")
    if best and best.get("chosen"):
        how = (f"on {', '.join(best['pools'])} by {best['criterion']}" if best.get("criterion")
               else f"on test ({best.get('why_not')})")
        lines += [f"Best trivial baseline: **{best['chosen']}**, chosen {how}", ""]
    for part in ("inductive", "transductive"):
        r = report[part]
        lines += [f"## {part.capitalize()} (n={r['n']}, {r['n_pos']} anomalous; 95% CIs resample {r['resampled']})",
                  f"Labels used: {r['labels_used']}", "",
                  "| scorer | image AUROC [95% CI] | AUPRC [95% CI] | subject AUROC |", "|---|---|---|---|"]
        for name, d in r["image"].items():
            subj = r.get("subject", {}).get(name)
            lines.append(f"| {name} | {_fmt(d)} | {_fmt(d, 'auprc')} | {_fmt(subj) if subj else '-'} |")
        if "refined_minus_coarse" in r:
            lines.append(f"\nrefined - coarse AUROC: {_difference(r['refined_minus_coarse'])}")
        if "model_minus_best_baseline" in r:
            d = r["model_minus_best_baseline"]
            lines.append(f"\n{d['verdict']} (resampling {d['resampled']})")
        lines.append("")
    lines += ["## AUCp (labels used: none)", "", "| scorer | transductive AUCp | inductive AUCp | debiased (rho) |",
              "|---|---|---|---|"]
    for name, d in report["aucp"].items():
        t = d["transductive"]
        deb = "-" if t.get("debiased_auc") is None else f"{t['debiased_auc']:.3f} ({t['rho']})"
        lines.append(f"| {name} | {t['aucp']:.3f} | {d['inductive']['aucp']:.3f} | {deb} |")
    if "pixel" in report:
        lines += ["", "## Pixel level (test masks; Dice at the threshold chosen on labelled-validation masks)", "",
                  "| scorer | pixel AUROC | pixel AUPRC | Dice @ val threshold | Dice (oracle, test-chosen) |",
                  "|---|---|---|---|---|"]
        for name, p in report["pixel"].items():
            dice = f"{p['dice_at_val_threshold']:.3f}" if "dice_at_val_threshold" in p else "-"
            lines.append(f"| {name} | {p['auroc']:.3f} | {p['auprc']:.3f} | {dice} | {p['oracle_dice']:.3f} |")
    if "steps" in report:
        lines += ["", f"## Refinement steps (inductive test; a measurement, not a choice: the headline uses "
                      f"{report.get('headline_num_steps')} steps)", "",
                  "| estimate | steps | AUROC | s / image |", "|---|---|---|---|"]
        for row in report["steps"]:
            if "skipped" in row:
                lines.append(f"| {row['estimate']} | {row['steps']} | skipped | - |")
            elif row["auroc"] is None:
                lines.append(f"| {row['estimate']} | {row['steps']} | - (one class in {row['n']} images) | - |")
            else:
                lines.append(f"| {row['estimate']} | {row['steps']} | {row['auroc']:.3f} | {row['sec_per_image']:.4f} |")
    if "checkpoints" in report:
        lines += ["", "## Checkpoints by selection rule", "",
                  "| rule | needs labels | inductive AUROC | transductive AUROC | AUCp (transd.) |", "|---|---|---|---|---|"]
        for rule, e in report["checkpoints"].items():
            if "error" in e:
                lines.append(f"| {rule} | {e['needs_labels']} | error | | |")
            else:
                lines.append(f"| {rule} | {e['needs_labels']} | {_fmt(e, 'inductive_auroc')} | "
                             f"{e['transductive_auroc']:.3f} | {e['aucp_transductive']:.3f} |")
    if "aucp_selector" in report:
        lines += _selector_lines(report["aucp_selector"])
    return "\n".join(lines) + "\n"


def _num(v: Any) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def _selector_lines(sel: Mapping[str, Any]) -> list[str]:
    """The AUCp-selector section: one row per saved checkpoint, the regrets and the Spearman correlation."""
    lines = ["", f"## AUCp as a checkpoint selector ({sel['note']})", "",
             f"{sel['aucp']}; validation AUROC: {sel['val_auroc']}; test AUROC: {sel['test_auroc']} "
             f"(estimate: {sel['estimate']}).", "",
             "| checkpoint | step | rules | AUCp | labelled-val AUROC | test AUROC [95% CI] |", "|---|---|---|---|---|---|"]
    for r in sel["checkpoints"]:
        mark = " (evaluated)" if r["is_evaluated_model"] else ""
        lo, hi = r["test_auroc_ci"]
        lines.append(f"| {r['key']}{mark} | {r['step'] if r['step'] is not None else '-'} | "
                     f"{', '.join(r['rules']) or '-'} | {_num(r['aucp'])} | {_num(r['val_auroc'])} | "
                     f"{_num(r['test_auroc'])} [{_num(lo)}, {_num(hi)}] |")
    lines += ["", "| selection rule | picks | test-AUROC regret vs the best checkpoint (oracle) |", "|---|---|---|"]
    for rule, key in sel["picked"].items():
        lines.append(f"| {rule} | {key or '-'} | {_num(sel['regret'].get(rule))} |")
    rho = sel["spearman_aucp_vs_val_auroc"]
    lo, hi = rho["ci"]
    text = (f"Spearman(AUCp, labelled-validation AUROC) across checkpoints: {_num(rho['rho'])} [{_num(lo)}, "
            f"{_num(hi)}] (bootstrap resampling {rho['resampled']})")
    lines += ["", text + (f"; {rho['why_not']}" if rho.get("why_not") else ""), "", sel["verdict"]]
    return lines


def save_selector_figure(path: Path, sel: Mapping[str, Any]) -> None:
    """``aucp_selector.png``: AUCp, labelled-validation and test AUROC of every saved checkpoint (by step), the
    AUCp-picked and the test-best checkpoints marked."""
    from matplotlib.figure import Figure

    from meddiff.viz.figures import save_figure

    rows = sel["checkpoints"]
    x = [r["step"] if r["step"] is not None else i for i, r in enumerate(rows)]
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for field, label, style in (("aucp", "AUCp (label-free)", "o-"), ("val_auroc", "labelled-val AUROC", "s--"),
                                ("test_auroc", "test AUROC", "^:")):
        y = [float("nan") if r[field] is None else r[field] for r in rows]
        ax.plot(x, y, style, label=label)
    for key, color, label in ((sel["picked"].get("aucp"), "tab:blue", "AUCp pick"),
                              (sel.get("best_on_test"), "tab:green", "best on test (oracle)")):
        if key is not None:
            i = [r["key"] for r in rows].index(key)
            ax.axvline(x[i], color=color, alpha=0.3, lw=4, label=label)
    ax.set_xlabel("training step" if all(r["step"] is not None for r in rows) else "checkpoint")
    ax.set_ylabel("AUC")
    ax.set_title(f"AUCp as a selector (regret {_num(sel['regret'].get('aucp'))})")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write_outputs(report: Mapping[str, Any], figures: Mapping[str, Any], out_dir: Path) -> None:
    """``refiner_report.md``, ``roc.png`` of the inductive test set (when ``figures`` holds its curves),
    ``aucp_selector.png`` (when it holds the selector measurement) and the summary table on the console (``common.print_summary``) with the margin's verdict."""
    if "curves" in figures:
        from meddiff.viz.figures import save_roc_pr

        save_roc_pr(out_dir / "roc.png", dict(figures["curves"]), title="Inductive test set")
    if "aucp_selector" in figures:
        save_selector_figure(out_dir / "aucp_selector.png", figures["aucp_selector"])
    atomic_write_text(out_dir / "refiner_report.md", render_markdown(report))
    margin = report["inductive"].get("model_minus_best_baseline")
    print_summary(report["summary"], f"Refiner protocol: {report['model']} ({report['primary_estimate']}); 95% CIs "
                                     f"resample {report['inductive']['resampled']}",
                  footer=[margin["verdict"]] if margin else [])
