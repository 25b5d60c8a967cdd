"""Deprecated: moved to meddiff.data.formats.nifti (reading, normalisation) and meddiff.data.synthetic.mri
(``write_synthetic_volumes``); kept for one release."""

from meddiff.data.formats.nifti import (
    NIFTI_SUFFIXES,
    FrameWarning,
    foreground_percentiles,
    is_nifti,
    load_volume,
    robust_normalise,
)
from meddiff.data.synthetic.mri import write_synthetic_volumes

__all__ = [
    "NIFTI_SUFFIXES",
    "FrameWarning",
    "foreground_percentiles",
    "is_nifti",
    "load_volume",
    "robust_normalise",
    "write_synthetic_volumes",
]
