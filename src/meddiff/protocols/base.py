"""The skeleton every evaluation protocol shares: choose on validation, touch test once, write the report.

A protocol subclasses :class:`Protocol` and fills in

- ``options``: the dataclass of its ``eval:`` options, parsed with ``meddiff.utils.options.options_from`` (an unknown
  key is a ``ConfigError`` naming the valid ones);
- ``select(model, data, opts, device) -> selection``: every choice (depth, post-processing, thresholds, ...) is made
  here, on validation data. ``data`` is the datamodule seen through :class:`ValidationView`: asking it for anything
  of the test split (``test_dataloader``, ``test_set``, ``dataset("test")``, ...) raises :class:`TestSplitTouched`,
  and ``data.splits_read`` lists the splits selection did read (derive ``chosen_on`` from it, not from a constant);
- ``test(model, datamodule, opts, selection, device) -> Outcome``: the one pass over the test split with what was
  selected; the report records what was chosen and on what (``report["selection"]["chosen_on"]``);
- ``write(outcome, out_dir)`` (optional): figures and tables beyond ``report.json`` and ``metrics.csv``.

:meth:`Protocol.run` is the registry's ``run(model, datamodule, eval_cfg, out_dir, device) -> report``: it runs the
steps in that order and writes ``report.json`` and ``metrics.csv`` (the report's ``summary``) with the atomic
writer of ``meddiff.utils.io``; ``meddiff.eval`` then records the checkpoint path (:func:`record_checkpoint`).
Protocols never change the model: an override (another depth, another guidance scale) is a copy passed down.
"""

from __future__ import annotations

import csv
import functools
import io
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from meddiff.utils.io import atomic_write_json, atomic_write_text
from meddiff.utils.options import options_from

__all__ = ["Outcome", "Protocol", "TestSplitTouched", "ValidationView", "record_checkpoint", "write_report"]


class TestSplitTouched(RuntimeError):
    """A protocol asked for test data while choosing its settings (a bug in the protocol, not in the config)."""

    __test__ = False  # not a pytest test class


#: split names as datamodules spell them -> the split they read (for :attr:`ValidationView.splits_read`)
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "predict": "test"}


def _split_of(name: str) -> str | None:
    """The split an attribute name reaches (``val_dataloader`` -> ``val``, ``predict_dataloader`` -> ``test``)."""
    low = name.lower()
    if low.startswith(("test", "predict")):
        return "test"
    return _SPLIT_ALIASES.get(low.split("_", 1)[0])


class _GuardedMapping(Mapping):
    """A read-only view of a ``{split: ...}`` mapping (e.g. ``datamodule.datasets``) that refuses the test split."""

    def __init__(self, view: ValidationView, name: str, inner: Mapping) -> None:
        self._view, self._name, self._inner = view, name, inner

    def __getitem__(self, key: Any) -> Any:
        split = _SPLIT_ALIASES.get(str(key).lower()) if isinstance(key, str) else None
        if split == "test":
            self._view._refuse(f"{self._name}[{key!r}]")
        if split is not None:
            self._view._record(split)
        return self._inner[key]

    def __iter__(self) -> Iterator:
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)


class ValidationView:
    """A datamodule as the selection step sees it: everything but the test split.

    Refused with :class:`TestSplitTouched`: attributes of the test split (``test*``, and ``predict*``, which is the
    test split in meddiff), generic accessors called with ``"test"`` / ``"predict"`` as an argument
    (``dataset("test")``, ``loader(split="test")``, ``volumes("test")``) and the ``"test"`` entry of split mappings
    (``datasets["test"]``).

    :attr:`splits_read` records which splits selection actually asked for (``["train", "val"]``, in the order of
    first use), so a report's ``chosen_on`` can be derived from what the code did rather than written as a constant.
    """

    __slots__ = ("_datamodule", "_splits_read")

    def __init__(self, datamodule: Any) -> None:
        object.__setattr__(self, "_datamodule", datamodule)
        object.__setattr__(self, "_splits_read", [])

    @property
    def splits_read(self) -> list[str]:
        """The splits selection asked the datamodule for, in order of first use (a copy)."""
        return list(self._splits_read)

    def _record(self, split: str) -> None:
        if split not in self._splits_read:
            self._splits_read.append(split)

    def _refuse(self, what: str) -> None:
        raise TestSplitTouched(
            f"{what} of {type(self._datamodule).__name__} was requested while choosing settings on validation; "
            "selection must use validation data only (the test split is touched once, by Protocol.test)."
        )

    def __getattr__(self, name: str) -> Any:
        split = _split_of(name)
        if split == "test":
            self._refuse(name)
        value = getattr(self._datamodule, name)
        if split is not None:
            self._record(split)
        if isinstance(value, Mapping) and any(
            isinstance(k, str) and _SPLIT_ALIASES.get(k.lower()) == "test" for k in value
        ):
            return _GuardedMapping(self, name, value)
        if callable(value) and not isinstance(value, type):
            return self._guard_call(name, value)
        return value

    def _guard_call(self, name: str, fn: Any) -> Any:
        """``fn`` refusing a ``"test"`` split argument and recording the split it is asked for."""

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for a in (*args, *kwargs.values()):
                split = _SPLIT_ALIASES.get(a.lower()) if isinstance(a, str) else None
                if split == "test":
                    self._refuse(f"{name}({a!r})")
                if split is not None:
                    self._record(split)
            return fn(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the datamodule is read-only during selection (tried to set {name!r}).")


@dataclass
class Outcome:
    """What the test step returns: the JSON-ready ``report`` (with ``"summary"``: headline floats) and plot data
    for :meth:`Protocol.write` that does not belong in ``report.json`` (arrays, example images)."""

    report: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)


class Protocol(ABC):
    """Options from config -> :meth:`select` on validation -> :meth:`test` once -> report files (see the module)."""

    #: the protocol's name in the registry (``meddiff.protocols.PROTOCOLS``), also written into messages
    name: ClassVar[str]
    #: the dataclass of its ``eval:`` options
    options: ClassVar[type]

    @abstractmethod
    def select(self, model: Any, data: ValidationView, opts: Any, device: torch.device) -> Any:
        """Choose settings on validation data; return whatever :meth:`test` needs (no test data here)."""

    @abstractmethod
    def test(self, model: Any, datamodule: Any, opts: Any, selection: Any, device: torch.device) -> Outcome:
        """Evaluate the test split once with ``selection``."""

    def write(self, outcome: Outcome, out_dir: Path) -> None:
        """Figures and tables beyond ``report.json`` / ``metrics.csv`` (none by default)."""
        return None

    def parse(self, eval_cfg: Any) -> Any:
        """``eval_cfg`` (mapping / DictConfig / None / an ``options`` instance) -> ``options``."""
        return options_from(self.options, eval_cfg, "eval")

    def run(self, model: Any, datamodule: Any, eval_cfg: Any, out_dir: str | Path,
            device: str | torch.device | None = "cpu") -> dict[str, Any]:
        """Evaluate ``model`` on ``datamodule`` (set up) and write the report into ``out_dir``; returns it."""
        opts = self.parse(eval_cfg)
        device = torch.device(device if device is not None else "cpu")
        selection = self.select(model, ValidationView(datamodule), opts, device)
        outcome = self.test(model, datamodule, opts, selection, device)
        write_report(outcome.report, out_dir)
        self.write(outcome, Path(out_dir))
        return outcome.report


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> None:
    """``report.json`` and ``metrics.csv`` (``metric,value`` rows of ``report["summary"]``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", report)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["metric", "value"])
    for k, v in report.get("summary", {}).items():
        writer.writerow([k, f"{v:.6f}" if isinstance(v, (int, float)) else v])
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())


def record_checkpoint(report: dict[str, Any], out_dir: str | Path, checkpoint: str | Path | None) -> None:
    """Record which checkpoint was evaluated (``report["checkpoint"]``, None for in-memory weights) and rewrite
    ``report.json``."""
    report["checkpoint"] = str(checkpoint) if checkpoint else None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out_dir) / "report.json", report)


@contextmanager
def evaluating(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode on ``device`` for the block; afterwards its train/eval flags and device are restored,
    so the protocol leaves the model as it found it."""
    flags = [(m, m.training) for m in model.modules()]
    first = next(iter(model.parameters()), None)
    home = first.device if first is not None else None
    try:
        yield model.to(device).eval()
    finally:
        for m, training in flags:
            m.training = training
        if home is not None and home != device:
            model.to(home)
