"""The OmegaConf resolvers meddiff's configs use, registered explicitly by :func:`register_resolvers`.

Both entry points (``meddiff.train.main``, ``meddiff.eval.main``) call it before Hydra composes a config; so does
anything that composes the project's configs itself (tests, notebooks). Registering is idempotent.

- ``${meddiff.run_dir:<base>[,unique]}``: a fresh run dir under ``<base>`` (:func:`meddiff.runs.run_dir.resolve_run_dir`);
- ``${meddiff.add:a,b}`` = a + b (integers): a resumed Optuna sweep numbers its new job dirs after the trials already
  in the study (``hydra.sweep.subdir='${meddiff.add:${hydra.job.num},<trials so far>}'``), so job dir == trial
  number and no earlier job dir is overwritten;
- ``${meddiff.help:train}``: the ``--help`` page (:mod:`meddiff.runs.cli_help`).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from meddiff.runs.cli_help import HELP_RESOLVER, help_text
from meddiff.runs.run_dir import RESOLVER as RUN_DIR
from meddiff.runs.run_dir import resolve_run_dir

ADD = "meddiff.add"


def _add(a: str, b: str) -> int:
    return int(a) + int(b)


def register_resolvers() -> None:
    """Register ``meddiff.run_dir``, ``meddiff.add`` and ``meddiff.help`` (idempotent)."""
    if not OmegaConf.has_resolver(RUN_DIR):
        # cached: Hydra may resolve run.dir more than once, and it must name one folder
        OmegaConf.register_new_resolver(RUN_DIR, resolve_run_dir, use_cache=True)
    if not OmegaConf.has_resolver(ADD):
        OmegaConf.register_new_resolver(ADD, _add)
    if not OmegaConf.has_resolver(HELP_RESOLVER):
        OmegaConf.register_new_resolver(HELP_RESOLVER, help_text)
