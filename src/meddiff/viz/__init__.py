"""Figures for anomaly detection (headless; matplotlib's Agg canvas, pyplot is never imported)."""

from meddiff.viz.figures import (
    pr_curve,
    roc_curve,
    save_anomaly_grid,
    save_figure,
    save_metric_curves,
    save_roc_pr,
    to_numpy,
)

__all__ = ["save_anomaly_grid", "save_roc_pr", "save_metric_curves", "roc_curve", "pr_curve", "save_figure", "to_numpy"]
