"""The run machinery: what makes a run dir one you can trust, and sweeps of runs.

One run:
- ``run_dir``: unique run dir names, the ``.lock`` of a live run, writability checks;
- ``resolvers``: ``register_resolvers()`` (``${meddiff.run_dir:...}``, ``${meddiff.add:...}``, ``${meddiff.help:...}``),
  called explicitly by both entry points;
- ``resume``: ``resume=<run_dir>`` (replayed overrides, snapshots, the config diff, what a run dir may not replay);
- ``checkpoint_io``: weights-only loading, atomic verified saving, the stored config (trust-checked), weights-fit check;
- ``loop_state`` / ``rng``: Lightning loop-state and RNG state inside checkpoints, so a resume equals an
  uninterrupted run;
- ``memory_budget``: a training batch that cannot fit in memory is a clear error before anything is allocated;
- ``checkpoint_selection``: which checkpoint each selection rule picked; the one ``meddiff-train`` evaluates;
- ``status``: ``<run_dir>/status.json`` (running / ok / failed), written only by the lock holder;
- ``job``: one train job (lock, status, failures that do not stop a multirun, the Optuna objective);
- ``identity``: what a run is called (wandb name, group, tags) and which keys a sweep varies;
- ``loggers`` / ``csv_history`` / ``log_outputs``: the loggers (CSV history continued on resume, wandb id kept),
  hparams, figures and checkpoint artifacts;
- ``cli_help``: the ``--help`` pages.

Sweeps (``sweep/``): the Hydra callback (``summary.*``, ``optimization_results.yaml``, the outcome that makes a sweep
with a failed job exit non-zero), the Optuna SQLite storage, reading run dirs into the summary table.

The Lightning callbacks of a run live in :mod:`meddiff.callbacks`.
"""
