"""SLURM preemption under submitit (``launcher=submitit_slurm``): the job runs as submitit runs it (its
``_submit`` entry point, its signal handlers, SLURM's and submitit's environment variables), receives the signal
submitit asks SLURM to send (USR2 by default), writes ``last.ckpt`` at the next batch boundary, requeues itself with
``scontrol requeue`` (a stub on PATH records the call) and the requeued attempt continues to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

submitit = pytest.importorskip("submitit")

HERE = Path(__file__).resolve().parent


def _submit(folder: Path, run_dir: Path, job_id: str) -> None:
    from submitit.core.utils import DelayedSubmission, JobPaths

    sys.path.insert(0, str(HERE))
    try:
        import _submitit_job
    finally:
        sys.path.remove(str(HERE))
    DelayedSubmission(_submitit_job.train, str(run_dir), 3, 0.15).dump(JobPaths(folder, job_id=job_id).submitted_pickle)


def _env(tmp_path: Path, job_id: str, restarts: int) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    (bin_dir / "scontrol").chmod(0o755)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHONPATH": os.pathsep.join([src, str(HERE)]),
            "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
            "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": str(restarts)}


def test_submitit_preemption_checkpoints_requeues_and_continues(tmp_path):
    folder, run_dir, job_id = tmp_path / "submitit", tmp_path / "run", "4242"
    run_dir.mkdir()
    folder.mkdir()
    _submit(folder, run_dir, job_id)
    cmd = [sys.executable, "-m", "submitit.core._submit", str(folder)]
    err = open(tmp_path / "attempt1.err", "w")
    proc = subprocess.Popen(cmd, env=_env(tmp_path, job_id, 0), stdout=err, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while (not (run_dir / "step").is_file() or int((run_dir / "step").read_text() or 0) < 3) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    signalled_at = int((run_dir / "step").read_text())
    proc.send_signal(signal.SIGUSR2)  # what submitit asks SLURM to send before the limit (--signal=USR2@<delay>)
    while not (tmp_path / "scontrol.log").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", job_id], \
        (tmp_path / "attempt1.err").read_text()[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert signalled_at <= saved["global_step"] < 8  # the batch boundary after the signal, within epoch 0
    proc.kill()  # SLURM ends the attempt it requeued
    proc.wait()

    # the requeued attempt: the same submission, SLURM_RESTART_COUNT=1
    done = subprocess.run(cmd, env=_env(tmp_path, job_id, 1), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 24 and final["epoch"] >= 2
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", job_id]  # no second requeue
