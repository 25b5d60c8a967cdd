"""Deprecated: moved to meddiff.protocols.ct_report; kept for one release."""

from meddiff.protocols.ct_report import (
    METHOD_LABELS,
    overlay_error,
    overlay_segmentation,
    per_subtype_detection,
    pick_example_rows,
    print_subtype_table,
    save_ct_segmentation,
    save_subtype_auroc,
    subtype_summary,
    write_ct_outputs,
)

__all__ = [
    "METHOD_LABELS",
    "overlay_error",
    "overlay_segmentation",
    "per_subtype_detection",
    "pick_example_rows",
    "print_subtype_table",
    "save_ct_segmentation",
    "save_subtype_auroc",
    "subtype_summary",
    "write_ct_outputs",
]
