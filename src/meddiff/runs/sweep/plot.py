"""``summary.png``: each job's validation score (top row) and test headline (bottom row, when the reports carry
one) against each swept parameter, one column per swept key.

Log x axes for log-spaced parameters (all values positive and spanning more than a decade, e.g. a learning rate);
failed / killed jobs drawn as red crosses on the bottom edge of every panel at their parameter value (those whose
value is not on the axis are named in the title); the headline row shows the model's test value with its CI and
the best baseline's, so a validation winner that loses to the baseline on test is seen at a glance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from meddiff.runs.status import OK
from meddiff.utils.io import atomic_write

LOG_SPAN = 10.0  # max / min above this (more than a decade): a log axis


def is_log_spaced(values: list[Any]) -> bool:
    """Numeric, all positive and spanning more than a decade."""
    nums = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").dropna()
    return len(nums) >= 2 and bool((nums > 0).all()) and float(nums.max()) / float(nums.min()) > LOG_SPAN


def _x_positions(values: pd.Series, numeric_axis: bool, cats: list[str]) -> list[float]:
    if numeric_axis:
        return pd.to_numeric(values, errors="coerce").tolist()
    return [float(cats.index(str(v))) for v in values]


def summary_figure(df: pd.DataFrame):  # -> matplotlib Figure | None
    """The figure ``summary.png`` holds (None when nothing was swept or the table has no validation column)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    a = df.attrs
    keys = list(a.get("swept", []))
    best_col = a.get("best_col")
    if not keys or best_col not in df:
        return None
    head = a.get("headline")
    head_col = f"test/{head}" if head and f"test/{head}" in df else None
    base_col = f"test/best_baseline_{head}" if head_col and f"test/best_baseline_{head}" in df else None
    ok_mask = (df["status"] == OK) & pd.to_numeric(df[best_col], errors="coerce").notna()
    ok, bad = df[ok_mask], df[df["status"] != OK]
    n_rows = 2 if head_col else 1
    fig, axes = plt.subplots(n_rows, len(keys), figsize=(max(5.0, 3.8 * len(keys)), 3.2 * n_rows + 0.4),
                             squeeze=False)
    off_axis: list[str] = []
    for j, key in enumerate(keys):
        all_x = pd.to_numeric(df[key], errors="coerce")
        numeric_axis = bool(all_x[ok_mask].notna().all()) and len(ok) > 0
        cats = [] if numeric_axis else list(dict.fromkeys(str(v) for v in df[key]))
        log = numeric_axis and is_log_spaced(df[key].tolist())
        for i in range(n_rows):
            ax = axes[i][j]
            x = _x_positions(ok[key], numeric_axis, cats)
            if i == 0:
                ax.scatter(x, pd.to_numeric(ok[best_col], errors="coerce"), label="model (validation)")
                ax.set_ylabel(best_col)
            else:
                y = pd.to_numeric(ok[head_col], errors="coerce")
                lo = pd.to_numeric(ok.get(f"{head_col}_ci_lo", pd.Series(math.nan, index=ok.index)), errors="coerce")
                hi = pd.to_numeric(ok.get(f"{head_col}_ci_hi", pd.Series(math.nan, index=ok.index)), errors="coerce")
                err = [(y - lo).fillna(0).clip(lower=0).tolist(), (hi - y).fillna(0).clip(lower=0).tolist()]
                ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label="model (test, 95% CI)")
                if base_col:
                    ax.scatter(x, pd.to_numeric(ok[base_col], errors="coerce"), marker="_", s=200, color="0.3",
                               label="best baseline (test)")
                ax.set_ylabel(head_col)
            if len(bad):
                bx = _x_positions(bad[key], numeric_axis, cats)
                shown = [v for v in bx if not (isinstance(v, float) and math.isnan(v))]
                if i == 0:
                    off_axis += [str(v) for v, p in zip(bad[key], bx) if isinstance(p, float) and math.isnan(p)]
                if shown:  # on the bottom edge: a failed job has no score
                    ax.scatter(shown, [0.02] * len(shown), transform=ax.get_xaxis_transform(), marker="x",
                               color="red", s=60, clip_on=False, label="failed / killed")
            if log:
                ax.set_xscale("log")
            if numeric_axis:  # every job's value in view, failed ones included (their marks do not set limits)
                xs = [v for v in all_x.tolist() if not math.isnan(v)]
                lo, hi = min(xs), max(xs)
                if log:
                    ax.set_xlim(lo / 1.6, hi * 1.6)
                else:
                    pad = 0.08 * (hi - lo) if hi > lo else max(abs(lo) * 0.1, 1.0)
                    ax.set_xlim(lo - pad, hi + pad)
            if cats:
                ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
            elif not log:
                ax.ticklabel_format(axis="x", useOffset=False, style="plain")
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_xlabel(key)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7, loc="best")
    title = f"{best_col} per job ({len(ok)} scored"
    if len(bad):
        title += f", {len(bad)} not ok: red x" + (f"; off axis: {', '.join(dict.fromkeys(off_axis))}" if off_axis
                                                   else "")
    fig.suptitle(title + ")" + (f"\nbelow: test {head} (95% CI) vs the best baseline" if head_col else ""),
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot_summary(df: pd.DataFrame, path: str | Path) -> Path | None:
    """Write :func:`summary_figure` to ``path`` (None when there is nothing to plot)."""
    import matplotlib.pyplot as plt

    fig = summary_figure(df)
    if fig is None:
        return None
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
