"""``meddiff-train logger=wandb`` offline, then ``resume=<run_dir>`` with a changed budget: the two offline folders are
one run (one id, the first launch's name and group, a ``resume`` tag), wandb's steps go on from the checkpoint's, and
both hold the checkpoint artifact (decoded from the ``.wandb`` files, as ``wandb sync`` would upload them). A later
``meddiff-eval`` of its checkpoint is a wandb run linked to it: same group, the training's config, tag ``eval``, and it
uses the checkpoint artifact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runs"))
from test_wandb_resume_offline import read_records  # noqa: E402


def _segment(path: Path) -> dict:
    recs = read_records(path)
    kinds = [r.WhichOneof("record_type") for r in recs]
    run = next(r.run for r, k in zip(recs, kinds) if k == "run")
    return {"run": run, "steps": [r.history.step.num for r, k in zip(recs, kinds) if k == "history"],
            "artifacts": [r.artifact.name for r, k in zip(recs, kinds) if k == "artifact"],
            "records": [r.artifact for r, k in zip(recs, kinds) if k == "artifact"],
            "config": {i.key: json.loads(i.value_json) for r, k in zip(recs, kinds)
                       for i in (r.config.update if k == "config" else r.run.config.update if k == "run" else [])}}


def test_train_and_resume_log_one_wandb_run(run, tmp_path, fast):
    run_dir = tmp_path / "run"
    env = {"WANDB_API_KEY": ""}
    run("meddiff.train", *fast, "logger=wandb", "evaluate=false", f"hydra.run.dir={run_dir}", env=env)
    run("meddiff.train", f"resume={run_dir}", "trainer.max_epochs=2", env=env)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    first = json.loads((run_dir / "wandb_run.json").read_text())
    assert first["id"] == run_id and first["launches"] == 2
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    a, b = (_segment(f) for f in files)
    assert a["run"].run_id == b["run"].run_id == run_id
    assert a["run"].display_name == b["run"].display_name == first["name"]
    assert "max_epochs=2" not in b["run"].display_name
    assert a["run"].run_group == b["run"].run_group == first["group"]
    assert "resume" in b["run"].tags and "resume" not in a["run"].tags
    assert a["steps"] and b["steps"] and a["steps"] == sorted(a["steps"]) and b["steps"] == sorted(b["steps"])
    assert b["steps"][0] >= a["steps"][-1]  # the resume goes on from the first launch's steps
    assert f"model-{run_id}" in a["artifacts"] and f"model-{run_id}" in b["artifacts"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["name"] == first["name"] and status["group"] == first["group"]

    # the eval run of its checkpoint: the training's group and config, tagged eval, using the checkpoint artifact
    run("meddiff.eval", f"ckpt_path={run_dir}/checkpoints/last.ckpt", "eval_name=later", env=env)
    (file,) = sorted((run_dir / "evals" / "later" / "wandb").glob("offline-run-*/run-*.wandb"))
    ev = _segment(file)
    assert ev["run"].run_id != run_id and ev["run"].run_group == first["group"]
    assert ev["run"].display_name == f"{first['name']}/eval/later" and "eval" in ev["run"].tags
    import yaml

    trained = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    for part in ("model", "net", "data"):  # evals filter by the training's hyperparameters
        assert ev["config"][part] == json.loads(json.dumps(trained[part])), part
    assert ev["config"]["model"]["optimizer"]["lr"] == trained["model"]["optimizer"]["lr"]
    assert ev["config"]["train_wandb_id"] == run_id
    used = [a for a in ev["records"] if a.use_after_commit]  # offline form of run.use_artifact (see loggers.py)
    assert [(a.name, a.type) for a in used] == [(f"model-{run_id}", "model")]
    assert [m.path for m in used[0].manifest.contents] == ["last.ckpt"]  # the file the training logged, same name
    # same content digest as the resumed training's version of last.ckpt: wandb sync links the eval to that version
    assert used[0].digest and used[0].digest in {a.digest for a in b["records"] if a.name == f"model-{run_id}"}
    assert ("evaluation", f"eval-{run_id}") in [(a.type, a.name) for a in ev["records"]]
