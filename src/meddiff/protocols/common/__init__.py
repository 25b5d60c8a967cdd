"""Pieces every evaluation protocol shares, each written once (import from here, not from the submodules).

Baselines (``common.baselines``): the trivial baselines reported beside every model.

- ``MODEL``, ``MEAN_INTENSITY``, ``HEALTHY_BASELINES`` (``eval.baselines`` name -> report key), ``LABELS``
  (report key -> display name), ``SHORT`` (report key -> summary-key stem): the shared vocabulary of reports.
- ``check_healthy_baselines(names, max_items) -> [names]``: validate ``eval.baselines`` (ConfigError otherwise).
- ``load_healthy_reference(dataset, max_items, seed) -> (images [N, C, H, W], n_total, seconds)``: a fixed seeded
  subset of a map-style healthy dataset (label-1 items skipped).
- ``build_healthy_baselines(reference, kinds, device, n_healthy_total, fit_seconds) -> {key: HealthyBaseline}``;
  ``HealthyBaseline.reconstruct(x [B, C, H, W], region [B, 1, H, W] | None) -> [B, C, H, W]`` (score it with the
  model's scorer) and ``.cost`` (``BaselineCost``: ``.as_dict()`` for ``report["baselines_cost"]``).
- the mean-intensity baseline needs no reference: ``meddiff.metrics.baselines.mean_intensity_score(x, region)``.

Margin (``common.margin``): the model against the best baseline, **the best chosen on validation**.

- ``auroc_margin(model_scores, baseline_scores, labels, val_auroc, subjects, n_boot, seed, what, labels_map)``:
  paired bootstrap CI of "model - best baseline" AUROC + ``baseline_chosen_on`` ("validation"; "test" only when a
  baseline has no validation AUROC) + ``baseline_val_auroc`` + ``verdict`` (one sentence).
- ``mean_margin(model_values, baseline_values, val_means, subjects, higher_is_better, n_boot, seed, what)``: the
  same for a per-item metric (PSNR, SSIM, MAE), mean difference (positive = model better) + ``verdict``.
- ``margin_summary(margin, metric) -> {best_baseline_<metric>, margin_<metric>, margin_<metric>_ci_lo/_hi,
  model_beats_best_baseline}``: the summary floats of an ``auroc_margin``.
- ``validation_values(baselines, val) -> {name: value} | None``: every baseline's finite validation value or None.

Tables (``common.tables``): ``summary_floats(summary)`` (values as floats), ``write_csv(path, rows, header)``
(atomic, ``%.6g``), ``print_summary(summary, title, footer)`` (rich table), ``print_baseline_costs(costs)``,
``console()``. ``report.json`` and ``metrics.csv`` are written by the skeleton (``protocols.base.write_report``).
"""

from .baselines import (
    HEALTHY_BASELINES,
    LABELS,
    MEAN_INTENSITY,
    MODEL,
    SHORT,
    HealthyBaseline,
    build_healthy_baselines,
    check_healthy_baselines,
    load_healthy_reference,
)
from .margin import auroc_margin, margin_summary, mean_margin, validation_values
from .tables import console, print_baseline_costs, print_summary, summary_floats, write_csv

__all__ = [
    "HEALTHY_BASELINES",
    "LABELS",
    "MEAN_INTENSITY",
    "MODEL",
    "SHORT",
    "HealthyBaseline",
    "auroc_margin",
    "build_healthy_baselines",
    "check_healthy_baselines",
    "console",
    "load_healthy_reference",
    "margin_summary",
    "mean_margin",
    "print_baseline_costs",
    "print_summary",
    "summary_floats",
    "validation_values",
    "write_csv",
]
