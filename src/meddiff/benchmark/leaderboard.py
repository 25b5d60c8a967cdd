"""Per-task leaderboards of a benchmark sweep: every job's ``report.json`` (anomaly protocol) -> one table per task
with the methods AND the trivial baselines as rows (``leaderboard_<task>.md/.csv/.png`` + ``leaderboard.md``).

A job dir holds ``report.json`` and its config (``config_resolved.yaml`` or ``.hydra/config.yaml``); the job's task
and method are the config's ``bench.task`` / ``bench.method`` (``configs/benchmark_uad/*.yaml``), else the data
module's class and ``experiment_name``. Columns: image AUROC and AUPRC with their 95% CIs (subject-clustered when
the report says so), pixel AUPRC and Dice at the validation threshold where masks exist, the paired AUROC margin over
the best trivial baseline (chosen on validation) with its verdict, the generalisation check (mean margin over the
unseen anomaly kinds and on how many of them the model beats the best baseline), UNet evaluations per image (from
the report's reconstruction settings; a DAE is one forward), seconds per test image (the report's ``cost``) and the
job's wall time. Baseline rows come from the first job of the
task (every job scores the same baselines on the same data; a disagreement is flagged in ``note``).
Reads files only: no Lightning, no models.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

__all__ = ["COLUMNS", "build_leaderboards", "collect_rows", "unet_evals_per_image"]

MODEL = "model"
PIXEL_INTENSITY = "baseline_intensity"
BASELINE_NAMES = {"baseline_mean_intensity": "mean intensity", "baseline_nearest_healthy_image": "nearest healthy image",
                  "baseline_mean_healthy_image": "mean healthy image"}
#: image-level baseline key -> its pixel-level key
PIXEL_KEY = {"baseline_mean_intensity": PIXEL_INTENSITY}
COLUMNS = ["task", "row", "kind", "image_auroc", "image_auroc_ci_lo", "image_auroc_ci_hi", "image_auprc",
           "image_auprc_ci_lo", "image_auprc_ci_hi", "ci_resamples", "pixel_auprc", "pixel_dice", "margin_auroc",
           "margin_ci_lo", "margin_ci_hi", "best_baseline", "baseline_chosen_on", "verdict", "unet_evals_per_image",
           "s_per_image", "model_s_per_image", "gen_mean_margin", "gen_beats_kinds", "gen_n_kinds", "job_minutes",
           "n_test", "job_dir", "note"]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_config(job: Path) -> dict[str, Any]:
    for name in ("config_resolved.yaml", ".hydra/config.yaml"):
        try:
            cfg = yaml.safe_load((job / name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(cfg, dict):
            return cfg
    return {}


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _n_patches(size: int | None, patch: int | None, stride: int | None) -> int:
    """Patches of a square ``size`` grid (``meddiff.patches`` covers the last row/column too); 1 without patching."""
    if not size or not patch or patch >= size:
        return 1
    stride = stride or patch
    per_side = math.ceil((size - patch) / stride) + 1
    return per_side * per_side


def unet_evals_per_image(report: Mapping[str, Any], cfg: Mapping[str, Any]) -> int | None:
    """UNet forwards per test image of the chosen reconstruction: draws x (1 for one-step, else steps) x patches;
    1 for the DAE; None when the report does not say how it reconstructed."""
    target = str(_get(cfg, "model", "_target_") or "")
    if target.endswith("DenoisingAutoencoder"):
        return 1
    rec = report.get("reconstruction")
    if not isinstance(rec, Mapping):
        return None
    steps = 1 if rec.get("sampler") == "one_step" else int(rec.get("steps") or 0) or None
    if steps is None:
        return None
    size = _get(cfg, "data", "image_size")
    patches = _n_patches(int(size) if size else None, rec.get("patch_size"), rec.get("stride"))
    return int(rec.get("draws") or 1) * steps * patches


def _ci(entry: Mapping[str, Any] | None, key: str) -> tuple[float | None, float | None]:
    ci = entry.get(f"{key}_ci") if entry else None
    return (float(ci[0]), float(ci[1])) if ci else (None, None)


def _metric_row(entry: Mapping[str, Any] | None, pixel: Mapping[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if entry:
        row["image_auroc"], row["image_auprc"] = entry.get("auroc"), entry.get("auprc")
        row["image_auroc_ci_lo"], row["image_auroc_ci_hi"] = _ci(entry, "auroc")
        row["image_auprc_ci_lo"], row["image_auprc_ci_hi"] = _ci(entry, "auprc")
        row["ci_resamples"] = entry.get("resampled")
    if pixel:
        row["pixel_auprc"] = pixel.get("auprc")
        row["pixel_dice"] = pixel.get("dice_at_val_threshold")
    return row


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p.parent for p in sweep_dir.rglob("report.json")), key=lambda p: (len(p.parts), str(p)))


def collect_rows(sweep_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``{task: rows}``: one row per job (its model) and one per trivial baseline of the task, best AUROC first."""
    sweep_dir = Path(sweep_dir)
    methods: dict[str, list[dict[str, Any]]] = {}
    baselines: dict[str, dict[str, dict[str, Any]]] = {}
    for job in _job_dirs(sweep_dir):
        report = _read_json(job / "report.json")
        if not report or MODEL not in report.get("image", {}):
            log.warning("%s: no anomaly report (image.model); left off the leaderboard.", job)
            continue
        cfg = _read_config(job)
        data_target = str(_get(cfg, "data", "_target_") or "unknown_data").rsplit(".", 1)[-1]
        task = str(_get(cfg, "bench", "task") or data_target)
        method = str(_get(cfg, "bench", "method") or cfg.get("experiment_name") or job.name)
        status = _read_json(job / "status.json") or {}
        wall = status.get("wall_time_s") or (_read_json(job / "bench_timing.json") or {}).get("wall_time_s")
        pixel = report.get("pixel", {})
        margin = report.get("margin_over_best_baseline") or {}
        row = {"task": task, "row": method, "kind": "method", "n_test": report.get("n_test"),
               "job_dir": str(job.relative_to(sweep_dir)) if job.is_relative_to(sweep_dir) else str(job),
               **_metric_row(report["image"][MODEL], pixel.get(MODEL))}
        if margin:
            lo, hi = margin.get("auroc_diff_ci") or (None, None)
            row.update(margin_auroc=margin.get("auroc_diff"), margin_ci_lo=lo, margin_ci_hi=hi,
                       best_baseline=BASELINE_NAMES.get(margin.get("baseline"), margin.get("baseline")),
                       baseline_chosen_on=margin.get("baseline_chosen_on"), verdict=margin.get("verdict"))
        row["unet_evals_per_image"] = unet_evals_per_image(report, cfg)
        cost = report.get("cost") or {}
        row["s_per_image"] = cost.get("seconds_per_image")
        row["model_s_per_image"] = cost.get("model_seconds_per_image")
        gen = report.get("generalisation") or {}
        if gen.get("kinds"):
            row.update(gen_mean_margin=gen.get("mean_margin"), gen_beats_kinds=gen.get("beats_kinds"),
                       gen_n_kinds=gen.get("n_kinds"), gen_kinds=_gen_kinds(gen["kinds"]))
        row["job_minutes"] = None if wall is None else float(wall) / 60
        methods.setdefault(task, []).append(row)
        for key, name in BASELINE_NAMES.items():
            if key not in report["image"]:
                continue
            b = {"task": task, "row": name, "kind": "trivial baseline", "n_test": report.get("n_test"),
                 "job_dir": row["job_dir"], "unet_evals_per_image": 0,
                 **_metric_row(report["image"][key], pixel.get(PIXEL_KEY.get(key, key)))}
            seen = baselines.setdefault(task, {})
            if name not in seen:
                seen[name] = b
            elif seen[name].get("image_auroc") != b.get("image_auroc"):
                seen[name]["note"] = "differs across jobs (their post-processing candidates differ); first job's"
    out = {}
    for task in sorted(set(methods) | set(baselines)):
        rows = methods.get(task, []) + list(baselines.get(task, {}).values())
        rows.sort(key=lambda r: -(r.get("image_auroc") if r.get("image_auroc") is not None else -1.0))
        out[task] = rows
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _with_ci(r: Mapping[str, Any], key: str, lo: str, hi: str, signed: bool = False) -> str:
    v = r.get(key)
    if v is None:
        return "-"
    s = f"{v:+.3f}" if signed else f"{v:.3f}"
    if r.get(lo) is not None and r.get(hi) is not None:
        s += f" [{r[lo]:+.3f}, {r[hi]:+.3f}]" if signed else f" [{r[lo]:.3f}, {r[hi]:.3f}]"
    return s


def _short_verdict(r: Mapping[str, Any]) -> str:
    if r.get("kind") != "method" or r.get("margin_auroc") is None:
        return ""
    lo = r.get("margin_ci_lo")
    if lo is None:
        return "no CI"
    if lo > 0:
        return "beats"
    return "WORSE" if (r.get("margin_ci_hi") or 0) < 0 else "does not beat"


def _gen_kinds(kinds: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per unseen kind: the model's and the best baseline's image AUROC, the margin and its CI (markdown only)."""
    out = {}
    for kind, e in kinds.items():
        m = _get(e, "margin_over_best_baseline") or {}
        out[kind] = {"model": _get(e, "image", MODEL, "auroc"), "baseline": m.get("auroc_baseline"),
                     "baseline_name": BASELINE_NAMES.get(m.get("baseline"), m.get("baseline")),
                     "margin": m.get("auroc_diff"), "ci": m.get("auroc_diff_ci")}
    return out


def _gen_table(rows: list[Mapping[str, Any]]) -> list[str]:
    """Per method and unseen kind: ``model AUROC vs best baseline AUROC, margin [CI]``."""
    with_gen = [r for r in rows if r.get("kind") == "method" and r.get("gen_kinds")]
    if not with_gen:
        return []
    kinds = list(dict.fromkeys(k for r in with_gen for k in r["gen_kinds"]))
    lines = ["", "Unseen anomaly kinds (model AUROC vs the best baseline's, chosen on validation; margin [paired 95% "
             "CI]):", "", "| method | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for r in with_gen:
        cells = []
        for k in kinds:
            e = r["gen_kinds"].get(k)
            if not e or e.get("model") is None or e.get("margin") is None:
                cells.append("-")
                continue
            ci = e.get("ci")
            ci_s = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
            cells.append(f"{e['model']:.3f} vs {_fmt(e.get('baseline'))} ({e.get('baseline_name')}), "
                         f"{e['margin']:+.3f}{ci_s}")
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _gen_cell(r: Mapping[str, Any]) -> str:
    """``+0.012 (beats 1/3)`` for a method row with a generalisation check; ``-`` otherwise."""
    if r.get("kind") != "method" or not r.get("gen_n_kinds") or r.get("gen_mean_margin") is None:
        return "-"
    return f"{r['gen_mean_margin']:+.3f} (beats {int(r.get('gen_beats_kinds') or 0)}/{int(r['gen_n_kinds'])})"


def markdown(task: str, rows: list[Mapping[str, Any]], command: str | None = None) -> str:
    """One task's leaderboard as a Markdown table (methods and trivial baselines as rows) + the verdicts."""
    has_pixel = any(r.get("pixel_auprc") is not None for r in rows)
    head = ["#", "method / baseline", "image AUROC [95% CI]", "image AUPRC [95% CI]"]
    if has_pixel:
        head += ["pixel AUPRC", "pixel Dice"]
    has_gen = any(r.get("gen_n_kinds") for r in rows)
    head += ["margin over best baseline [paired 95% CI]", "vs best baseline"]
    if has_gen:
        head += ["unseen kinds: mean margin (beats)"]
    head += ["UNet evals / image", "s / image", "job min"]
    lines = [f"## {task}", ""]
    n_test = next((r.get("n_test") for r in rows if r.get("n_test")), None)
    resamples = next((r.get("ci_resamples") for r in rows if r.get("ci_resamples")), None)
    lines.append(f"Test items: {_fmt(n_test)}; CIs resample {resamples or 'items'}. Every choice (checkpoint, "
                 "post-processing incl. residual sign, best baseline) made on validation; test read once per job.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        name = r["row"] if r.get("kind") == "method" else f"*{r['row']}* (trivial)"
        cells = [str(i), name, _with_ci(r, "image_auroc", "image_auroc_ci_lo", "image_auroc_ci_hi"),
                 _with_ci(r, "image_auprc", "image_auprc_ci_lo", "image_auprc_ci_hi")]
        if has_pixel:
            cells += [_fmt(r.get("pixel_auprc")), _fmt(r.get("pixel_dice"))]
        verdict = _short_verdict(r)
        if verdict and r.get("best_baseline"):
            verdict += f" ({r['best_baseline']}, chosen on {r.get('baseline_chosen_on') or '?'})"
        cells += [_with_ci(r, "margin_auroc", "margin_ci_lo", "margin_ci_hi", signed=True), verdict]
        if has_gen:
            cells.append(_gen_cell(r))
        cells += [_fmt(r.get("unet_evals_per_image")), _fmt(r.get("s_per_image"), 4), _fmt(r.get("job_minutes"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    beats = [r["row"] for r in rows if _short_verdict(r) == "beats"]
    lines += ["", (f"Beats the best trivial baseline (paired CI above 0): {', '.join(beats)}." if beats else
                   "No method beats the best trivial baseline with a paired 95% CI above 0 on this task.")]
    if has_pixel:
        mi = next((r.get("pixel_auprc") for r in rows if r["row"] == "mean intensity"), None)
        better = [r["row"] for r in rows if r.get("kind") == "method" and mi is not None
                  and (r.get("pixel_auprc") or 0) > mi]
        lines.append(f"Pixel AUPRC above the mean-intensity map's ({_fmt(mi)}): "
                     f"{', '.join(better) if better else 'none'}.")
    if has_gen:
        lines.append("Unseen kinds: dark holes, a texture patch and an intensity ramp pasted into healthy test images, "
                     "scored with the settings chosen on validation (no re-selection); mean image-AUROC margin over "
                     "the best baseline (chosen on validation) and on how many kinds its paired 95% CI is above 0.")
        lines += _gen_table(rows)
    if any(r.get("s_per_image") is not None for r in rows):
        lines.append("s / image: wall time of the job's one test pass (model, fixed scoring and every baseline) / "
                     "test images (the model's share alone: model_s_per_image in the CSV).")
    notes = [f"{r['row']}: {r['note']}" for r in rows if r.get("note")]
    lines += [f"Note: {n}" for n in notes]
    if command:
        lines += ["", f"Made by: `{command}`"]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def _write_png(path: Path, task: str, rows: list[Mapping[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.get("image_auroc") is not None][::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(shown) + 1.2))
    for i, r in enumerate(shown):
        v, lo, hi = r["image_auroc"], r.get("image_auroc_ci_lo"), r.get("image_auroc_ci_hi")
        err = [[v - lo], [hi - v]] if lo is not None and hi is not None else None
        color = "tab:blue" if r.get("kind") == "method" else "0.6"
        ax.barh(i, v, xerr=err, color=color, capsize=3)
    ax.set_yticks(range(len(shown)), [r["row"] + ("" if r.get("kind") == "method" else " (trivial)") for r in shown])
    ax.set_xlim(0.0, 1.0)
    ax.axvline(0.5, color="k", lw=0.5, ls=":")
    ax.set_xlabel("test image AUROC (95% CI)")
    ax.set_title(f"{task}: methods (blue) vs trivial baselines (grey)", fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _safe(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in task)


def build_leaderboards(sweep_dir: Path, command: str | None = None, png: bool = True) -> dict[str, list[dict]]:
    """Write ``leaderboard_<task>.md/.csv/.png`` per task and ``leaderboard.md`` (all tasks) into ``sweep_dir``;
    returns the rows per task. Jobs without a report (failed, still running) are left off with a warning."""
    sweep_dir = Path(sweep_dir)
    boards = collect_rows(sweep_dir)
    parts = ["# Benchmark leaderboard (unsupervised anomaly detection)", ""]
    for task, rows in boards.items():
        md = markdown(task, rows, command)
        (sweep_dir / f"leaderboard_{_safe(task)}.md").write_text(md)
        _write_csv(sweep_dir / f"leaderboard_{_safe(task)}.csv", rows)
        if png:
            _write_png(sweep_dir / f"leaderboard_{_safe(task)}.png", task, rows)
        parts.append(md)
    if not boards:
        parts.append("No job wrote a report.json yet.")
    (sweep_dir / "leaderboard.md").write_text("\n".join(parts))
    return boards


def main(argv: list[str] | None = None) -> None:
    """``python -m meddiff.benchmark.leaderboard <sweep_dir>``: (re)build the leaderboards of a sweep dir."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--no-png", action="store_true")
    args = p.parse_args(argv)
    boards = build_leaderboards(args.sweep_dir, png=not args.no_png)
    print((args.sweep_dir / "leaderboard.md").read_text() if boards else "no reports found")


if __name__ == "__main__":
    main()
