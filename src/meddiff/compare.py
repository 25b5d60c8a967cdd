"""``python -m meddiff.compare <run_or_sweep_dir> [...]`` (console script ``meddiff-compare``): compare any runs.

Each argument is a run dir or a folder searched for run dirs (a sweep, several sweeps, ``logs/``). Prints one row per
run: swept / differing overrides, status (ok / failed + first error line / killed / running), the validation score
of the kept checkpoint, test metrics with 95% CIs, checkpoint, wall time; best first.

  meddiff-compare logs/train/multiruns/2026-01-01_10-00-00
  meddiff-compare sweepA sweepB runs/x --out table.csv      # or .md
  meddiff-compare runs/a runs/b --diff                      # the config keys and metrics that differ
  meddiff-compare runs/a --eval default_2026-01-01_10-00-00  # the metrics of runs/a/evals/<name>

Test metrics come from a run's ``report.json`` (evaluated in training) or, without one (``evaluate=false``), from the
newest ``meddiff-eval`` of its checkpoints, ``<run_dir>/evals/<name>/report.json``; ``--eval <name>`` picks one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from meddiff.runs.sweep.run_summary import find_runs, read_run
from meddiff.runs.sweep.table import build_table, config_diff, metric_diff, print_table, write_table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meddiff-compare", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[2] + "\n\n" + __doc__.strip().split("\n\n")[3])
    p.add_argument("paths", nargs="+", help="run dirs, sweep dirs or folders holding them")
    p.add_argument("--out", type=Path, help="also write the table: .csv (every column) or .md")
    p.add_argument("--diff", action="store_true",
                   help="list exactly the config keys whose values differ, then the validation metric and test "
                        "headline of each run (with CIs) and their differences")
    p.add_argument("--eval", dest="eval_name", metavar="NAME",
                   help="test metrics from <run_dir>/evals/NAME/ (default: report.json, else the newest evaluation)")
    p.add_argument("--no-sort", action="store_true", help="keep the order of the arguments")
    return p


def _console():  # noqa: ANN202 - rich.console.Console
    """A rich console; piped output is not folded (as in ``print_table``)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(240, console.width))


def _value(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def print_diff(run_dirs: list[Path], diff: dict[str, list[Any]]) -> None:
    from rich.table import Table

    console = _console()
    if not diff:
        console.print(f"The {len(run_dirs)} runs have the same config.")
        return
    table = Table(title=f"{len(diff)} config keys differ")
    table.add_column("key")
    for i, d in enumerate(run_dirs):
        table.add_column(f"[{i}] {d.name}")
    for key, values in diff.items():
        table.add_row(key, *(_value(v) for v in values))
    console.print(table)
    for i, d in enumerate(run_dirs):
        console.print(f"[{i}] {d}")


def print_metric_diff(run_dirs: list[Path], diff: dict[str, list[str]]) -> None:
    from rich.table import Table

    table = Table(title="metrics (validation score of the kept checkpoint; test headline with 95% CIs)")
    table.add_column("metric")
    for i, d in enumerate(run_dirs):
        table.add_column(f"[{i}] {d.name}", justify="right")
    for key, values in diff.items():
        table.add_row(key, *values)
    _console().print(table)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run_dirs = find_runs(args.paths)
    except FileNotFoundError as e:
        print(f"meddiff-compare: {e}", file=sys.stderr)
        return 2
    if not run_dirs:
        print(f"meddiff-compare: no run dirs in {' '.join(args.paths)} (a run dir holds .hydra/, status.json, "
              "config_resolved.yaml or report.json).", file=sys.stderr)
        return 2
    if args.diff:
        if len(run_dirs) < 2:
            print("meddiff-compare --diff needs at least two runs.", file=sys.stderr)
            return 2
        print_diff(run_dirs, config_diff(run_dirs))
        print_metric_diff(run_dirs, metric_diff([read_run(d, args.eval_name) for d in run_dirs]))
        return 0
    df = build_table([read_run(d, args.eval_name) for d in run_dirs], sort=not args.no_sort)
    print_table(df, title=f"{len(df)} runs")
    if args.out:
        try:
            path = write_table(df, args.out, title="meddiff-compare " + " ".join(args.paths))
        except ValueError as e:
            print(f"meddiff-compare: {e}", file=sys.stderr)
            return 2
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
