import pytest
import yaml

from meddiff.errors import ConfigError
from meddiff.runs.resume import resume_argv as resume_overrides
from meddiff.utils.io import atomic_write_json


def _run_dir(tmp_path, overrides=("experiment=demo", "net=unet_tiny", "trainer.max_epochs=1")):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (run / "config_resolved.yaml").write_text("seed: 42\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run


def test_resume_replays_the_runs_overrides_then_the_new_ones(tmp_path):
    run = _run_dir(tmp_path)
    argv = resume_overrides([f"resume={run}", "trainer.max_epochs=3"])
    assert argv[:3] == ["experiment=demo", "net=unet_tiny", "trainer.max_epochs=3"]  # the new value, in place
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in argv
    assert f"hydra.run.dir={run}" in argv
    assert "hydra.output_subdir=resume-1" in argv  # the original .hydra/ stays


def test_ckpt_path_inside_a_train_run_resumes_that_run(tmp_path):
    run = _run_dir(tmp_path)
    argv = resume_overrides([f"ckpt_path={run}/checkpoints/last.ckpt"])
    assert f"hydra.run.dir={run}" in argv and f"resume={run}" in argv and "experiment=demo" in argv
    # an explicit run dir elsewhere, or a checkpoint outside a run dir, changes nothing
    assert resume_overrides([f"ckpt_path={run}/checkpoints/last.ckpt", "hydra.run.dir=/x"]) == \
        [f"ckpt_path={run}/checkpoints/last.ckpt", "hydra.run.dir=/x"]
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(b"x")
    assert resume_overrides([f"ckpt_path={loose}"]) == [f"ckpt_path={loose}"]


def test_resume_without_checkpoint_or_run_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a meddiff-train run dir"):
        resume_overrides([f"resume={tmp_path}"])
    run = _run_dir(tmp_path)
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(ConfigError, match="no checkpoints/last.ckpt"):
        resume_overrides([f"resume={run}"])
    with pytest.raises(ConfigError, match="no such folder"):
        resume_overrides([f"resume={tmp_path / 'missing'}"])


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
