"""Evaluation protocols other than anomaly detection (which lives in ``meddiff.anomaly.evaluate``)."""
