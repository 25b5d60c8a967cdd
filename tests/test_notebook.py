"""The walkthrough notebook runs top to bottom (it is documentation that must not rot), on both of its paths.

- No checkpoint (``MEDDIFF_WALKTHROUGH_CKPT=none``, as in CI without ``make demo``): a tiny model trained in seconds,
  labelled as an illustration, never as the method's performance.
- A checkpoint folder: the tiny 0.1 demo checkpoint under three names, the notebook must pick the one with the best
  validation score recorded in it (not the newest, not ``last.ckpt``).
Both report the model beside the three trivial baselines, settings chosen on validation, numbers on test.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from meddiff.runs.checkpoint_io import load_checkpoint, save_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
TINY_CKPT = ROOT / "tests" / "fixtures" / "demo_tiny_v0.1.ckpt"
METHODS = ("model", "mean intensity", "mean healthy image", "nearest healthy image")


def _execute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ckpt: str) -> str:
    """Run the notebook in ``tmp_path`` (its working dir) with ``MEDDIFF_WALKTHROUGH_CKPT=ckpt``; its text output."""
    monkeypatch.setenv("MEDDIFF_WALKTHROUGH_CKPT", ckpt)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _check_comparison(out: str, tmp_path: Path) -> None:
    assert "Chosen on validation" in out and "splits read: ['train', 'val']" in out
    table = out.split("image AUROC on the test split", 1)[1]
    for name in METHODS:
        assert f"\n  {name} " in table, f"no test AUROC line for {name!r}"
    assert "Reading:" in table
    assert (tmp_path / "walkthrough_grid.png").stat().st_size > 0


@pytest.mark.slow
def test_walkthrough_toy_path(tmp_path, monkeypatch):
    out = _execute(tmp_path, monkeypatch, "none")
    assert "TOY MODEL, FOR ILLUSTRATION ONLY" in out and "make demo" in out
    assert "the TOY model (illustration only, not the method's performance)" in out
    assert "Using the checkpoint" not in out
    _check_comparison(out, tmp_path)


def _with_score(src: dict, score: float) -> dict:
    """A copy of checkpoint ``src`` whose monitored ModelCheckpoint state records ``score``."""
    ckpt = dict(src)
    callbacks = {}
    for key, state in src["callbacks"].items():
        state = dict(state)
        if key.startswith("ModelCheckpoint") and state.get("monitor"):
            state["current_score"] = score
        callbacks[key] = state
    ckpt["callbacks"] = callbacks
    return ckpt


@pytest.mark.slow
def test_walkthrough_checkpoint_path_picks_the_best(tmp_path, monkeypatch):
    src = load_checkpoint(TINY_CKPT)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    # written in this order so the worst one is the newest: the choice must follow the score, not the time
    save_checkpoint_file(src, folder / "last.ckpt")
    save_checkpoint_file(_with_score(src, 0.80), folder / "epoch000-step10.ckpt")
    save_checkpoint_file(_with_score(src, 0.95), folder / "epoch003-step40.ckpt")
    save_checkpoint_file(_with_score(src, 0.60), folder / "epoch009-step90.ckpt")
    out = _execute(tmp_path, monkeypatch, str(tmp_path / "run"))
    assert f"Using the checkpoint {folder / 'epoch003-step40.ckpt'}" in out
    assert "TOY" not in out
    _check_comparison(out, tmp_path)
