"""Hydra callback of ``experiment=benchmark_uad``: times each job and, after the multirun (and after every job, so an
interrupted sweep still has its boards), builds the per-task leaderboards in the sweep dir."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from meddiff.benchmark.leaderboard import build_leaderboards
from meddiff.benchmark.wandb_table import log_leaderboards

log = logging.getLogger(__name__)


class LeaderboardCallback(Callback):
    """``on_multirun_end``: ``build_leaderboards(hydra.sweep.dir)``, then each task's board as a ``wandb.Table`` in a
    run of the sweep's own (``wandb``: true; offline unless ``WANDB_MODE`` says otherwise; skipped without wandb);
    failures are logged, never raised (the jobs' results stay on disk and
    ``python -m meddiff.benchmark.leaderboard <sweep_dir>`` rebuilds the boards)."""

    def __init__(self, png: bool = True, wandb: bool = True) -> None:
        self.png = png
        self.wandb = wandb
        self._started: float | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.monotonic()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._started is None:
            return
        out = Path(str(config.hydra.runtime.output_dir))
        timing = {"wall_time_s": time.monotonic() - self._started}
        try:
            (out / "bench_timing.json").write_text(json.dumps(timing))
        except OSError as e:
            log.warning("could not write %s: %s", out / "bench_timing.json", e)
        self._build(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        boards = self._build(sweep_dir)
        if boards:
            log.info("Leaderboards (%s) written to %s", ", ".join(boards), sweep_dir)
        if not self.wandb:
            log.info("leaderboard not logged to wandb: the callback's wandb option is false.")
        elif boards:
            project = OmegaConf.select(config, "logger.wandb.project", default=None) or "meddiff"
            group = OmegaConf.select(config, "experiment_name", default=None)
            log_leaderboards(boards, sweep_dir, project=str(project), group=None if group is None else str(group))

    def _build(self, sweep_dir: Path) -> dict:
        try:
            return build_leaderboards(sweep_dir, command="make benchmark", png=self.png)
        except Exception as e:  # noqa: BLE001 - a table must never fail the sweep
            log.warning("leaderboard of %s not written: %s: %s", sweep_dir, type(e).__name__, e)
            return {}
