"""The contract every registered evaluation protocol keeps, checked on a tiny fake model and data.

For protocol ``name`` the fakes come from ``tests/protocols/fakes_<name>.py``: ``make(tmp_path) -> (model,
datamodule, eval_cfg)``. A protocol without that file fails here, so a new protocol cannot skip the contract:

- the test split is read exactly once (a protocol that selects on test fails: through the ``ValidationView`` it
  raises, around it the count is 2);
- the model is unchanged after ``run``: state_dict, train/eval flags, device;
- ``report.json`` and ``metrics.csv`` are written; every ``summary`` value is a float;
- the report records which splits were read, and every choice carries a ``chosen_on`` that is not the test split.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from meddiff.protocols import PROTOCOLS, get_protocol

HERE = Path(__file__).resolve().parent
_TEST_WORDS = ("test", "predict")


def _fakes(name: str) -> Any:
    path = HERE / f"fakes_{name}.py"
    if not path.is_file():
        pytest.fail(f"protocol {name!r} is registered but has no {path.relative_to(HERE.parent.parent)}: write one "
                    "with make(tmp_path) -> (model, datamodule, eval_cfg) (a tiny fake model and data) so the "
                    "protocol contract is checked for it.", pytrace=False)
    spec = importlib.util.spec_from_file_location(f"_fakes_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the fakes look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _is_test(value: Any) -> bool:
    return isinstance(value, str) and value.lower().startswith(_TEST_WORDS)


class _CountingMapping(Mapping):
    def __init__(self, owner: CountingData, inner: Mapping) -> None:
        self._owner, self._inner = owner, inner

    def __getitem__(self, key: Any) -> Any:
        if _is_test(key):
            self._owner.test_reads += 1
        return self._inner[key]

    def __iter__(self) -> Iterator:
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)


class CountingData:
    """A datamodule proxy counting reads of the test split: calls of ``test*`` / ``predict*`` methods, calls with a
    ``"test"`` argument (``volumes("test")``), ``test*`` attributes and ``["test"]`` entries of split mappings."""

    def __init__(self, datamodule: Any) -> None:
        object.__setattr__(self, "_dm", datamodule)
        object.__setattr__(self, "test_reads", 0)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._dm, name)
        if callable(value) and not isinstance(value, type):
            @functools.wraps(value)
            def call(*args: Any, **kwargs: Any) -> Any:
                if _is_test(name) or any(_is_test(a) for a in (*args, *kwargs.values())):
                    object.__setattr__(self, "test_reads", self.test_reads + 1)
                return value(*args, **kwargs)

            return call
        if _is_test(name):
            object.__setattr__(self, "test_reads", self.test_reads + 1)
        if isinstance(value, Mapping):
            return _CountingMapping(self, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "test_reads":
            object.__setattr__(self, name, value)
        else:
            setattr(self._dm, name, value)


def _snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "flags": [m.training for m in model.modules()],
            "devices": sorted({str(p.device) for p in model.parameters()})}


def _choices(node: Any, path: str = "report") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            if str(k) == "chosen_on" or str(k).endswith("_chosen_on"):
                yield f"{path}.{k}", v
            else:
                yield from _choices(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _choices(v, f"{path}[{i}]")


@pytest.mark.filterwarnings("ignore:.*skipped")  # optional metrics without local weights
@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_protocol_keeps_the_contract(name: str, tmp_path: Path) -> None:
    fakes = _fakes(name)
    model, datamodule, eval_cfg = fakes.make(tmp_path / "data")
    assert isinstance(model, torch.nn.Module), f"fakes_{name}.make must return a torch module (its state is checked)"
    data = CountingData(datamodule)
    before = _snapshot(model)
    out = tmp_path / "out"

    report = get_protocol(name)(model, data, eval_cfg, out, "cpu")

    assert data.test_reads == 1, f"{name}: the test split was read {data.test_reads} times (exactly once expected)"
    after = _snapshot(model)
    assert after["flags"] == before["flags"], f"{name}: train/eval flags changed"
    assert after["devices"] == before["devices"], f"{name}: the model was left on another device"
    assert after["state"].keys() == before["state"].keys(), f"{name}: the model's state_dict keys changed"
    changed = [k for k, v in before["state"].items() if not torch.equal(v, after["state"][k])]
    assert not changed, f"{name}: run changed the model's state {changed}"

    assert (out / "report.json").is_file() and (out / "metrics.csv").is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["summary"] and set(on_disk["summary"]) == set(report["summary"])
    bad = {k: type(v).__name__ for k, v in report["summary"].items() if type(v) is not float}
    assert not bad, f"{name}: summary values must be floats: {bad}"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "metric,value" and len(rows) == len(report["summary"]) + 1

    read = on_disk["splits_read"]
    assert not any(_is_test(s) for s in read["select"]), f"{name}: selection read {read['select']}"
    assert "chosen_on" in on_disk["selection"], f"{name}: report['selection'] says nothing about chosen_on"
    choices = dict(_choices(on_disk))
    on_test = {k: v for k, v in choices.items() if "test" in str(v).lower()}
    assert not on_test, f"{name}: choices made on test: {on_test}"
