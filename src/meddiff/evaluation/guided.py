"""Deprecated: moved to meddiff.protocols.guided (volume loading: meddiff.data.modules.adni.volumes); kept for one release."""

from meddiff.data.modules.adni.volumes import VolumeSource, input_volumes
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
