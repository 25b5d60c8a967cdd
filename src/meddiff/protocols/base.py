"""The skeleton every evaluation protocol shares: choose on validation, touch test once, write the report.

A protocol subclasses :class:`Protocol` and fills in

- ``options``: the dataclass of its ``eval:`` options, parsed with ``meddiff.utils.options.options_from`` (an unknown
  key is a ``ConfigError`` naming the valid ones);
- ``check(model, datamodule, opts)`` (optional): refuse a model or datamodule without the interface the protocol
  reads (a ``ConfigError`` naming what is missing), before any work;
- ``select(model, data, opts, device) -> selection``: every choice (depth, post-processing, thresholds, ...) is made
  here, on validation data. ``data`` is the datamodule seen through :class:`ValidationView`: asking it for anything
  of the test split (``test_dataloader``, ``test_set``, ``dataset("test")``, ...) raises :class:`TestSplitTouched`,
  and ``data.splits_read`` lists the splits selection did read (derive ``chosen_on`` from it with
  :func:`chosen_on`, not from a constant);
- ``test(model, datamodule, opts, selection, device) -> Outcome``: the one pass over the test split with what was
  selected; the report records every choice and what it was chosen on (``report["selection"]["chosen_on"]`` and a
  ``chosen_on`` / ``*_chosen_on`` beside any other choice);
- ``write(outcome, out_dir)`` (optional): figures, tables and console output beyond ``report.json`` and
  ``metrics.csv`` (it may add entries to ``outcome.report``, e.g. the paths of the figures it wrote).

:meth:`Protocol.run` is the registry's ``run(model, datamodule, eval_cfg, out_dir, device) -> report`` and the only
way a protocol runs: options -> check -> inside :func:`evaluating` (the model in eval mode on ``device``; its
train/eval flags and device restored afterwards) select on the :class:`ValidationView` -> test once -> the skeleton
records ``report["splits_read"] = {"select": [...], "test": [...]}``, checks that every choice carries a
``chosen_on`` consistent with what selection read (:func:`check_choices`), makes the summary floats -> ``write`` ->
``report.json`` and ``metrics.csv`` last (atomic writer of ``meddiff.utils.io``); ``meddiff.eval`` then records the
checkpoint path (:func:`record_checkpoint`). Protocols never change the model: an override (another depth, another
guidance scale) is a copy passed down.
"""

from __future__ import annotations

import csv
import functools
import io
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from meddiff.utils.io import atomic_write_json, atomic_write_text
from meddiff.utils.options import options_from

__all__ = ["Outcome", "Protocol", "ProtocolError", "SplitRecorder", "TestSplitTouched", "ValidationView",
           "check_choices", "chosen_on", "evaluating", "missing_members", "record_checkpoint", "write_report"]


class TestSplitTouched(RuntimeError):
    """A protocol asked for test data while choosing its settings (a bug in the protocol, not in the config)."""

    __test__ = False  # not a pytest test class


class ProtocolError(RuntimeError):
    """A protocol's report breaks the skeleton's rules (a choice without ``chosen_on``, or one claiming validation
    when selection read no validation data): a bug in the protocol."""


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


class SplitRecorder:
    """A datamodule seen through a read-only proxy that records which splits are asked for (:attr:`splits_read`).

    Splits are recognised in attribute names (``val_dataloader`` -> ``val``, ``predict_*`` -> ``test``), in string
    arguments of accessors (``dataset("val")``, ``volumes("test")``) and in keys of split mappings
    (``datasets["train"]``). :class:`ValidationView` also refuses the test split.
    """

    __slots__ = ("_datamodule", "_splits_read")
    #: whether asking for the test split raises :class:`TestSplitTouched`
    refuses_test: ClassVar[bool] = False

    def __init__(self, datamodule: Any) -> None:
        object.__setattr__(self, "_datamodule", datamodule)
        object.__setattr__(self, "_splits_read", [])

    @property
    def splits_read(self) -> list[str]:
        """The splits asked for, in order of first use (a copy)."""
        return list(self._splits_read)

    def _record(self, split: str) -> None:
        if split not in self._splits_read:
            self._splits_read.append(split)

    def _refuse(self, what: str) -> None:
        if not self.refuses_test:
            self._record("test")
            return
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
                elif split is not None:
                    self._record(split)
            return fn(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the datamodule is read-only during evaluation (tried to set {name!r}).")


class ValidationView(SplitRecorder):
    """A datamodule as the selection step sees it: everything but the test split.

    Refused with :class:`TestSplitTouched`: attributes of the test split (``test*``, and ``predict*``, which is the
    test split in meddiff), generic accessors called with ``"test"`` / ``"predict"`` as an argument
    (``dataset("test")``, ``loader(split="test")``, ``volumes("test")``) and the ``"test"`` entry of split mappings
    (``datasets["test"]``).

    :attr:`splits_read` records which splits selection actually asked for (``["train", "val"]``, in the order of
    first use), so a report's ``chosen_on`` can be derived from what the code did rather than written as a constant.
    """

    __slots__ = ()
    refuses_test = True


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

    def check(self, model: Any, datamodule: Any, opts: Any) -> None:
        """Raise ``ConfigError`` when ``model`` or ``datamodule`` lacks what the protocol reads (nothing by default)."""
        return None

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

    def evaluate(self, model: Any, datamodule: Any, eval_cfg: Any,
                 device: str | torch.device | None = None) -> Outcome:
        """Every step of :meth:`run` but writing: parse, check, then inside :func:`evaluating` select on the
        :class:`ValidationView` and test once; the report gains ``splits_read`` and float ``summary`` values.
        ``device`` None = the model's (CPU for a model without parameters)."""
        opts = self.parse(eval_cfg)
        self.check(model, datamodule, opts)
        device = torch.device(device) if device is not None else _home(model) or torch.device("cpu")
        view, seen = ValidationView(datamodule), SplitRecorder(datamodule)
        with evaluating(model, device) as model:
            selection = self.select(model, view, opts, device)
            outcome = self.test(model, seen, opts, selection, device)
        report = outcome.report
        report["splits_read"] = {"select": view.splits_read, "test": seen.splits_read}
        check_choices(report, view.splits_read, self.name)
        report["summary"] = {str(k): float(v) for k, v in report.get("summary", {}).items()}
        return outcome

    def run(self, model: Any, datamodule: Any, eval_cfg: Any, out_dir: str | Path,
            device: str | torch.device | None = None) -> dict[str, Any]:
        """Evaluate ``model`` on ``datamodule`` (set up) and write the report into ``out_dir``; returns it.

        :meth:`evaluate`, then :meth:`write` (figures, tables), then ``report.json`` and ``metrics.csv`` last.
        """
        outcome = self.evaluate(model, datamodule, eval_cfg, device)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.write(outcome, out_dir)
        write_report(outcome.report, out_dir)
        return outcome.report


def missing_members(obj: Any, interface: type) -> list[str]:
    """The members of ``interface`` (a ``typing.Protocol`` of a protocol's interfaces file) that ``obj`` lacks;
    ``[]`` when it provides them all. Protocols check what they read this way, never by a model or data class."""
    names = sorted(getattr(interface, "__protocol_attrs__", None) or
                   {n for c in interface.__mro__[:-1] for n in (*vars(c), *getattr(c, "__annotations__", {}))
                    if not n.startswith("_")})
    return [n for n in names if not hasattr(obj, n)]


def chosen_on(splits_read: Sequence[str], compared: bool = True, otherwise: str = "config") -> str:
    """What a choice was made on, from what selection read: ``"validation"`` when candidates were ``compared`` on
    the validation split (``"val"`` in ``splits_read``), ``otherwise`` (``"config"``, ``"defaults"``) when not."""
    return "validation" if compared and "val" in splits_read else otherwise


def _choices(node: Any, path: str = "report") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of every ``chosen_on`` / ``*_chosen_on`` key in a JSON-like report."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            key = str(k)
            if key == "chosen_on" or key.endswith("_chosen_on"):
                yield f"{path}.{key}", v
            else:
                yield from _choices(v, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _choices(v, f"{path}[{i}]")


def check_choices(report: Mapping[str, Any], splits_read: Sequence[str], protocol: str = "?") -> None:
    """The skeleton's rules on a report: ``report["selection"]["chosen_on"]`` exists, and no choice claims
    validation when selection read no validation data.

    Raises:
        ProtocolError: naming the protocol and the offending key.
    """
    selection = report.get("selection")
    if not isinstance(selection, Mapping) or "chosen_on" not in selection:
        raise ProtocolError(f"protocol {protocol!r}: report['selection'] has no 'chosen_on' (what the settings were "
                            "chosen on); derive it with meddiff.protocols.base.chosen_on(view.splits_read).")
    for where, value in _choices(report):
        if "validation" in str(value) and "val" not in splits_read:
            raise ProtocolError(f"protocol {protocol!r}: {where}={value!r}, but selection read {list(splits_read)} "
                                "(no validation split); record what the choice was actually made on.")


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


def _home(model: Any) -> torch.device | None:
    """The device of the model's first parameter (None: not a module, or no parameters)."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else None


@contextmanager
def evaluating(model: Any, device: torch.device) -> Iterator[Any]:
    """``model`` in eval mode on ``device`` for the block; afterwards its train/eval flags and device are restored,
    so the protocol leaves the model as it found it. A stand-in that is no ``torch.nn.Module`` passes through."""
    if not isinstance(model, torch.nn.Module):
        yield model
        return
    flags = [(m, m.training) for m in model.modules()]
    home = _home(model)
    try:
        yield model.to(device).eval()
    finally:
        for m, training in flags:
            m.training = training
        if home is not None and home != device:
            model.to(home)
