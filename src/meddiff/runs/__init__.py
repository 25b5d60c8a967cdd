"""Sweeps and comparing runs.

- ``status``: every train job records its state in ``<run_dir>/status.json`` (running / ok / failed + first error
  line, wall time, best validation score, checkpoints, Optuna trial).
- ``identity``: what a run is called (wandb name ``<experiment>/<overrides>``, group ``<experiment>/<sweep id>``,
  tags) and which keys a sweep varies (``<sweep_dir>/sweep.json``).
- ``job``: the wrapper around one train job (status, failures that do not stop a multirun, the Optuna objective).
- ``run_summary`` / ``table``: read run dirs into rows; the summary table (CSV, Markdown, PNG, rich) and config diff.
- ``callback``: the Hydra callback that writes ``summary.*`` and ``optimization_results.yaml`` after a multirun.
- ``optuna_storage``: the SQLite study storage (``<sweep_dir>/optuna.db``) that survives a killed sweep.
- ``loggers``: hparams, figures and checkpoint artifacts for wandb and TensorBoard.
"""
