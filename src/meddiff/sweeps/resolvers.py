"""OmegaConf resolvers the sweep machinery needs in every process that resolves a job's config.

``${meddiff.add:a,b}`` = a + b (integers): a resumed Optuna sweep numbers its new job dirs after the trials already
in the study (``hydra.sweep.subdir='${meddiff.add:${hydra.job.num},<trials so far>}'``), so job dir == trial number
and no earlier job dir is overwritten.
``${meddiff.help:train}``: the ``--help`` page (:mod:`meddiff.sweeps.cli_help`).

Both entry points import this module (through ``meddiff.utils.hydra_utils``), so the resolvers exist before Hydra
composes a config.
"""

from __future__ import annotations

from omegaconf import OmegaConf

ADD = "meddiff.add"


def register() -> None:
    if not OmegaConf.has_resolver(ADD):
        OmegaConf.register_new_resolver(ADD, lambda a, b: int(a) + int(b))
    from meddiff.sweeps import cli_help

    cli_help.register()  # ${meddiff.help:<job>}: the --help pages (hydra.help.template)


register()
