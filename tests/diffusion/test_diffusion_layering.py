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


#: the parts of the run wing a model may read: how checkpoints are stored and which one a run selected
CHECKPOINT_READERS = ("meddiff.runs.checkpoint_io", "meddiff.runs.checkpoint_selection")


def test_frozen_first_stage_loader_knows_no_run_bookkeeping():
    """It reads a stored checkpoint (the run wing's checkpoint readers) and nothing of a run's bookkeeping (resume,
    status, loggers, Hydra)."""
    path = Path(meddiff.models.__file__).parent / "frozen.py"
    bad = {m for m in _imports(path) if m.startswith(("meddiff.runs", "hydra")) and not m.startswith(CHECKPOINT_READERS)}
    assert not bad, bad


def test_the_checkpoint_readers_know_no_models():
    """models -> runs.checkpoint_* is an arrow down only while those readers import nothing of models/ or above."""
    runs = Path(meddiff.models.__file__).parents[1] / "runs"
    for name in ("checkpoint_io.py", "checkpoint_selection.py"):
        up = {m for m in _imports(runs / name) if m.startswith(("meddiff.models", "meddiff.protocols", "meddiff.train",
                                                                  "meddiff.eval", "meddiff.callbacks"))}
        assert not up, (name, up)
