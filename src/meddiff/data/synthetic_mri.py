"""Deprecated: moved to meddiff.data.synthetic.mri; kept for one release."""

from meddiff.data.synthetic.mri import (
    CLASS_DIRS,
    CLASS_SEVERITY,
    LABEL_NAMES,
    generate_volume,
    write_synthetic_adni,
)

__all__ = ["CLASS_DIRS", "CLASS_SEVERITY", "LABEL_NAMES", "generate_volume", "write_synthetic_adni"]
