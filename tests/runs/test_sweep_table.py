"""Run records, the summary table (sorting, swept columns, CIs, failures) and config diffs, on hand-made run dirs."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import yaml

from meddiff.runs.status import JobStatus, first_error_line, read_status
from meddiff.runs.sweep.run_summary import find_runs, read_run, read_test_metrics
from meddiff.runs.sweep.table import build_table, config_diff, to_markdown, write_summary


def make_run(path, overrides, state="ok", best=None, error=None, report=None, cfg=None, sweep=None):
    """A run dir as meddiff-train leaves it: .hydra/overrides.yaml, status.json, report.json, config_resolved."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    mode = "MULTIRUN" if sweep else "RUN"
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"mode": mode}}))
    status = {"state": state, "monitor": "val/auroc", "mode": "max", "best_score": best, "wall_time_s": 3.0}
    if error:
        status["error"] = error
    if best is not None:
        status["best_checkpoint"] = str(path / "checkpoints" / "best.ckpt")
    (path / "status.json").write_text(json.dumps(status))
    if report:
        (path / "report.json").write_text(json.dumps(report))
    base = {"optimized_metric": "val/auroc", "paths": {"output_dir": str(path)},
            "callbacks": {"model_checkpoint": {"dirpath": f"{path}/checkpoints", "mode": "max"}}}
    (path / "config_resolved.yaml").write_text(yaml.safe_dump({**base, **(cfg or {})}))
    return path


def anomaly_report(auroc, lo, hi):
    return {"summary": {"image_auroc": auroc, "image_auprc": 0.5},
            "image": {"model": {"auroc": auroc, "auroc_ci": [lo, hi], "auprc": 0.5, "auprc_ci": [0.4, 0.6]}}}


@pytest.fixture
def sweep(tmp_path):
    s = tmp_path / "sweep"
    s.mkdir()
    (s / "sweep.json").write_text(json.dumps({"swept": ["model.optimizer.lr"]}))
    common = ["experiment=demo", "data.batch_size=32"]
    make_run(s / "0", common + ["model.optimizer.lr=0.0001"], best=0.80, report=anomaly_report(0.7, 0.6, 0.8),
             sweep=True)
    make_run(s / "1", common + ["model.optimizer.lr=0.0003"], best=0.90, report=anomaly_report(0.75, 0.65, 0.85),
             sweep=True)
    make_run(s / "2", common + ["model.optimizer.lr=bad"], state="failed", error="TypeError: bad lr", sweep=True)
    return s


def test_table_one_row_per_job_sorted_best_first_failed_last(sweep):
    records = [read_run(d) for d in find_runs([sweep])]
    df = build_table(records)
    assert list(df["run"]) == ["1", "0", "2"]
    assert list(df["status"]) == ["ok", "ok", "failed"]
    assert df.loc[2, "error"] == "TypeError: bad lr"
    assert list(df["model.optimizer.lr"]) == ["0.0003", "0.0001", "bad"]
    assert "data.batch_size" not in df  # the same in every job: not a column
    assert df.loc[0, "best val/auroc"] == 0.90
    assert df.loc[0, "test/image_auroc"] == 0.75
    assert (df.loc[0, "test/image_auroc_ci_lo"], df.loc[0, "test/image_auroc_ci_hi"]) == (0.65, 0.85)
    assert df.loc[0, "checkpoint"].endswith("1/checkpoints/best.ckpt")
    md = to_markdown(df)
    assert "0.75 [0.65, 0.85]" in md and "| 3e-4 |" in md


def test_minimised_metric_sorts_ascending(tmp_path):
    for i, best in enumerate([2.0, 1.0, 3.0]):
        run = make_run(tmp_path / str(i), [f"seed={i}"], best=best)
        st = json.loads((run / "status.json").read_text())
        (run / "status.json").write_text(json.dumps({**st, "mode": "min", "monitor": "val/loss"}))
    df = build_table([read_run(d) for d in find_runs([tmp_path])])
    assert list(df["best val/loss"]) == [1.0, 2.0, 3.0]


def test_write_summary_files(sweep):
    df = build_table([read_run(d) for d in find_runs([sweep])])
    written = write_summary(df, sweep)
    assert set(written) == {"csv", "md", "png"}
    back = pd.read_csv(sweep / "summary.csv")
    assert len(back) == 3 and "model.optimizer.lr" in back.columns
    assert oct(os.stat(sweep / "summary.csv").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_runs_from_several_sweeps_and_single_runs(tmp_path, sweep):
    single = make_run(tmp_path / "runs" / "a", ["experiment=demo", "model.optimizer.lr=0.001"], best=0.95)
    records = [read_run(d) for d in find_runs([sweep, single])]
    df = build_table(records)
    assert len(df) == 4 and df.loc[0, "run"] == "runs/a"
    assert "model.optimizer.lr" in df


def test_config_diff_lists_exactly_the_differing_keys(tmp_path):
    a = make_run(tmp_path / "a", [], cfg={"model": {"lr": 1e-4, "t": 300, "same": [1, 2]}, "seed": 1})
    b = make_run(tmp_path / "b", [], cfg={"model": {"lr": 3e-4, "t": 300, "same": [1, 2]}, "seed": 1, "extra": 5})
    diff = config_diff([a, b])
    # each run's own dir (paths.output_dir, checkpoint dirpath) is not a difference
    assert set(diff) == {"model.lr", "extra"}
    assert diff["model.lr"] == [1e-4, 3e-4]
    assert diff["extra"] == ["<missing>", 5]


def test_killed_run_is_told_apart_from_a_running_one(tmp_path):
    run = make_run(tmp_path / "r", [], state="running")
    st = json.loads((run / "status.json").read_text())
    import socket

    (run / "status.json").write_text(json.dumps({**st, "host": socket.gethostname(), "pid": 2**22 + 12345}))
    assert read_run(run).status == "killed"
    (run / "status.json").write_text(json.dumps({**st, "host": socket.gethostname(), "pid": os.getpid()}))
    assert read_run(run).status == "running"


def test_runs_without_status_fall_back_to_history_and_report(tmp_path):
    run = tmp_path / "old"
    (run / "csv").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("[]")
    (run / "config_resolved.yaml").write_text("optimized_metric: val/auroc\n")
    (run / "csv" / "metrics.csv").write_text("epoch,val/auroc,train/loss\n0,0.5,\n0,,1.0\n1,0.7,\n2,0.6,\n")
    (run / "report.json").write_text(json.dumps(anomaly_report(0.7, 0.6, 0.8)))
    r = read_run(run)
    assert (r.status, r.best_score, r.test_ci["image_auroc"]) == ("ok", 0.7, (0.6, 0.8))


def test_test_metrics_pairs_cis_from_summary_and_sections():
    summary, cis = read_test_metrics({"summary": {"auroc_ad": 0.8, "auroc_ad_ci_lo": 0.7, "auroc_ad_ci_hi": 0.9,
                                             "image_auroc": 0.6, "psnr": 30.0},
                                 "image": {"model": {"auroc_ci": [0.5, 0.7]}}})
    assert summary == {"auroc_ad": 0.8, "image_auroc": 0.6, "psnr": 30.0}
    assert cis == {"auroc_ad": (0.7, 0.9), "image_auroc": (0.5, 0.7)}


def test_job_status_records_start_and_first_error_line(tmp_path):
    st = JobStatus(tmp_path)
    st.start(name="demo/lr=3e-4")
    assert read_status(tmp_path)["state"] == "running"
    try:
        raise ValueError("lr must be positive\nmore detail")
    except ValueError as e:
        st.end("failed", error=e)
    rec = read_status(tmp_path)
    assert rec["state"] == "failed" and rec["error"] == "ValueError: lr must be positive"
    assert rec["name"] == "demo/lr=3e-4" and rec["wall_time_s"] >= 0
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # atomic: no temp files left


def test_first_error_line_looks_through_hydra_instantiation_errors():
    from hydra.errors import InstantiationException

    try:
        try:
            int("bad")
        except ValueError as e:
            raise InstantiationException("Error in call to target 'x.Y':\nValueError(...)") from e
    except InstantiationException as e:
        assert first_error_line(e) == "ValueError: invalid literal for int() with base 10: 'bad'"


def test_a_damaged_optuna_db_is_a_clear_error_naming_the_file(tmp_path):
    import pytest

    from meddiff.errors import ConfigError
    from meddiff.runs.sweep.optuna_storage import sqlite_storage

    db = tmp_path / "optuna.db"
    db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)  # a header, then garbage
    with pytest.raises(ConfigError, match=rf"Optuna study file {db} is damaged.*mv {db} {db}.broken"):
        sqlite_storage(db)
    sqlite_storage(tmp_path / "fresh.db")  # a missing file is still created


def headline_report(auroc, best_baseline, margin, lo, hi):
    """An anomaly report whose mean-intensity baseline comes first but whose margin is against nearest-healthy."""
    summary = {"image_auroc": auroc, "image_auprc": 0.5, "baseline_image_auroc": 0.803,
               "nearest_image_auroc": best_baseline, "best_baseline_image_auroc": best_baseline,
               "margin_image_auroc": margin, "margin_image_auroc_ci_lo": lo, "margin_image_auroc_ci_hi": hi,
               "model_beats_best_baseline": float(lo > 0)}
    return {"summary": summary, "image": {"model": {"auroc": auroc, "auroc_ci": [auroc - 0.05, auroc + 0.05]}},
            "margin_over_best_baseline": {"baseline": "nearest_healthy", "auroc_baseline": best_baseline,
                                          "verdict": "The model does NOT beat the best baseline ..."}}


@pytest.fixture
def lr_sweep(tmp_path):
    s = tmp_path / "lr_sweep"
    s.mkdir()
    (s / "sweep.json").write_text(json.dumps({"swept": ["model.optimizer.lr"]}))
    make_run(s / "0", ["model.optimizer.lr=0.0001"], best=0.80, report=headline_report(0.90, 0.968, -0.068, -0.1, -0.02),
             sweep=True)
    make_run(s / "1", ["model.optimizer.lr=0.001"], best=0.90, report=headline_report(0.97, 0.968, 0.002, -0.03, 0.04),
             sweep=True)
    make_run(s / "2", ["model.optimizer.lr=0.01"], best=0.85, report=headline_report(0.99, 0.968, 0.022, 0.01, 0.03),
             sweep=True)
    make_run(s / "3", ["model.optimizer.lr=0.1"], state="failed", error="FloatingPointError: nan loss", sweep=True)
    return s


def test_summary_shows_the_protocols_headline_not_the_first_test_metrics(lr_sweep):
    df = build_table([read_run(d) for d in find_runs([lr_sweep])])
    assert df.attrs["headline"] == "image_auroc"
    assert list(df["verdict"]) == ["does NOT beat", "beats", "WORSE", ""]
    assert list(df["best_baseline"])[:3] == ["nearest_healthy"] * 3
    md = to_markdown(df)
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    assert "test/best_baseline_image_auroc" in header and "test/margin_image_auroc" in header
    assert "verdict" in header and "baseline_image_auroc |" not in header.replace("best_baseline_image_auroc", "")
    assert "nearest_healthy 0.968" in md and "0.002 [-0.03, 0.04]" in md


def test_summary_png_log_axis_failed_jobs_marked_and_test_headline_row(lr_sweep):
    from meddiff.runs.sweep.plot import is_log_spaced, summary_figure

    df = build_table([read_run(d) for d in find_runs([lr_sweep])])
    fig = summary_figure(df)
    axes = fig.axes
    assert len(axes) == 2  # validation row + test headline row, one swept key
    assert all(ax.get_xscale() == "log" for ax in axes)
    assert axes[1].get_ylabel() == "test/image_auroc"
    for ax in axes:  # the failed lr=0.1 job is drawn (red x) in every panel, not only counted in the title
        failed = [c for c in ax.collections if c.get_label() == "failed / killed"]
        assert len(failed) == 1 and failed[0].get_offsets()[0][0] == pytest.approx(0.1)
        assert ax.get_xlim()[0] < 1e-4 and ax.get_xlim()[1] > 0.1  # in view, not off the axis
    assert is_log_spaced([1e-4, 1e-3]) is False  # one decade only: linear
    assert is_log_spaced([1, 32, 128]) is True and is_log_spaced([-1, 10, 100]) is False
    assert is_log_spaced(["a", "b"]) is False
