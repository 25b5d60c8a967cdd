import pytest

from meddiff.utils.hydra_utils import resume_overrides
from meddiff.utils.io import atomic_write_json


def _run_dir(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run


def test_resume_shortcut_points_at_last_ckpt_and_reuses_the_run_dir(tmp_path):
    run = _run_dir(tmp_path)
    extra = resume_overrides([f"resume={run}", "trainer.max_epochs=3"])
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in extra
    assert f"hydra.run.dir={run}" in extra


def test_ckpt_path_inside_a_train_run_reuses_that_run_dir(tmp_path):
    run = _run_dir(tmp_path)
    assert resume_overrides([f"ckpt_path={run}/checkpoints/last.ckpt"]) == [f"hydra.run.dir={run}"]
    # an explicit run dir wins; a checkpoint outside a run dir changes nothing
    assert resume_overrides([f"ckpt_path={run}/checkpoints/last.ckpt", "hydra.run.dir=/x"]) == []
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(b"x")
    assert resume_overrides([f"ckpt_path={loose}"]) == []


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoints/last.ckpt"):
        resume_overrides([f"resume={tmp_path}"])


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
