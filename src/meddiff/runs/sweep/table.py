"""The comparison table of runs (one row per run), its CSV / Markdown / PNG / rich forms, and config diffs.

Columns: ``run`` (path relative to the common root), ``trial`` (Optuna sweeps), one per swept key (the keys a
sweep varies, plus any override whose value differs between the runs), ``status``, ``error`` (first line),
``best <monitor>`` (the validation score of the checkpoint model selection keeps), test metrics (CSV: value and
``_ci_lo`` / ``_ci_hi``; Markdown and terminal: ``value [lo, hi]``), ``checkpoint``, ``wall_time_s``.
Rows are sorted by the best validation score (best first; failed and unscored runs last).

The headline: when the reports carry a protocol margin (``best_baseline_<m>`` and ``margin_<m>`` in their summary,
see ``meddiff.protocols.common.margin_summary``), Markdown and terminal show ``<m>``, the best baseline (name and
value), the margin with its CI and a ``verdict`` (``beats`` when the CI lies above 0, ``WORSE`` below, ``does NOT
beat`` otherwise) instead of the first few test metrics; the CSV gains ``best_baseline`` and ``verdict`` columns.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from meddiff.runs.identity import is_identity_key, read_sweep_info, short_value
from meddiff.runs.status import OK
from meddiff.runs.sweep.run_summary import RunRecord, flatten, load_config
from meddiff.utils.io import atomic_write_csv, atomic_write_text

SHOWN_TEST_METRICS = 4  # without a protocol headline, Markdown / terminal show the first few test metrics
BEATS, NOT_BEATS, WORSE = "beats", "does NOT beat", "WORSE"


def headline_metric(test_keys: Sequence[str]) -> str | None:
    """The metric ``<m>`` of the protocol's headline (``margin_<m>`` and ``best_baseline_<m>`` both reported)."""
    for k in test_keys:
        if k.startswith("margin_") and not k.endswith(("_ci_lo", "_ci_hi")):
            m = k[len("margin_"):]
            if f"best_baseline_{m}" in test_keys:
                return m
    return None


def headline_keys(test_keys: Sequence[str], n_test: int = SHOWN_TEST_METRICS) -> list[str]:
    """The test keys a display table shows: the headline's (model, best baseline, margin), else the first few."""
    m = headline_metric(test_keys)
    if m is None:
        return list(test_keys)[:n_test]
    return [k for k in (m, f"best_baseline_{m}", f"margin_{m}") if k in test_keys]


def verdict(ci: tuple[float, float] | None) -> str | None:
    """The margin's verdict from its CI (None without one), worded as the protocols' verdict sentences."""
    if ci is None or any(v is None or math.isnan(v) for v in ci):
        return None
    lo, hi = ci
    return BEATS if lo > 0 else WORSE if hi < 0 else NOT_BEATS


def swept_columns(records: Sequence[RunRecord]) -> list[str]:
    """Swept keys of the records' sweeps, then every identity override whose value differs between records."""
    keys: list[str] = []
    for sweep_dir in dict.fromkeys(r.sweep_dir for r in records if r.sweep_dir is not None):
        keys += [k for k in read_sweep_info(sweep_dir).get("swept", []) if k not in keys]
    all_keys = dict.fromkeys(k for r in records for k in r.overrides if is_identity_key(k))
    for k in all_keys:
        if k not in keys and len({r.overrides.get(k) for r in records}) > 1:
            keys.append(k)
    return keys


def _common_root(records: Sequence[RunRecord]) -> Path | None:
    if not records:
        return None
    root = Path(os.path.commonpath([str(r.run_dir) for r in records]))
    return root.parent if len(records) == 1 else root


def monitor_of(records: Sequence[RunRecord]) -> tuple[str | None, str]:
    """The validation metric (and mode) most runs were selected on."""
    monitors = [r.monitor for r in records if r.monitor]
    if not monitors:
        return None, "max"
    monitor = max(set(monitors), key=monitors.count)
    modes = [r.mode for r in records if r.monitor == monitor]
    return monitor, max(set(modes), key=modes.count)


def build_table(records: Sequence[RunRecord], sort: bool = True) -> pd.DataFrame:
    """One row per run (see the module docstring for the columns)."""
    root = _common_root(records)
    monitor, mode = monitor_of(records)
    best_col = f"best {monitor}" if monitor else "best val"
    swept = swept_columns(records)
    test_keys = list(dict.fromkeys(k for r in records for k in r.test))
    with_trials = any(r.trial is not None for r in records)
    headline = headline_metric(test_keys)
    rows = []
    for r in records:
        row: dict[str, Any] = {"run": str(r.run_dir.relative_to(root)) if root else str(r.run_dir)}
        if row["run"] == ".":
            row["run"] = r.run_dir.name
        if with_trials:
            row["trial"] = r.trial
        for k in swept:
            row[k] = r.overrides.get(k)
        row["status"] = r.status
        row["error"] = r.error or ""
        row[best_col] = r.best_score if r.monitor == monitor else None
        for k in test_keys:
            row[f"test/{k}"] = r.test.get(k)
            if any(k in q.test_ci for q in records):
                lo, hi = r.test_ci.get(k, (None, None))
                row[f"test/{k}_ci_lo"], row[f"test/{k}_ci_hi"] = lo, hi
        if headline is not None:
            row["best_baseline"] = r.best_baseline or ""
            row["verdict"] = verdict(r.test_ci.get(f"margin_{headline}")) or ""
        row["checkpoint"] = r.best_checkpoint or r.last_checkpoint or ""
        row["report"] = r.report or ""
        row["wall_time_s"] = r.wall_time_s
        rows.append(row)
    df = pd.DataFrame(rows)
    attrs = dict(monitor=monitor, mode=mode, best_col=best_col, swept=swept, test_keys=test_keys, headline=headline)
    df.attrs.update(attrs)
    if sort and len(df):
        score = pd.to_numeric(df[best_col], errors="coerce").tolist()
        status = df["status"].tolist()

        def rank(i: int) -> tuple[bool, float]:
            bad = status[i] != OK or pd.isna(score[i])
            return bad, 0.0 if pd.isna(score[i]) else (-score[i] if mode == "max" else score[i])

        order = sorted(range(len(df)), key=rank)
        df = df.iloc[order].reset_index(drop=True)
        df.attrs.update(attrs)
    return df


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def display_rows(df: pd.DataFrame, n_test: int = SHOWN_TEST_METRICS) -> tuple[list[str], list[list[str]]]:
    """Header and cells for Markdown / terminal: CIs folded into ``value [lo, hi]``, the protocol's headline (or the
    first ``n_test`` test metrics), the error only when a run failed."""
    a = df.attrs
    test_keys = headline_keys(list(a.get("test_keys", [])), n_test)
    headline = a.get("headline")
    swept = list(a.get("swept", []))
    cols = ["run"] + (["trial"] if "trial" in df else []) + swept + ["status"]
    show_error = bool((df.get("error", pd.Series(dtype=str)).astype(str) != "").any())
    header = cols + (["error"] if show_error else []) + [a["best_col"]] + [f"test/{k}" for k in test_keys]
    from_evals = bool(df.get("report", pd.Series(dtype=str)).astype(str).str.startswith("evals/").any())
    header += (["verdict"] if headline else []) + (["report"] if from_evals else []) + ["checkpoint", "wall time"]
    root_ckpts = [str(c) for c in df.get("checkpoint", [])]
    rows = []
    for i in range(len(df)):
        r = df.iloc[i]
        cells = []
        for c in cols:
            v = r[c]
            if c == "trial":
                cells.append(_fmt(None if pd.isna(v) else int(v)))
            elif c in swept and v is not None and not (isinstance(v, float) and pd.isna(v)):
                cells.append(short_value(str(v)))
            else:
                cells.append(_fmt(v))
        if show_error:
            cells.append(str(r["error"]))
        cells.append(_fmt(r[a["best_col"]]))
        for k in test_keys:
            v = r.get(f"test/{k}")
            lo, hi = r.get(f"test/{k}_ci_lo"), r.get(f"test/{k}_ci_hi")
            cell = _fmt(v, 3)
            if lo is not None and not pd.isna(lo) and v is not None and not pd.isna(v):
                cell += f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
            if headline and k == f"best_baseline_{headline}" and r.get("best_baseline") and cell != "-":
                cell = f"{r['best_baseline']} {cell}"
            cells.append(cell)
        if headline:
            cells.append(str(r.get("verdict") or "-"))
        if from_evals:  # where the test metrics come from when some run was evaluated after training
            cells.append(str(r["report"]).removesuffix("/report.json") or "-")
        ckpt = root_ckpts[i]
        cells.append(_short_path(ckpt))
        w = r.get("wall_time_s")
        cells.append("-" if w is None or pd.isna(w) else f"{float(w):.0f} s")
        rows.append(cells)
    return header, rows


def _short_path(p: str, keep: int = 3) -> str:
    parts = Path(p).parts
    return str(Path(*parts[-keep:])) if len(parts) > keep else p


def to_markdown(df: pd.DataFrame, title: str | None = None) -> str:
    header, rows = display_rows(df)

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"# {title}", ""] if title else []
    a = df.attrs
    if a.get("monitor"):
        lines += [f"Sorted by `{a['monitor']}` ({a['mode']}imum best first): the validation score of the checkpoint "
                  "model selection kept. Test metrics with 95% CIs.", ""]
    if a.get("headline"):
        m = a["headline"]
        lines += [f"Test headline: `{m}` of the model, of the best baseline (chosen on validation) and the margin "
                  "model - best baseline with its paired 95% CI; `verdict` is `beats` only when that CI lies above 0.",
                  ""]
    lines.append("| " + " | ".join(esc(h) for h in header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(df: pd.DataFrame, title: str | None = None) -> None:
    """The display table in the terminal (failed / killed runs in red); piped output is not folded."""
    from rich.console import Console
    from rich.table import Table

    header, rows = display_rows(df)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(240, console.width))
    table = Table(title=title)
    for h in header:
        numeric = h.startswith(("best", "test/", "wall"))
        if h == "error":
            table.add_column(h, max_width=48, overflow="ellipsis", no_wrap=True)
        else:
            table.add_column(h, justify="right" if numeric else "left", overflow="fold")
    for row, status in zip(rows, df["status"] if len(df) else []):
        table.add_row(*row, style=None if status == OK else "red")
    console.print(table)


def write_summary(df: pd.DataFrame, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """``summary.csv``, ``summary.md`` and ``summary.png`` (when something was swept) in ``out_dir``."""
    out_dir = Path(out_dir)
    written = {"csv": atomic_write_csv(out_dir / "summary.csv", df),
               "md": atomic_write_text(out_dir / "summary.md", to_markdown(df, title))}
    from meddiff.runs.sweep.plot import plot_summary  # matplotlib only when a summary is written

    png = plot_summary(df, out_dir / "summary.png")
    if png is not None:
        written["png"] = png
    return written


def write_table(df: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """``--out``: ``.csv`` (every column) or ``.md`` (the display table)."""
    path = Path(path)
    if path.suffix == ".csv":
        return atomic_write_csv(path, df)
    if path.suffix == ".md":
        return atomic_write_text(path, to_markdown(df, title))
    raise ValueError(f"--out {path}: use a .csv or .md file name.")


def metric_diff(records: Sequence[RunRecord]) -> dict[str, list[str]]:
    """What ``meddiff-compare --diff`` lists beside the config keys: per run, the validation score of the kept
    checkpoint and the test headline (model, best baseline, margin, each ``value [lo, hi]``), the verdict and the
    report they come from; plus ``<key> (run i - run 0)`` rows with the differences of the numbers."""
    df = build_table(records, sort=False)
    a = df.attrs
    header, rows = display_rows(df)
    keys = [a["best_col"]] + [f"test/{k}" for k in headline_keys(a.get("test_keys", []))]
    out: dict[str, list[str]] = {}
    for key in keys + [c for c in ("verdict", "report") if c in header]:
        col = header.index(key)
        out[key] = [row[col] for row in rows]
    for key in keys:
        values = pd.to_numeric(df[key] if key in df else pd.Series([None] * len(df)), errors="coerce").tolist()
        if len(values) > 1 and not pd.isna(values[0]):
            out[f"{key} (run i - run 0)"] = ["-" if pd.isna(v) else f"{v - values[0]:+.4g}" for v in values]
    return out


def config_diff(run_dirs: Sequence[str | Path]) -> dict[str, list[Any]]:
    """Config keys (dotted, resolved) whose values differ between the runs -> the value in each run
    (``<missing>`` where a run lacks the key). A run's own dir counts as the same value in every run."""
    flat = [flatten(load_config(d)) for d in run_dirs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = "<missing>"
    return {k: [f.get(k, missing) for f in flat] for k in keys
            if len({repr(f.get(k, missing)) for f in flat}) > 1}
