"""Sweeps of runs: the multirun callback, the Optuna study storage, the summary table (see :mod:`meddiff.runs`)."""
