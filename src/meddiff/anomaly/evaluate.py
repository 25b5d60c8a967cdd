"""Deprecated: moved to meddiff.protocols.anomaly; kept for one release."""

from meddiff.protocols.anomaly import EvalOptions, evaluate_anomaly_detection

__all__ = ["EvalOptions", "evaluate_anomaly_detection"]
