"""Runs you can trust, end to end (issue 9): kill -9 / SIGTERM / SIGUSR1 / SLURM requeue followed by a resume give
the run an uninterrupted one would have given; resume restores the run's own config for every model family; wandb
ids survive; locked, unwritable and foreign run dirs and checkpoints fail with clear errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

# conftest's FAST settings (tiny UNet, two digits, 64 training images) with batch 8: 8 steps per epoch, 4 epochs; a
# step checkpoint every 3 steps, a CSV row every step
LONG = ["experiment=demo", "net=unet_tiny", "data.digits=[0,1]", "data.val_fraction=0.05", "data.test_fraction=0.05",
        "data.max_train=64", "data.batch_size=8", "trainer.max_epochs=4", "trainer.log_every_n_steps=1",
        "checkpoint_every_n_steps=3", "evaluate=false"]
TOTAL_STEPS = 32


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(extra or {})}


def _start(args: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "meddiff.train", *args], cwd=cwd, env=_env(env),
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"))


def _logged_step(run_dir: Path) -> int:
    """The highest step in the run's CSV so far (-1 before the first row)."""
    try:
        with open(run_dir / "csv" / "metrics.csv", newline="") as fh:
            return max((int(float(r["step"])) for r in csv.DictReader(fh) if r.get("step")), default=-1)
    except (OSError, ValueError, KeyError):
        return -1


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, log: Path, timeout: float = 600) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before step {step}:\n"
                        f"{log.with_suffix('.err').read_text()[-3000:]}")
        seen = _logged_step(run_dir)
        if seen >= step:
            return seen
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def _ckpt(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]


def _loader_resumable() -> bool:
    """Whether shuffled training loaders keep their order across a resume (meddiff.data.resumable)."""
    from meddiff.data.base import dict_loader
    from meddiff.data.resumable import ResumableLoader

    return isinstance(dict_loader(torch.utils.data.TensorDataset(torch.zeros(4)), batch_size=2, shuffle=True, seed=0),
                      ResumableLoader)


def assert_same_run(resumed: Path, reference: Path, interrupted_at: int) -> None:
    """Global step, optimizer and EMA state, CSV history and weights of two runs match.

    Known limit: Lightning does not checkpoint its running epoch means, so after a mid-epoch resume the epoch mean
    of the interrupted epoch (``train/loss_epoch``) averages only the batches after the resume.
    """
    a, b = _ckpt(resumed), _ckpt(reference)
    assert a["global_step"] == b["global_step"] == TOTAL_STEPS
    assert int(a["state_dict"]["ema.num_updates"]) == int(b["state_dict"]["ema.num_updates"]) == TOTAL_STEPS
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert {int(s["step"]) for s in opt_a.values()} == {int(s["step"]) for s in opt_b.values()} == {TOTAL_STEPS}
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    # CSV history: every row of the uninterrupted run, in order, same steps and keys, values within tolerance
    ra, rb = _rows(resumed), _rows(reference)
    assert [(r["step"], sorted(r)) for r in ra] == [(r["step"], sorted(r)) for r in rb]
    assert len({r["step"] for r in ra if "train/loss_step" in r}) == TOTAL_STEPS
    assert _loader_resumable(), "meddiff.data.base.dict_loader must shuffle with ResumableLoader"
    for key in b["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-4, atol=1e-5, msg=key)
    for i in opt_b:
        torch.testing.assert_close(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"], rtol=1e-3, atol=1e-6)
    steps_per_epoch = TOTAL_STEPS // 4
    partial_epoch = str(interrupted_at // steps_per_epoch) if interrupted_at % steps_per_epoch else None
    for x, y in zip(ra, rb):
        for k in y:
            if k.endswith("_epoch") and y.get("epoch") == partial_epoch:
                continue
            assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-3, abs=1e-5), (k, x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of LONG."""
    root = tmp_path_factory.mktemp("reference")
    log = root / "ref"
    proc = _start([*LONG, f"hydra.run.dir={root / 'run'}"], root, log)
    assert proc.wait(timeout=900) == 0, log.with_suffix(".err").read_text()[-3000:]
    return root / "run"


def test_kill9_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    log = tmp_path / "killed"
    proc = _start([*LONG, f"hydra.run.dir={run_dir}"], tmp_path, log)
    _wait_for_step(proc, run_dir, 12, log)  # epoch 1 is steps 8..15: after the step-12 checkpoint, mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / ".lock").is_file()  # left behind by the killed run: a stale lock
    killed_at = _ckpt(run_dir)["global_step"]
    assert 0 < killed_at < TOTAL_STEPS

    proc = _start([f"resume={run_dir}"], tmp_path, tmp_path / "resumed")  # no other argument
    assert proc.wait(timeout=900) == 0, (tmp_path / "resumed.err").read_text()[-3000:]
    assert "stale lock" in (tmp_path / "resumed.err").read_text() + (run_dir / "train.log").read_text()
    assert not (run_dir / ".lock").exists()
    assert not list(run_dir.rglob("*.tmp"))
    assert (run_dir / "resume-1" / "resume_diff.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert_same_run(run_dir, reference, killed_at)


def test_sigusr1_writes_last_ckpt_and_sigterm_stops_with_a_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    log = tmp_path / "signalled"
    proc = _start([*LONG, "checkpoint_every_n_steps=null", f"hydra.run.dir={run_dir}"], tmp_path, log)
    _wait_for_step(proc, run_dir, 4, log)
    proc.send_signal(signal.SIGUSR1)  # "write last.ckpt now" (no step checkpoints in this run)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert 4 <= _ckpt(run_dir)["global_step"] < 8  # within epoch 0, written at a batch boundary
    _wait_for_step(proc, run_dir, 20, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM  # a preempted run does not exit 0
    stopped = _ckpt(run_dir)
    assert 20 <= stopped["global_step"] < TOTAL_STEPS
    assert int(stopped["state_dict"]["ema.num_updates"]) == stopped["global_step"]
    assert "resume=" in (log.with_suffix(".err").read_text() + (run_dir / "train.log").read_text())

    proc = _start([f"resume={run_dir}"], tmp_path, tmp_path / "resumed")
    assert proc.wait(timeout=900) == 0, (tmp_path / "resumed.err").read_text()[-3000:]
    assert_same_run(run_dir, reference, stopped["global_step"])


def test_slurm_preemption_checkpoints_requeues_and_the_requeued_job_continues(tmp_path, reference):
    # A SLURM job as Lightning's SLURMEnvironment sees it, with a fake `scontrol` that records the requeue
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    logs = tmp_path / "logs"
    args = [*LONG, "checkpoint_every_n_steps=null", f"paths.log_dir={logs}"]
    run_dir = logs / "train" / "runs" / "slurm-4242"  # the same folder on every attempt of the job
    log = tmp_path / "attempt1"
    proc = _start(args, tmp_path, log, env=slurm)
    signalled_at = _wait_for_step(proc, run_dir, 10, log)
    proc.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit (--signal=USR1@90)
    deadline = time.monotonic() + 300
    while not (tmp_path / "scontrol.log").is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved = _ckpt(run_dir)  # written at the batch boundary after the signal, before the requeue
    assert signalled_at <= saved["global_step"] < 16
    assert int(saved["state_dict"]["ema.num_updates"]) == saved["global_step"]
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning's mid-step save is not used
    proc.send_signal(signal.SIGKILL)  # the time limit
    proc.wait()

    proc = _start(args, tmp_path, tmp_path / "attempt2", env={**slurm, "SLURM_RESTART_COUNT": "1"})  # same command
    assert proc.wait(timeout=900) == 0, (tmp_path / "attempt2.err").read_text()[-3000:]
    assert "Requeued SLURM job: continuing" in (run_dir / "train.log").read_text()
    assert [p.name for p in logs.glob("train/runs/*")] == ["slurm-4242"]
    assert_same_run(run_dir, reference, saved["global_step"])


def test_wandb_run_id_is_real_and_reused_on_resume(run, tmp_path, fast):
    run_dir = tmp_path / "run"
    run("meddiff.train", *fast, "logger=wandb", "evaluate=false", f"hydra.run.dir={run_dir}",
        env={"WANDB_API_KEY": ""})
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert run_id and run_id != "None" and [p.name.rsplit("-", 1)[-1] for p in offline] == [run_id]
    run("meddiff.train", f"resume={run_dir}", "trainer.max_epochs=2", env={"WANDB_API_KEY": ""})
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[-1] for p in offline} == {run_id}


DENOISE = ["experiment=demo_denoise", "data.path=data/tiny_p16.h5", "data.synthetic_volumes=4",
           "data.synthetic_shape=[32,32,4]", "data.image_size=16", "data.stride=16", "data.val_fraction=0.25",
           "data.test_fraction=0.25", "data.batch_size=16", "net.channels=[8,16]", "net.attention_levels=[false,false]",
           "net.norm_num_groups=8", "net.num_head_channels=8", "schedule.num_train_timesteps=20",
           "schedule.beta_start=0.005", "schedule.beta_end=0.4", "model.sampling.steps=5", "model.val_sampling.steps=2",
           "trainer.max_epochs=1", "evaluate=false"]
GUIDED = ["experiment=demo_adni", "data.synthetic_n_per_class=2", "data.synthetic_shape=[24,24,24]",
          "data.image_size=16", "data.val_fraction=0.2", "data.test_fraction=0.4", "net.channels=[8,16]",
          "net.attention_levels=[false,false]", "net.norm_num_groups=8", "net.num_head_channels=8",
          "trainer.max_epochs=1", "model.sampling.t_start=100", "model.sampling.steps=2",
          "model.val_batches=1", "logger=csv", "evaluate=false"]


@pytest.mark.parametrize("args", [DENOISE, GUIDED], ids=["conditional", "guided"])
def test_resume_restores_the_runs_own_config_for_every_family(run, tmp_path, args):
    run_dir = tmp_path / "run"
    run("meddiff.train", *args, f"hydra.run.dir={run_dir}")
    first = _ckpt(run_dir)
    run("meddiff.train", f"resume={run_dir}", "trainer.max_epochs=2")
    second = _ckpt(run_dir)
    assert second["global_step"] == 2 * first["global_step"]
    assert second["meddiff_config"]["model"] == first["meddiff_config"]["model"]  # not the default config
    diff = (run_dir / "resume-1" / "resume_diff.yaml").read_text()
    assert "trainer.max_epochs" in diff and "model." not in diff


def _fails(args: list[str], cwd: Path, module: str = "meddiff.train", env: dict | None = None,
           timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(env), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stdout + proc.stderr


def test_a_second_run_into_a_live_run_dir_fails_fast_naming_the_holder(tmp_path, fast):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / ".lock").write_text(f"{holder.pid} {os.uname().nodename} -\n")
        start = time.monotonic()
        out = _fails([*fast, f"hydra.run.dir={run_dir}"], tmp_path)
        assert f"process {holder.pid}" in out and time.monotonic() - start < 60
        out = _fails([f"resume={run_dir}"], tmp_path)  # resume too (no .hydra: not a run) - still a clear error
        assert str(run_dir) in out
    finally:
        holder.kill()


def test_unwritable_run_dirs_and_checkpoint_folders_are_clear_errors(tmp_path, fast):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = _fails([*fast, f"hydra.run.dir={blocker}/run"], tmp_path)
    assert f"{blocker}" in out and "cannot be created" in out
    out = _fails([*fast, f"paths.log_dir={blocker}/logs"], tmp_path)
    assert f"{blocker}" in out and "cannot be created" in out
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")  # as root, permissions cannot make a folder unwritable
    out = _fails([*fast, f"hydra.run.dir={run_dir}"], tmp_path)
    assert f"checkpoint folder {run_dir / 'checkpoints'}" in out


def test_a_failed_run_writes_its_traceback_into_train_log(tmp_path, fast):
    run_dir = tmp_path / "run"
    out = _fails([*fast, "model.patch_size=14", "model.patch_stride=0", f"hydra.run.dir={run_dir}"], tmp_path)
    assert "model.patch_stride=0" in out
    text = (run_dir / "train.log").read_text()
    assert "Traceback" in text and "ConfigError" in text and "model.patch_stride=0" in text


def test_a_run_dir_holding_a_run_is_not_overwritten(tmp_path, fast):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"precious")
    out = _fails([*fast, f"hydra.run.dir={run_dir}"], tmp_path)
    assert "already holds a run" in out and f"resume={run_dir}" in out
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"precious"


def test_default_run_dirs_are_unique(tmp_path, fast):
    logs = tmp_path / "logs"
    procs = [subprocess.Popen([sys.executable, "-m", "meddiff.train", *fast, "debug=fast_dev_run",
                               f"paths.log_dir={logs}"], cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    names = sorted(p.name for p in (logs / "debug" / "runs").iterdir())
    assert len(names) == 2 and names[0] != names[1]


def _evil_checkpoint(tmp_path: Path, marker: Path, kind: str) -> Path:
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "demo_tiny_v0.1.ckpt"
    ckpt = torch.load(fixture, map_location="cpu", weights_only=False)  # our own fixture: trusted
    if kind == "reduce":
        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        ckpt["payload"] = Payload()
    else:
        cfg = dict(ckpt["meddiff_config"])
        cfg["model"] = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
        ckpt["meddiff_config"] = cfg
    path = tmp_path / f"evil_{kind}.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("kind", ["reduce", "target"])
def test_a_malicious_checkpoint_runs_nothing_in_eval_or_train(tmp_path, fast, kind):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path, marker, kind)
    out = _fails([f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path, module="meddiff.eval")
    assert str(evil) in out or "os.system" in out
    out = _fails([*fast, f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'train'}"], tmp_path)
    assert str(evil) in out or "os.system" in out
    assert not marker.exists()


def test_damaged_checkpoints_are_data_errors_naming_the_file(tmp_path):
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "demo_tiny_v0.1.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(fixture.read_bytes()[:50_000])
    out = _fails([f"ckpt_path={truncated}", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path, module="meddiff.eval")
    assert "DataError" in out and str(truncated) in out


def test_eval_net_and_schedule_overrides_must_fit_the_weights(tmp_path):
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "demo_tiny_v0.1.ckpt"
    out = _fails([f"ckpt_path={fixture}", "+net.channels=[8,32]", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path,
                 module="meddiff.eval")
    assert "net.channels" in out and "do not fit the weights" in out
    out = _fails([f"ckpt_path={fixture}", "+schedule.prediction_type=epsilon", f"hydra.run.dir={tmp_path / 'b'}"],
                 tmp_path, module="meddiff.eval")
    assert "schedule.prediction_type" in out and "'sample'" in out
    assert not (tmp_path / "a" / "report.json").exists() and not (tmp_path / "b" / "report.json").exists()


def test_resume_refuses_a_network_change_unless_forced(run, tmp_path, fast):
    run_dir = tmp_path / "run"
    run("meddiff.train", *fast, "evaluate=false", f"hydra.run.dir={run_dir}")
    out = _fails([f"resume={run_dir}", "net.channels=[8,32]"], tmp_path)
    assert "net.channels" in out and "+resume_force=true" in out
    out = _fails([f"resume={run_dir}", "schedule.prediction_type=epsilon"], tmp_path)
    assert "schedule.prediction_type" in out
    assert not (run_dir / "resume-1" / "config_resolved.yaml").exists()  # refused snapshots are never replayed
    run("meddiff.train", f"resume={run_dir}", "trainer.max_epochs=2")
    snap = sorted(p.name for p in run_dir.glob("resume-*") if (p / "config_resolved.yaml").is_file())
    assert snap == ["resume-3"]
    assert json.loads(json.dumps(_ckpt(run_dir)["meddiff_config"]["schedule"]))["prediction_type"] == "sample"


def _digests(run_dir: Path) -> dict[str, str]:
    import hashlib

    files = [*sorted((run_dir / "checkpoints").glob("*.ckpt")), run_dir / "status.json",
             run_dir / "config_resolved.yaml", run_dir / "csv" / "metrics.csv"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_failed_or_refused_resume_changes_nothing_and_overrides_on_resume_take_effect(run, tmp_path, fast):
    import shutil

    import yaml

    run_dir = tmp_path / "run"
    run("meddiff.train", *fast, "evaluate=false", f"hydra.run.dir={run_dir}")
    before = _digests(run_dir)
    assert len([k for k in before if k.endswith(".ckpt")]) >= 2  # last.ckpt and the best one
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "ok" and status["last_checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")

    # weights that do not fit (a forced network change): one clear error, nothing on disk changed
    out = _fails([f"resume={run_dir}", "net.channels=[8,32]", "+resume_force=true"], tmp_path)
    assert "do not fit" in out and "shape mismatch" in out and "Nothing was changed" in out
    assert _digests(run_dir) == before

    # a copied run dir whose overrides add a function as a callback: refused naming it, no file written
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    stolen = tmp_path / "stolen.txt"
    overrides = yaml.safe_load((copy / ".hydra" / "overrides.yaml").read_text())
    overrides += ["+callbacks.x._target_=shutil.copyfile", f"+callbacks.x.src={copy / 'status.json'}",
                  f"+callbacks.x.dst={stolen}"]
    (copy / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    copied = _digests(copy)
    out = _fails([f"resume={copy}"], tmp_path)
    assert "'shutil.copyfile' is refused" in out and not stolen.exists() and _digests(copy) == copied

    # an optimizer override on resume is what the resumed run trains with (and records)
    run("meddiff.train", f"resume={run_dir}", "trainer.max_epochs=2", "model.optimizer.lr=1e-5")
    ckpt = _ckpt(run_dir)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 1e-5
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [1e-5]
    assert ckpt["meddiff_config"]["model"]["optimizer"]["lr"] == 1e-5
    assert json.loads((run_dir / "status.json").read_text())["attempt"] == 2
