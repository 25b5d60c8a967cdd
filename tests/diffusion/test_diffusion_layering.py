"""meddiff.diffusion is pure torch: it imports no Lightning and nothing of data, anomaly, models, protocols or the
run glue in utils (partial diffusion takes what it needs, e.g. whether the CPU has native bf16, as arguments)."""

from __future__ import annotations

import ast
from pathlib import Path

import meddiff.diffusion
import meddiff.models

UPWARD = ("lightning", "pytorch_lightning", "hydra", "meddiff.data", "meddiff.anomaly", "meddiff.models",
          "meddiff.protocols", "meddiff.utils", "meddiff.runs", "meddiff.sweeps", "meddiff.callbacks")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_diffusion_imports_nothing_above_it():
    files = sorted(Path(meddiff.diffusion.__file__).parent.glob("*.py"))
    bad = {p.name: sorted(m for m in _imports(p) if m.startswith(UPWARD)) for p in files}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_frozen_first_stage_loader_knows_no_run_bookkeeping():
    path = Path(meddiff.models.__file__).parent / "frozen.py"
    assert not {m for m in _imports(path) if m.startswith(("meddiff.utils.hydra_utils", "meddiff.runs", "hydra"))}
