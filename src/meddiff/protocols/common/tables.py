"""Summary, CSV and console tables shared by the protocols (the report files themselves: ``protocols.base``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meddiff.utils.io import atomic_write_csv

from .baselines import LABELS

__all__ = ["console", "print_baseline_costs", "print_summary", "summary_floats", "write_csv"]


def summary_floats(summary: Mapping[str, Any]) -> dict[str, float]:
    """``summary`` with every value a Python float (numpy scalars, ints and bools converted; order kept)."""
    return {str(k): float(v) for k, v in summary.items()}


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], header: Sequence[str]) -> None:
    """``rows`` as CSV with columns ``header`` (other keys dropped), floats as ``%.6g``, NaN as ``nan``, atomic."""
    import pandas as pd

    atomic_write_csv(Path(path), pd.DataFrame(list(rows), columns=list(header)), float_format="%.6g", na_rep="nan")


def console() -> Any:
    """A rich console for the printed tables (the report files hold the same numbers)."""
    from rich.console import Console

    return Console()


def print_summary(summary: Mapping[str, float], title: str, footer: Sequence[str] = ()) -> None:
    """A two-column ``metric | value`` table of ``summary`` (4 decimals), then the ``footer`` lines."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in summary.items():
        t.add_row(k, f"{v:.4f}")
    c = console()
    c.print(t)
    for line in footer:
        c.print(line)


def print_baseline_costs(costs: Mapping[str, Mapping[str, Any]] | None, labels: Mapping[str, str] = LABELS,
                         out: Any = None) -> None:
    """One line per healthy-set baseline: what it cost (``BaselineCost.as_dict()``: seconds, what it scanned)."""
    c = out if out is not None else console()
    for name, cost in (costs or {}).items():
        c.print(f"{labels.get(name, name)}: {cost['seconds']:.2f} s ({cost['scanned']})")
