"""Run dirs: unique names, one live run per folder, clear errors for folders that cannot be written."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from meddiff.errors import ConfigError
from meddiff.runs import run_dir
from meddiff.runs.run_dir import RunLock, check_creatable, check_writable, run_name

_NAME = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}_[0-9a-f]{4}"


def _name_in_new_process(env: dict | None = None) -> str:
    code = "from meddiff.runs.run_dir import run_name; print(run_name())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})}).stdout.strip()


def test_names_are_sub_second_with_a_random_suffix_and_stable_within_a_process():
    assert re.fullmatch(_NAME, run_name()) and run_name() == run_name()
    env = {k: "" for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")}
    a, b = _name_in_new_process(env), _name_in_new_process(env)
    assert re.fullmatch(_NAME, a) and re.fullmatch(_NAME, b) and a != b


def test_slurm_jobs_get_the_job_id_so_a_requeued_job_finds_its_run():
    assert _name_in_new_process({"SLURM_JOB_ID": "77"}) == "slurm-77"
    assert _name_in_new_process({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}) == \
        "slurm-70_3"


def test_the_resolver_checks_the_base_folder(tmp_path):
    from meddiff.runs.resolvers import register_resolvers

    register_resolvers()  # explicit, as both entry points do (no import side effect)
    cfg = OmegaConf.create({"dir": f"${{meddiff.run_dir:{tmp_path}/logs/runs}}"})
    assert cfg.dir == f"{tmp_path}/logs/runs/{run_name()}"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = OmegaConf.create({"dir": f"${{meddiff.run_dir:{blocker}/runs}}"})
    with pytest.raises(Exception, match=f"{blocker}.*is a file"):
        _ = bad.dir


def test_writability_errors_name_the_folder(tmp_path, monkeypatch):
    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"run dir {blocker}/sub cannot be created or written"):
        check_writable(blocker / "sub")
    with pytest.raises(ConfigError, match=f"{blocker} is a file"):
        check_creatable(blocker / "sub" / "deeper")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_dir.tempfile, "mkstemp", no_space)
    with pytest.raises(ConfigError, match=f"checkpoint folder {tmp_path} .*No space left"):
        check_writable(tmp_path, "checkpoint folder")


def test_a_live_lock_names_its_pid_and_a_stale_one_is_taken_over(tmp_path, caplog):
    with RunLock(tmp_path) as lock:
        assert (tmp_path / ".lock").read_text().split()[:2] == [str(os.getpid()), socket.gethostname()]
        RunLock(tmp_path).check()  # our own lock
        assert lock.held
    assert not (tmp_path / ".lock").exists()

    live = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / ".lock").write_text(f"{live.pid} {socket.gethostname()} -\n")
        with pytest.raises(ConfigError, match=f"in use by another run \\(process {live.pid} on"):
            RunLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()
    (tmp_path / ".lock").write_text(f"{live.pid} {socket.gethostname()} -\n")  # now a dead process
    with caplog.at_level("WARNING"):
        lock = RunLock(tmp_path).acquire()
    assert "stale lock" in caplog.text and lock.held
    lock.release()

    (tmp_path / ".lock").write_text("1234 some-other-host -\n")  # liveness cannot be checked: refuse
    with pytest.raises(ConfigError, match="process 1234 on some-other-host"):
        RunLock(tmp_path).acquire()


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_attempt(tmp_path, monkeypatch):
    (tmp_path / ".lock").write_text("1234 node-a slurm-55\n")
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path).acquire()
    assert lock.held and (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    lock.release()


def test_resolvers_are_registered_explicitly_not_by_importing_the_run_wing():
    import subprocess
    import sys

    code = ("import meddiff.train, meddiff.eval; from omegaconf import OmegaConf; "
            "assert not OmegaConf.has_resolver('meddiff.run_dir'); "
            "from meddiff.runs.resolvers import register_resolvers; register_resolvers(); register_resolvers(); "
            "assert all(OmegaConf.has_resolver(r) for r in ('meddiff.run_dir', 'meddiff.add', 'meddiff.help'))")
    subprocess.run([sys.executable, "-c", code], check=True)
