"""The unsupervised-anomaly-detection benchmark's read side: per-task leaderboards built from the jobs' reports
(``leaderboard``), written after an ``experiment=benchmark_uad`` multirun by a Hydra callback (``callback``)."""

from meddiff.benchmark.leaderboard import build_leaderboards, collect_rows

__all__ = ["build_leaderboards", "collect_rows"]
