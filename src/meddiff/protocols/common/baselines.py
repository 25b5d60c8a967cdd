"""The healthy-set trivial baselines every protocol reports beside its model, built once.

Two baselines use healthy training images (``meddiff.metrics.baselines``): the nearest healthy training image
(pixel-space L2, inside the query's region when one is given) and the mean healthy image. Each acts as a
"reconstruction" ``[B, C, H, W]`` in ``[-1, 1]`` that the protocol scores with the model's own scorer, so a model is
compared with a lookup table under the same post-processing. The third trivial baseline, the mean intensity inside
the region, needs no reference: ``meddiff.metrics.baselines.mean_intensity_score``.

Report keys and labels are shared by all protocols (:data:`MEAN_INTENSITY`, :data:`HEALTHY_BASELINES`,
:data:`LABELS`, :data:`SHORT`), so reports and tables read the same everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.baselines import (
    MAX_REFERENCE,
    BaselineCost,
    MeanHealthy,
    NearestHealthy,
    reference_subset,
)

__all__ = ["HEALTHY_BASELINES", "LABELS", "MEAN_INTENSITY", "MODEL", "SHORT", "HealthyBaseline",
           "build_healthy_baselines", "check_healthy_baselines", "load_healthy_reference"]

#: report key of the model's entries
MODEL = "model"
#: report key of the mean-intensity baseline (image level)
MEAN_INTENSITY = "baseline_mean_intensity"
#: ``eval.baselines`` names -> report keys of the healthy-set baselines
HEALTHY_BASELINES = {"nearest_healthy": "baseline_nearest_healthy_image", "mean_healthy": "baseline_mean_healthy_image"}
#: report key -> short name used in ``summary`` keys
SHORT = {MEAN_INTENSITY: "mean_intensity", "baseline_nearest_healthy_image": "nearest_healthy",
         "baseline_mean_healthy_image": "mean_healthy"}
#: report key -> human label in tables, figures and verdicts
LABELS = {MODEL: "model", MEAN_INTENSITY: "mean intensity", "baseline_nearest_healthy_image": "nearest healthy image",
          "baseline_mean_healthy_image": "mean healthy image"}


def check_healthy_baselines(names: str | Iterable[str] | None, max_items: Any = MAX_REFERENCE,
                            max_items_key: str = "eval.baseline_max_items") -> list[str]:
    """The requested healthy-set baselines (``eval.baselines``), checked, in :data:`HEALTHY_BASELINES` order.

    Raises:
        ConfigError: an unknown name, or ``max_items`` (named ``max_items_key`` in the message) not a positive int.
    """
    listed = [] if names is None else [names] if isinstance(names, str) else [str(b) for b in names]
    unknown = [b for b in listed if b not in HEALTHY_BASELINES]
    if unknown:
        raise ConfigError(f"eval.baselines has unknown baseline(s) {unknown}; choose from {list(HEALTHY_BASELINES)} "
                          "([] = mean intensity only).")
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
        raise ConfigError(f"{max_items_key}={max_items!r} must be a positive integer (e.g. {MAX_REFERENCE}).")
    return [n for n in HEALTHY_BASELINES if n in listed]


@dataclass
class HealthyBaseline:
    """One healthy-set baseline: ``reconstruct(x [B, C, H, W], region [B, 1, H, W] | None) -> [B, C, H, W]`` on
    ``x``'s device, and its :class:`~meddiff.metrics.baselines.BaselineCost` (updated by every query)."""

    reconstruct: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    cost: BaselineCost


def load_healthy_reference(dataset: Any, max_items: int = MAX_REFERENCE, seed: int = 0,
                           image_key: str = "image") -> tuple[torch.Tensor, int, float]:
    """The healthy reference images of a map-style dataset (items ``{"image": [C, H, W], "label"?: 0/1}``).

    Loads only the fixed seeded subset ``reference_subset(len(dataset), max_items, seed)``; items with a non-zero
    ``label`` among them are skipped. Returns ``(images [N, C, H, W] float32, len(dataset), seconds spent)``.
    """
    t0 = time.perf_counter()
    images = []
    for i in reference_subset(len(dataset), max_items, seed).tolist():
        item = dataset[i]
        label = item.get("label") if isinstance(item, Mapping) else None
        if label is not None and int(torch.as_tensor(label).reshape(-1)[0]) != 0:
            continue  # an anomalous item: not a healthy reference
        images.append(torch.as_tensor(item[image_key] if isinstance(item, Mapping) else item).float())
    if not images:
        raise DataError(f"no healthy (label 0) item among the {min(len(dataset), max_items)} reference items of the "
                        "dataset; the healthy-set baselines need healthy training images (or set eval.baselines=[]).")
    return torch.stack(images), len(dataset), time.perf_counter() - t0


def build_healthy_baselines(
    reference: torch.Tensor,
    kinds: Sequence[str],
    device: torch.device | str | None = None,
    n_healthy_total: int | None = None,
    fit_seconds: float = 0.0,
) -> dict[str, HealthyBaseline]:
    """The healthy-set baselines ``kinds`` (names of :data:`HEALTHY_BASELINES`) over ``reference``.

    Args:
        reference: healthy images ``[N, C, H, W]`` in ``[-1, 1]`` (already the subset to scan).
        kinds: e.g. ``["nearest_healthy", "mean_healthy"]`` (from :func:`check_healthy_baselines`).
        device: where the reference lives and the queries run (default: ``reference``'s).
        n_healthy_total: healthy images available (the reference may be a subset); default ``N``.
        fit_seconds: what gathering ``reference`` cost, added to each baseline's cost.

    Returns:
        ``{report key: HealthyBaseline}`` in :data:`HEALTHY_BASELINES` order.
    """
    total = int(n_healthy_total if n_healthy_total is not None else reference.shape[0])
    out: dict[str, HealthyBaseline] = {}
    if "nearest_healthy" in kinds:
        nn_ = NearestHealthy(reference, n_healthy_total=total, device=device, fit_seconds=fit_seconds)
        out[HEALTHY_BASELINES["nearest_healthy"]] = HealthyBaseline(
            lambda x, region=None: nn_.reconstruct(x, region), nn_.cost)
    if "mean_healthy" in kinds:
        mh = MeanHealthy.from_images(reference)
        mh.mean = mh.mean.to(device if device is not None else reference.device)
        mh.cost.n_healthy_total = total
        mh.cost.fit_seconds += fit_seconds
        out[HEALTHY_BASELINES["mean_healthy"]] = HealthyBaseline(lambda x, region=None: mh.reconstruct(x), mh.cost)
    return out
