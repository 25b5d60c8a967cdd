"""Deprecated: moved to meddiff.protocols.denoise; kept for one release."""

from meddiff.protocols.denoise import (
    METRICS,
    DenoiseData,
    DenoiseEvalOptions,
    SupervisedOptions,
    nlm_denoise,
    print_report,
    run,
    select_slices,
    trained_noise_levels,
)

__all__ = [
    "METRICS",
    "DenoiseData",
    "DenoiseEvalOptions",
    "SupervisedOptions",
    "nlm_denoise",
    "print_report",
    "run",
    "select_slices",
    "trained_noise_levels",
]
