"""``trainer=ddp`` keeps an experiment's precision, and epoch-level values logged by the base model are reduced over
the DDP processes (``sync_dist=True``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from meddiff.runs.cli_help import CONFIG_DIR

DEMOS = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("demo*.yaml"))


def _precision(*overrides: str) -> str:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return str(cfg.trainer.precision)


@pytest.mark.parametrize("experiment", DEMOS)
def test_ddp_keeps_the_experiments_precision(experiment):
    alone = _precision(f"experiment={experiment}")
    assert alone == "auto"  # every demo trains with trainer=cpu's auto (bf16-mixed where native)
    assert _precision(f"experiment={experiment}", "trainer=ddp") == alone
    # and an explicit choice still wins
    assert _precision(f"experiment={experiment}", "trainer=ddp", "trainer.precision=32-true") == "32-true"


def _epoch_log_calls(path: Path) -> list[ast.Call]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("log",
                                                                                                       "log_dict"):
            kw = {k.arg: k.value for k in node.keywords}
            if isinstance(kw.get("on_epoch"), ast.Constant) and kw["on_epoch"].value is True:
                calls.append(node)
    return calls


def test_epoch_level_values_of_the_base_model_are_synced_over_processes():
    import meddiff.models.base as base

    calls = _epoch_log_calls(Path(base.__file__))
    assert calls, "models/base.py logs epoch-level values"
    for call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        name = ast.unparse(call.args[0]) if call.args else "?"
        assert isinstance(kw.get("sync_dist"), ast.Constant) and kw["sync_dist"].value is True, \
            f"models/base.py line {call.lineno}: {name} is logged on_epoch without sync_dist=True"
