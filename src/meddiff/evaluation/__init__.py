"""Deprecated: the protocols moved to :mod:`meddiff.protocols` (anomaly, denoise, guided, ct_report); these
module paths are kept for one release."""
