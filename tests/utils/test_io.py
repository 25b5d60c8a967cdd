"""meddiff.utils.io: stale temporary files of dead writers are removed, a live writer's never."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from meddiff.utils.io import atomic_write, pid_alive, remove_stale_tmp, tmp_owner_pid, tmp_path_for


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def test_tmp_names_carry_the_writer_pid(tmp_path):
    tmp = tmp_path_for(tmp_path / "data.v1.h5")
    assert tmp.parent == tmp_path and tmp.name.startswith(".data.v1.h5.") and tmp.name.endswith(".tmp")
    assert tmp_owner_pid(tmp) == os.getpid()
    for other in ("data.h5", ".data.h5.tmp", ".x.tmp999", ".x.12.ab.tmp.bak", ".x.notapid.abc.tmp"):
        assert tmp_owner_pid(tmp_path / other) is None, other
    assert pid_alive(os.getpid()) and pid_alive(1)


def test_remove_stale_tmp_keeps_live_writers_and_other_files(tmp_path, caplog):
    dead = _dead_pid()
    stale = tmp_path / f".big.h5.{dead}.k2j_9xq1.tmp"
    stale.write_bytes(b"x" * 1000)
    mine = tmp_path_for(tmp_path / "report.json")  # this process is alive: a write in progress
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".ckpt.{sleeper.pid}.abcdefgh.tmp"  # another live process
        theirs.write_bytes(b"partial")
        keep = [tmp_path / "big.h5", tmp_path / ".hidden", tmp_path / ".x.tmp999", tmp_path / f".a.{dead}.b.tmp.x"]
        for p in keep:
            p.write_text("keep me")
        sub = tmp_path / "sub"
        sub.mkdir()
        nested = sub / f".n.npy.{dead}.abc.tmp"
        nested.write_bytes(b"n")
        with caplog.at_level(logging.INFO, logger="meddiff.utils.io"):
            removed = remove_stale_tmp(tmp_path)
        assert removed == [stale] and not stale.exists()
        assert mine.exists() and theirs.exists() and all(p.exists() for p in keep)
        assert nested.exists()  # not recursive by default
        assert any("1 stale temporary file" in r.getMessage() and str(stale) in r.getMessage() for r in caplog.records)
        assert remove_stale_tmp(tmp_path, recursive=True) == [nested] and not nested.exists()
        # once the writer dies, its file is stale too
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
        assert remove_stale_tmp(tmp_path) == [theirs]
        assert mine.exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    assert remove_stale_tmp(tmp_path / "missing") == []


def test_a_killed_atomic_writer_leaves_a_tmp_that_the_next_start_removes(tmp_path):
    """kill -9 in the middle of atomic_write: the target never appears, the temporary stays until cleanup."""
    target = tmp_path / "out.bin"
    code = (
        "import sys, time\n"
        "from meddiff.utils.io import atomic_write\n"
        "def slow(p):\n"
        "    open(p, 'wb').write(b'half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        f"atomic_write({str(target)!r}, slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.bin.")]
        assert len(left) == 1 and tmp_owner_pid(left[0]) == proc.pid
        assert remove_stale_tmp(tmp_path) == []  # the writer is alive: its file stays
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert not target.exists() and left[0].exists()
    assert remove_stale_tmp(tmp_path) == left and list(tmp_path.iterdir()) == []
    atomic_write(target, lambda p: open(p, "wb").write(b"ok"))
    assert target.read_bytes() == b"ok" and remove_stale_tmp(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="pid liveness via os.kill")
def test_pid_alive_of_an_exited_process_is_false():
    assert not pid_alive(_dead_pid())
    t0 = time.time()
    assert pid_alive(os.getppid()) and time.time() - t0 < 1
