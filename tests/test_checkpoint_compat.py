"""A checkpoint written before the issue-8 restructure still evaluates, to the same numbers.

tests/fixtures/demo_tiny_v0.1.ckpt was trained by meddiff 0.1.0 (commit 46fea74) on the tiny demo (2 digits, 64
training images, unet_tiny); its .expected.json holds the evaluation command and the summary it printed then.
The evaluation runs through the CLI in a subprocess, as a user would: the config stored in the checkpoint names
the classes (data/model targets), so moved classes must stay importable under the stored paths.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CKPT = FIXTURES / "demo_tiny_v0.1.ckpt"
EXPECTED = FIXTURES / "demo_tiny_v0.1.expected.json"
TOLERANCE = 1e-6  # absolute, per summary number


def summary_mismatches(got: dict[str, float], expected: dict[str, float], tol: float = TOLERANCE) -> list[str]:
    """Expected summary numbers that are missing from ``got`` or differ by more than ``tol``."""
    out = []
    for key, want in expected.items():
        if key not in got:
            out.append(f"{key}: missing (expected {want})")
        elif not abs(float(got[key]) - float(want)) <= tol:
            out.append(f"{key}: {got[key]!r} != {want!r}")
    return out


def eval_args(command: str, ckpt: Path) -> list[str]:
    """The stored command's arguments after ``-m meddiff.eval``, with ckpt_path made absolute."""
    words = shlex.split(command)
    args = words[words.index("meddiff.eval") + 1:]
    assert any(a.startswith("ckpt_path=") for a in args), command
    return [f"ckpt_path={ckpt}" if a.startswith("ckpt_path=") else a for a in args]


def test_summary_mismatches_catches_a_change() -> None:
    expected = {"image_auroc": 0.936, "pixel_dice": 0.92}
    assert summary_mismatches(dict(expected), expected) == []
    assert summary_mismatches({"image_auroc": 0.936 + 5e-7, "pixel_dice": 0.92}, expected) == []
    assert summary_mismatches({"image_auroc": 0.936 + 2e-6, "pixel_dice": 0.92}, expected)
    assert summary_mismatches({"image_auroc": 0.936}, expected) == ["pixel_dice: missing (expected 0.92)"]


def test_pre_restructure_checkpoint_evaluates_to_the_same_summary(tmp_path: Path) -> None:
    expected = json.loads(EXPECTED.read_text())
    run_dir = tmp_path / "run"
    env = {**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = [*eval_args(expected["command"], CKPT), f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "meddiff.eval", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"meddiff.eval {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    summary = json.loads((run_dir / "report.json").read_text())["summary"]
    mismatches = summary_mismatches(summary, expected["summary"])
    assert not mismatches, f"{CKPT.name} ({expected['written_by']}) now evaluates differently: {mismatches}"
