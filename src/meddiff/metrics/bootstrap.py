"""Bootstrap resampling shared by the detection and paired metrics (``meddiff.metrics.detection``,
``meddiff.metrics.paired``): the argument checks, the replicate draws in memory-bounded blocks, and the percentile
interval.

Every bootstrap of the package draws through :func:`resample_blocks`, so one seed gives one stream of draws: a
replicate resamples each stratum of units (all units, or positives and negatives, or kinds of subjects) with
replacement to its own size, strata in the order given; blocks of replicates are drawn one after the other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from meddiff.errors import ConfigError

BLOCK_ELEMENTS = 4_000_000  # numbers held per block of replicates (memory bound)


def check_boot_args(n_boot: Any, ci: Any, minimum: int = 0) -> None:
    """``ConfigError`` unless ``n_boot`` is an integer ``>= minimum`` and ``ci`` is in ``(0, 1)``."""
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < minimum:
        hint = "e.g. 1000; 0 disables the CI" if minimum == 0 else "e.g. 1000"
        raise ConfigError(f"n_boot={n_boot!r} must be an integer >= {minimum} ({hint}).")
    if not 0.0 < float(ci) < 1.0:
        raise ConfigError(f"ci={ci} must be in (0, 1), e.g. 0.95.")


def block_rows(n_columns: int) -> int:
    """Replicates per block so that a block of ``[rows, n_columns]`` numbers stays within ``BLOCK_ELEMENTS``."""
    return max(1, BLOCK_ELEMENTS // n_columns)


def resample_blocks(strata: Sequence[np.ndarray], n_boot: int, seed: int, block: int) -> Iterator[np.ndarray]:
    """Bootstrap draws, ``block`` replicates at a time (the last block holds the rest).

    Args:
        strata: index arrays ``[n_k]`` of units; each is resampled with replacement to its own size.
        n_boot: replicates in all; seed: seed of the one ``np.random.default_rng`` behind every draw.
        block: replicates per block (e.g. ``block_rows(n)``).

    Yields:
        ``[r, sum(n_k)]`` int64 drawn units (stratum after stratum in each row), ``sum(r) = n_boot``.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, block):
        r = min(block, n_boot - start)
        yield np.concatenate([idx[rng.integers(0, idx.size, size=(r, idx.size))] for idx in strata], axis=1)


def percentile_interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval ``(lo, hi)`` of bootstrap replicates ``[R]`` at level ``ci`` in ``(0, 1)``."""
    alpha = (1.0 - float(ci)) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
