"""The README's "After `make demo`" block works as written: every ``meddiff-*`` line of its bash block runs through
the venv's console scripts, with tiny overrides appended (a tiny UNet, few images, one epoch).

As after ``make demo``, the first plain demo training writes ``logs/demo/latest`` (its own line, plus
``hydra.run.dir=logs/demo/latest``), which the resume / eval / compare / predict lines then read; ``other/run`` is
the debug run's dir and ``scans/`` a folder of a few PNGs. Lines this machine cannot run in seconds (a GPU, four DDP
processes, a sweep, an Optuna study, a wandb run) are composed with their overrides instead (sweeps at their first
value): a key the configs do not know, or a preset that does not exist, still fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's console scripts (meddiff-train, meddiff-eval, ...)
COMPOSE_ONLY = ("trainer=gpu", "trainer.devices=4", "-m", "logger=wandb")


def readme_commands() -> list[list[str]]:
    """The ``meddiff-*`` command lines of the first bash block under the README's "After `make demo`" heading,
    split like a shell would, without trailing comments."""
    text = (REPO / "README.md").read_text()
    section = text.split("## After `make demo`", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip().startswith("meddiff-")]


def _tiny(args: list[str], fast: list[str]) -> list[str]:
    """The ``fast`` overrides for the keys the line does not set itself (a key given twice is a Hydra error)."""
    given = {a.split("=", 1)[0] for a in args if "=" in a}
    return [a for a in fast if a.split("=", 1)[0] not in given]


def _first_values(args: list[str]) -> list[str]:
    """A sweep's overrides at their first value (``lr=1e-4,3e-4`` -> ``lr=1e-4``); ``-m`` dropped."""
    out = []
    for a in args:
        if a == "-m":
            continue
        key, _, value = a.partition("=")
        out.append(f"{key}={value.split(',')[0]}" if "," in value and not value.startswith("[") else a)
    return out


def _entry_point(name: str) -> list[str]:
    """The venv's console script ``name``; when the venv was installed before that script existed, what it would
    run: the ``module:function`` pyproject.toml declares for it (a name pyproject does not declare fails)."""
    if (BIN / name).is_file():
        return [str(BIN / name)]
    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][name]
    module, func = target.split(":")
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"]


def _compose(args: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from meddiff.runs.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=_first_values(args), return_hydra_config=True)
    OmegaConf.to_container(cfg.model, resolve=True)  # the model's interpolations resolve
    assert cfg.trainer and cfg.data


def test_every_command_after_make_demo_runs(tmp_path, fast):
    commands = readme_commands()
    names = [c[0] for c in commands]
    assert {"meddiff-train", "meddiff-eval", "meddiff-compare", "meddiff-predict"} <= set(names), names
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    scans = tmp_path / "scans"
    scans.mkdir()
    import numpy as np
    from PIL import Image

    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((28, 28)) * 255).astype(np.uint8)).save(scans / f"s{i}.png")
    latest_made = False
    ran, composed = [], []
    for args in commands:
        name, rest = args[0], args[1:]
        if name == "meddiff-train" and any(a in COMPOSE_ONLY for a in rest):
            _compose([*rest, *_tiny(rest, fast)])
            composed.append(" ".join(args))
            continue
        if name == "meddiff-train" and "--help" not in rest and not any(a.startswith("resume=") for a in rest):
            rest = [*rest, *_tiny(rest, fast), "print_config=false"]
            if not latest_made and not any(a.startswith("debug=") for a in rest):
                rest.append("hydra.run.dir=logs/demo/latest")  # where `make demo` leaves its run
                latest_made = True
        if name == "meddiff-compare":
            others = sorted((tmp_path / "logs" / "debug" / "runs").iterdir())
            rest = [str(others[-1]) if a == "other/run" else a for a in rest]
        if name == "meddiff-predict":
            rest = [*rest, f"output={tmp_path / 'predicted'}"]
        proc = subprocess.run([*_entry_point(name), *rest], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        ran.append(" ".join(args))
    assert latest_made and (tmp_path / "logs" / "demo" / "latest" / "evals").is_dir()  # the eval landed beside it
    assert list((tmp_path / "predicted").glob("*.csv"))
    assert len(ran) + len(composed) == len(commands) and len(ran) >= 6, (ran, composed)
