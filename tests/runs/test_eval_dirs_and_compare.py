"""meddiff-eval writes beside the training run (<run_dir>/evals/<name>/), meddiff-compare reads the newest evaluation
of a run trained with evaluate=false, and --diff lists the metrics (validation, test headline with CIs)."""

from __future__ import annotations

import json
import os
import time

import pytest

from meddiff.errors import ConfigError
from meddiff.runs.resolvers import eval_dir, training_run_of
from meddiff.runs.sweep.run_summary import find_runs, read_run
from meddiff.runs.sweep.table import build_table, metric_diff

from .test_sweep_table import headline_report, make_run


def test_eval_dir_beside_the_training_run_named_by_preset_or_given(tmp_path):
    run = make_run(tmp_path / "run", ["experiment=demo"], best=0.9)
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "best.ckpt"
    assert training_run_of(ckpt) == run.resolve()
    out = eval_dir(str(ckpt), None, "default", str(tmp_path / "logs/eval/runs"))
    assert out.startswith(str(run.resolve() / "evals" / "default_"))
    assert eval_dir(str(ckpt), None, None, "x").startswith(str(run.resolve() / "evals" / "stored_"))
    assert eval_dir(str(ckpt), "mine", "default", "x") == str(run.resolve() / "evals" / "mine")
    (run / "evals" / "mine").mkdir(parents=True)
    (run / "evals" / "mine" / "report.json").write_text("{}")
    with pytest.raises(ConfigError, match="eval_name=mine"):
        eval_dir(str(ckpt), "mine", "default", "x")
    loose = tmp_path / "loose.ckpt"  # a checkpoint outside any run dir: a fresh folder under the fallback
    assert training_run_of(loose) is None
    assert eval_dir(str(loose), None, "default", str(tmp_path / "fb")).startswith(str(tmp_path / "fb"))


def _evaluation(run, name, report, age_s):
    d = run / "evals" / name
    (d / ".hydra").mkdir(parents=True)
    (d / "report.json").write_text(json.dumps(report))
    t = time.time() - age_s
    os.utime(d / "report.json", (t, t))


def test_compare_shows_the_newest_evaluation_of_a_run_without_a_training_report(tmp_path):
    run = make_run(tmp_path / "runs" / "a", ["model.optimizer.lr=0.001"], best=0.9)  # evaluate=false: no report
    assert read_run(run).test == {}
    _evaluation(run, "default_old", headline_report(0.80, 0.9, -0.1, -0.2, -0.05), age_s=100)
    _evaluation(run, "default_new", headline_report(0.97, 0.9, 0.07, 0.02, 0.1), age_s=10)
    assert find_runs([tmp_path]) == [run.resolve()]  # an evaluation is not a run of its own
    r = read_run(run)
    assert r.test["image_auroc"] == 0.97 and r.report == "evals/default_new/report.json"
    assert read_run(run, "default_old").test["image_auroc"] == 0.80
    df = build_table([r])
    assert df.loc[0, "verdict"] == "beats" and df.loc[0, "report"] == "evals/default_new/report.json"
    # a report written in training wins by default
    (run / "report.json").write_text(json.dumps(headline_report(0.5, 0.9, -0.4, -0.5, -0.3)))
    assert read_run(run).test["image_auroc"] == 0.5


def test_diff_lists_validation_and_test_headline_with_cis_and_differences(tmp_path):
    a = make_run(tmp_path / "a", ["model.optimizer.lr=0.001"], best=0.80,
                 report=headline_report(0.90, 0.968, -0.068, -0.1, -0.02))
    b = make_run(tmp_path / "b", ["model.optimizer.lr=0.01"], best=0.85,
                 report=headline_report(0.99, 0.968, 0.022, 0.01, 0.03))
    diff = metric_diff([read_run(a), read_run(b)])
    assert diff["best val/auroc"] == ["0.8", "0.85"]
    assert diff["test/margin_image_auroc"] == ["-0.068 [-0.1, -0.02]", "0.022 [0.01, 0.03]"]
    assert diff["test/image_auroc"][1].startswith("0.99 [")
    assert diff["verdict"] == ["WORSE", "beats"]
    assert diff["test/margin_image_auroc (run i - run 0)"] == ["+0", "+0.09"]
    assert diff["best val/auroc (run i - run 0)"] == ["+0", "+0.05"]


def test_compare_cli_diff_prints_metrics(tmp_path, capsys):
    from meddiff.compare import main

    a = make_run(tmp_path / "a", ["model.optimizer.lr=0.001"], best=0.80,
                 report=headline_report(0.90, 0.968, -0.068, -0.1, -0.02))
    b = make_run(tmp_path / "b", ["model.optimizer.lr=0.01"], best=0.85,
                 report=headline_report(0.99, 0.968, 0.022, 0.01, 0.03))
    assert main([str(a), str(b), "--diff"]) == 0
    out = capsys.readouterr().out
    assert "test/margin_image_auroc" in out and "0.022 [0.01, 0.03]" in out and "beats" in out


def test_eval_without_a_checkpoint_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "meddiff.eval"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("meddiff-eval: ckpt_path=<file.ckpt> is required")
    assert "Traceback" not in proc.stderr
