"""The CSV logger continues metrics.csv across a resume (Lightning's deletes it)."""

from __future__ import annotations

import csv

from meddiff.runs.csv_history import CSVHistoryLogger


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_resumed_logger_keeps_rows_before_the_resume_step_and_continues(tmp_path):
    first = CSVHistoryLogger(save_dir=tmp_path, name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.log_metrics({"val/auroc": 0.9}, step=3)
    first.save()
    path = tmp_path / "csv" / "metrics.csv"
    assert len(_rows(path)) == 7

    # resumed from a checkpoint at logger step 4: rows at steps 4, 5 were logged after it and are redone
    resumed = CSVHistoryLogger(save_dir=tmp_path, name="csv", version="", resume_step=4)
    resumed.log_metrics({"train/loss": 40.0}, step=4)
    resumed.log_metrics({"lr": 0.1}, step=4)  # a new column: the file is rewritten with the earlier rows kept
    resumed.save()
    rows = _rows(path)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "3", "4", "4"]
    assert rows[4]["val/auroc"] == "0.9" and rows[5]["train/loss"] == "40.0" and rows[6]["lr"] == "0.1"


def test_without_resume_step_the_file_starts_fresh(tmp_path):
    first = CSVHistoryLogger(save_dir=tmp_path, name="csv", version="")
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    again = CSVHistoryLogger(save_dir=tmp_path, name="csv", version="")
    again.log_metrics({"a": 2.0}, step=0)
    again.save()
    assert [r["a"] for r in _rows(tmp_path / "csv" / "metrics.csv")] == ["2.0"]
