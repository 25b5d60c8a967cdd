"""Deprecated: moved to meddiff.protocols.guided (volume loading: meddiff.data.adni_slices); kept for one release."""

from meddiff.data.adni_slices import VolumeSource, input_volumes
from meddiff.data.preprocess.mri_slices import VolumeData
from meddiff.protocols.guided import (
    REDUCTIONS,
    GuidedEvalOptions,
    MetricSkippedWarning,
    VolumeResult,
    choose_on_validation,
    classification,
    reduce_slices,
    run,
    translate_many,
    translate_volume,
)

__all__ = [
    "REDUCTIONS",
    "GuidedEvalOptions",
    "MetricSkippedWarning",
    "VolumeData",
    "VolumeResult",
    "VolumeSource",
    "choose_on_validation",
    "classification",
    "input_volumes",
    "reduce_slices",
    "run",
    "translate_many",
    "translate_volume",
]
