"""Read what a run dir holds into one record: status, overrides, config, best validation score, test metrics with
CIs, checkpoints, wall time. Works for runs that predate ``status.json`` (falls back to the CSV history, the
report and the checkpoint folder).

A run dir is a folder with ``.hydra/``, ``status.json``, ``config_resolved.yaml`` or ``report.json``; anything else
given to :func:`find_runs` is searched for run dirs (a sweep dir, a folder of sweeps, ``logs/``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meddiff.runs.identity import parse_override_lines, read_sweep_info
from meddiff.runs.status import OK, RUNNING, read_status

RUN_MARKERS = (".hydra", "status.json", "config_resolved.yaml", "report.json")
SKIP_DIRS = {"checkpoints", "wandb", "tensorboard", "csv", ".hydra", "__pycache__"}
KILLED, UNKNOWN = "killed", "unknown"
RUN_DIR_TOKEN = "<run_dir>"


@dataclass
class RunRecord:
    """One run, as tables and diffs see it."""

    run_dir: Path
    status: str                                   # ok | failed | running | killed | unknown
    error: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    monitor: str | None = None                    # the validation metric model selection keeps
    mode: str = "max"
    best_score: float | None = None
    test: dict[str, float] = field(default_factory=dict)
    test_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    wall_time_s: float | None = None
    trial: int | None = None
    sweep_dir: Path | None = None
    best_baseline: str | None = None              # the report's best baseline (chosen on validation), by key
    report: str | None = None                     # the report read: "report.json" (in training), "evals/<name>"


    def config(self) -> dict[str, Any]:
        """The run's resolved config with its own dir written as ``<run_dir>`` (so runs compare by content)."""
        return load_config(self.run_dir)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run dirs in ``paths`` (each a run dir, or searched for run dirs below it), in order, without duplicates."""
    found: list[Path] = []

    def walk(p: Path, depth: int) -> None:
        if is_run_dir(p):
            found.append(p)
            return
        if depth <= 0:
            return
        for child in sorted(p.iterdir(), key=_natural):
            if child.is_dir() and child.name not in SKIP_DIRS and not child.name.startswith("."):
                walk(child, depth - 1)

    for raw in paths:
        p = Path(raw).expanduser().resolve()
        if not p.exists():
            raise FileNotFoundError(f"{raw}: no such run or sweep dir.")
        walk(p, depth=4)
    seen: set[Path] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def _natural(p: Path) -> tuple:
    """Job dirs 0, 1, ..., 10 in numeric order."""
    return (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def load_config(run_dir: str | Path) -> dict[str, Any]:
    """``config_resolved.yaml`` (train runs) or ``.hydra/config.yaml``, with the run's own path as ``<run_dir>``."""
    run_dir = Path(run_dir)
    for name in ("config_resolved.yaml", ".hydra/config.yaml"):
        path = run_dir / name
        if path.is_file():
            text = path.read_text()
            for form in {str(run_dir), str(run_dir.resolve())}:
                text = text.replace(form, RUN_DIR_TOKEN)
            return yaml.safe_load(text) or {}
    return {}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}``; lists stay values."""
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _pid_alive(status: dict[str, Any]) -> bool | None:
    """Whether the process that wrote a ``running`` status still runs (None: it ran on another host)."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return None
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError):
        return True
    return True


def _best_from_history(run_dir: Path, monitor: str, mode: str) -> float | None:
    """Best epoch value of ``monitor`` in the CSV history (runs without ``status.json``)."""
    for path in (run_dir / "csv" / "metrics.csv", *sorted(run_dir.glob("csv/*/metrics.csv"))):
        if not path.is_file():
            continue
        with open(path, newline="") as fh:
            values = [float(r[monitor]) for r in csv.DictReader(fh) if r.get(monitor) not in (None, "")]
        values = [v for v in values if not math.isnan(v)]
        if values:
            return max(values) if mode == "max" else min(values)
    return None


def read_test_metrics(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """``report["summary"]`` floats and the CIs found for them.

    CIs: ``<k>_ci_lo``/``<k>_ci_hi`` summary pairs, or ``report[<level>]["model"]["<m>_ci"]`` for ``<level>_<m>``
    (the anomaly report's layout: ``image_auroc`` <-> ``report["image"]["model"]["auroc_ci"]``).
    """
    summary = {k: float(v) for k, v in (report.get("summary") or {}).items() if isinstance(v, int | float)}
    cis: dict[str, tuple[float, float]] = {}
    for k in list(summary):
        if k.endswith("_ci_lo") and k[:-6] + "_ci_hi" in summary:
            base = k[:-6]
            cis[base] = (summary.pop(k), summary.pop(base + "_ci_hi"))
    for k in summary:
        if k in cis:
            continue
        level, _, metric = k.partition("_")
        section = report.get(level)
        model = section.get("model") if isinstance(section, dict) else None
        ci = model.get(f"{metric}_ci") if isinstance(model, dict) else None
        if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(x, int | float) for x in ci):
            cis[k] = (float(ci[0]), float(ci[1]))
    return summary, cis


def best_baseline_name(report: dict[str, Any]) -> str | None:
    """The name of the baseline a report's margin was taken against: the first section (top level, then one level
    down) holding both ``baseline`` and ``verdict`` (the ``auroc_margin`` layout); None without one."""
    sections = [v for v in report.values() if isinstance(v, dict)]
    for section in sections + [v for s in sections for v in s.values() if isinstance(v, dict)]:
        if isinstance(section.get("baseline"), str) and "verdict" in section:
            return section["baseline"]
    return None


def report_path_of(run_dir: Path, eval_name: str | None = None) -> Path | None:
    """The report a run's row shows: ``<run_dir>/evals/<eval_name>/report.json`` when named; else the in-training
    ``report.json``, or (``evaluate=false`` + ``meddiff-eval``) the newest ``evals/*/report.json``."""
    if eval_name:
        path = run_dir / "evals" / eval_name / "report.json"
        return path if path.is_file() else None
    if (run_dir / "report.json").is_file():
        return run_dir / "report.json"
    evals = [p for p in (run_dir / "evals").glob("*/report.json") if p.is_file()]
    return max(evals, key=lambda p: (p.stat().st_mtime, p.parent.name)) if evals else None


def read_run(run_dir: str | Path, eval_name: str | None = None) -> RunRecord:
    """Everything a summary row needs from one run dir (test metrics from :func:`report_path_of`)."""
    run_dir = Path(run_dir).resolve()
    status = read_status(run_dir) or {}
    cfg = _read_yaml(run_dir / "config_resolved.yaml") or _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
    overrides = parse_override_lines(_read_yaml(run_dir / ".hydra" / "overrides.yaml") or [])
    report_path = report_path_of(run_dir, eval_name)
    try:
        report = json.loads(report_path.read_text()) if report_path is not None else {}
    except (OSError, json.JSONDecodeError):
        report = {}

    state = status.get("state")
    if state == RUNNING and _pid_alive(status) is False:
        state = KILLED
    if state is None:
        state = OK if report else UNKNOWN

    monitor = status.get("monitor") or cfg.get("optimized_metric")
    ckpt_cb = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    mode = status.get("mode") or (ckpt_cb.get("mode") if isinstance(ckpt_cb, dict) else None) or "max"
    best = status.get("best_score")
    if best is None and monitor:
        best = _best_from_history(run_dir, monitor, mode)
    best_ckpt = status.get("best_checkpoint") or report.get("checkpoint")
    last_ckpt = status.get("last_checkpoint")
    if last_ckpt is None and (run_dir / "checkpoints" / "last.ckpt").is_file():
        last_ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    test, cis = read_test_metrics(report)

    # a sweep's jobs sit in its dir (subdir = job number or trial number)
    multirun = str((hydra_cfg.get("hydra") or {}).get("mode")) in ("MULTIRUN", "RunMode.MULTIRUN")
    sweep_dir = run_dir.parent if multirun or read_sweep_info(run_dir.parent) else None
    return RunRecord(
        run_dir=run_dir, status=state, error=status.get("error"), overrides=overrides, monitor=monitor, mode=mode,
        best_score=None if best is None else float(best), test=test, test_ci=cis, best_checkpoint=best_ckpt,
        last_checkpoint=last_ckpt, wall_time_s=status.get("wall_time_s"), trial=status.get("optuna_trial"),
        sweep_dir=sweep_dir, best_baseline=best_baseline_name(report),
        report=str(report_path.relative_to(run_dir)) if report_path is not None and report else None,
    )
