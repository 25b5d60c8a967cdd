"""The protocol skeleton: options parsed strictly, selection cannot reach the test split, report files written."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from meddiff.errors import ConfigError
from meddiff.protocols.base import Outcome, Protocol, TestSplitTouched, ValidationView, record_checkpoint


class _Data:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def val_dataloader(self):
        self.calls.append("val")
        return [1, 2, 3]

    def test_dataloader(self):
        self.calls.append("test")
        return [10, 20]


@dataclass
class _Opts:
    offset: int = 0


class _MeanProtocol(Protocol):
    """Chooses an offset on validation, reports the offset test mean."""

    name = "toy"
    options = _Opts
    peek_at_test = False

    def select(self, model, data, opts, device):
        if self.peek_at_test:
            data.test_dataloader()
        val = data.val_dataloader()
        return {"offset": opts.offset, "val_mean": sum(val) / len(val)}

    def test(self, model, datamodule, opts, selection, device):
        test = datamodule.test_dataloader()
        value = sum(test) / len(test) + selection["offset"]
        return Outcome({"selection": {"chosen_on": "validation", **selection}, "summary": {"mean": value}})


def test_run_selects_then_tests_once_and_writes_report_and_metrics(tmp_path):
    data = _Data()
    report = _MeanProtocol().run(None, data, {"offset": 1}, tmp_path / "out", "cpu")
    assert data.calls == ["val", "test"]
    assert report["summary"] == {"mean": 16.0}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert (tmp_path / "out" / "metrics.csv").read_text().splitlines() == ["metric,value", "mean,16.000000"]
    record_checkpoint(report, tmp_path / "out", tmp_path / "x.ckpt")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["checkpoint"] == str(tmp_path / "x.ckpt")


def test_selection_cannot_reach_the_test_split(tmp_path):
    proto = _MeanProtocol()
    proto.peek_at_test = True  # the rule broken on purpose
    data = _Data()
    with pytest.raises(TestSplitTouched, match="test_dataloader"):
        proto.run(None, data, {}, tmp_path, "cpu")
    assert "test" not in data.calls
    view = ValidationView(data)
    with pytest.raises(TestSplitTouched):
        view.test_set  # noqa: B018
    with pytest.raises(AttributeError, match="read-only"):
        view.calls = []
    assert view.val_dataloader() == [1, 2, 3]


def test_unknown_options_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown eval option\(s\) \['ofset'\]"):
        _MeanProtocol().run(None, _Data(), {"ofset": 1}, tmp_path, "cpu")


class _SplitData(_Data):
    """A datamodule with the generic accessors of SplitDataModule."""

    def __init__(self) -> None:
        super().__init__()
        self.datasets = {"train": [0], "val": [1, 2, 3], "test": [10, 20]}

    def dataset(self, split):
        return self.datasets[split]

    def predict_dataloader(self):
        return self.datasets["test"]

    def train_dataloader(self):
        return self.datasets["train"]


def test_generic_accessors_cannot_reach_the_test_split_and_reads_are_recorded():
    view = ValidationView(_SplitData())
    assert view.splits_read == []
    assert view.dataset("val") == [1, 2, 3] and view.splits_read == ["val"]
    for reach in (lambda: view.dataset("test"), lambda: view.dataset(split="test"), lambda: view.datasets["test"],
                  lambda: view.predict_dataloader(), lambda: view.test_dataloader()):
        with pytest.raises(TestSplitTouched):
            reach()
    assert view.train_dataloader() == [0] and view.datasets["val"] == [1, 2, 3]
    assert view.splits_read == ["val", "train"]  # in the order of first use; refused reads are not recorded
    assert set(view.datasets) == {"train", "val", "test"}  # the names may be listed, the test data not read
    view.splits_read.append("test")  # a copy: the record cannot be edited from outside
    assert view.splits_read == ["val", "train"]


def test_run_records_the_splits_read_and_refuses_a_choice_that_claims_validation_without_reading_it(tmp_path):
    from meddiff.protocols.base import ProtocolError

    report = _MeanProtocol().run(None, _SplitData(), {}, tmp_path / "ok", "cpu")
    assert report["splits_read"] == {"select": ["val"], "test": ["test"]}

    class Claims(_MeanProtocol):
        def select(self, model, data, opts, device):  # reads nothing, yet the report says "validation"
            return {"offset": 0}

    with pytest.raises(ProtocolError, match="chosen_on='validation', but selection read \\[\\]"):
        Claims().run(None, _Data(), {}, tmp_path / "claims", "cpu")

    class NoChoice(_MeanProtocol):
        def test(self, model, datamodule, opts, selection, device):
            return Outcome({"summary": {"mean": 1.0}})

    with pytest.raises(ProtocolError, match="no 'chosen_on'"):
        NoChoice().run(None, _Data(), {}, tmp_path / "none", "cpu")


def test_run_leaves_the_model_as_it_found_it(tmp_path):
    import torch

    class Peek(_MeanProtocol):
        def select(self, model, data, opts, device):
            assert not model.training  # evaluated in eval mode ...
            return super().select(model, data, opts, device)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
    report = Peek().run(model, _Data(), {}, tmp_path, "cpu")
    assert all(m.training for m in model.modules())  # ... and its flags restored after
    assert type(report["summary"]["mean"]) is float
