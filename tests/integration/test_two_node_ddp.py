"""Multi-node DDP on one machine: two torchrun agents (``--nnodes 2 --nproc-per-node 1``, c10d rendezvous on
127.0.0.1, gloo) each start one process of a ``num_nodes=2`` Lightning training; it trains, writes ``last.ckpt``, and a
second pair of agents resumes it to the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
SRC = Path(__file__).resolve().parents[2] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(run_dir: Path, epochs: int, mode: str, tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)]), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}  # not a SLURM job: torchelastic's env
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"meddiff-{mode}",
           "--max-restarts", "0", str(HERE / "_two_node_job.py"), str(run_dir), str(epochs), mode]
    logs = [open(tmp_path / f"{mode}-node{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        codes = [p.wait(timeout=180) for p in procs]  # two torch imports per node on a loaded CI machine
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = "\n".join((tmp_path / f"{mode}-node{i}.log").read_text()[-2000:] for i in range(2))
    assert codes == [0, 0], out


def test_two_nodes_train_checkpoint_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _two_nodes(run_dir, 1, "fresh", tmp_path)
    done = sorted(p.name for p in run_dir.glob("done-*"))
    assert done == ["done-rank0-of-2-node0", "done-rank1-of-2-node1"]  # one process on each of 2 nodes
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 4 and first["epoch"] == 0  # 16 samples / 2 ranks / batch 2

    for p in run_dir.glob("done-*"):
        p.unlink()
    _two_nodes(run_dir, 2, "resume", tmp_path)
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 8 and final["epoch"] == 1
    assert sorted(p.read_text() for p in run_dir.glob("done-*")) == ["8", "8"]
