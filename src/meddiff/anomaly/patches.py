"""Deprecated: moved to meddiff.patches; kept for one release."""

from meddiff.patches import grid_starts, patch_masks

__all__ = ["grid_starts", "patch_masks"]
