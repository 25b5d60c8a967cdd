"""Evaluation protocols, looked up by the model's ``eval_protocol`` (``meddiff.eval`` runs them).

A protocol is ``run(model, datamodule, eval_cfg: dict, out_dir: Path, device) -> report``: it chooses what it
chooses on validation data, touches the test split once, writes ``report.json`` (JSON-ready, with a ``"summary"``
dict of headline floats), ``metrics.csv`` and its figures into ``out_dir``, and returns the report. Protocols
read models and data through public methods and never change them. Every protocol is a subclass of
:class:`meddiff.protocols.base.Protocol` whose ``run`` (the skeleton's) is the registry's ``run``; the pieces they
share (healthy-set baselines, the margin over the best baseline chosen on validation, tables) are in
:mod:`meddiff.protocols.common`.

Registered protocols (imported only when used):

==========  ==================================================  ===============================================
``anomaly``  ``meddiff.protocols.anomaly:AnomalyProtocol``      reconstruction-based anomaly detection
``denoise``  ``meddiff.protocols.denoise:DenoiseProtocol``      conditional denoising vs noisy input, NLM, U-Net
``guided``   ``meddiff.protocols.guided:GuidedProtocol``        healthy counterfactuals by guidance (ADNI)
``refiner``  ``meddiff.protocols.refiner:RefinerProtocol``      coarse GAN + diffusion refiner, AUCp
==========  ==================================================  ===============================================

Adding one: subclass ``Protocol`` (options, ``select``, ``test``, optional ``check`` / ``write``), give the model
class ``eval_protocol = "<name>"`` and register the class by ``"package.module:Class"`` (imported lazily, so
registering costs nothing)::

    from meddiff.protocols import register_protocol
    register_protocol("my_protocol", "mypackage.my_protocol:MyProtocol")

A module path alone names the module's ``run``; a ``Protocol`` subclass or a ``run`` function may also be
registered directly (``register_protocol("name", MyProtocol)`` or as a decorator on a function). Every registered
protocol must pass ``tests/protocols/test_protocol_contract.py`` (it needs ``tests/protocols/fakes_<name>.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, overload

from meddiff.errors import ConfigError

#: ``run(model, datamodule, eval_cfg, out_dir, device) -> report``
RunFn = Callable[[Any, Any, "dict[str, Any]", Path, Any], "dict[str, Any]"]

#: name -> ``"package.module:ProtocolClass"`` or a module path holding ``run`` (imported on first use), a
#: ``Protocol`` subclass, or a ``run`` function
PROTOCOLS: dict[str, str | RunFn | type] = {
    "anomaly": "meddiff.protocols.anomaly:AnomalyProtocol",
    "denoise": "meddiff.protocols.denoise:DenoiseProtocol",
    "guided": "meddiff.protocols.guided:GuidedProtocol",
    "refiner": "meddiff.protocols.refiner:RefinerProtocol",
}

__all__ = ["PROTOCOLS", "RunFn", "get_protocol", "protocol_class", "register_protocol"]


@overload
def register_protocol(name: str, target: str | RunFn) -> str | RunFn: ...
@overload
def register_protocol(name: str, target: None = None) -> Callable[[RunFn], RunFn]: ...


def register_protocol(name: str, target: str | RunFn | type | None = None) -> Any:
    """Register protocol ``name``: ``target`` is ``"package.module:Class"`` (a ``Protocol`` subclass), a module
    path holding ``run``, a ``Protocol`` subclass or a ``run`` function.

    Without ``target`` this is a decorator registering the decorated function. Registering a name again replaces
    it (so a project can swap a built-in protocol for its own).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a protocol name must be a non-empty string, got {name!r}.")
    if target is None:

        def decorator(fn: RunFn) -> RunFn:
            PROTOCOLS[name] = fn
            return fn

        return decorator
    if not (isinstance(target, str) or callable(target)):
        raise ConfigError(f"protocol {name!r}: register a module path or a run function, got {target!r}.")
    PROTOCOLS[name] = target
    return target


def _unknown(name: str | None) -> ConfigError:
    return ConfigError(
        f"eval_protocol={name!r} is not a registered evaluation protocol; known: {sorted(PROTOCOLS)}. "
        "Set the model class's eval_protocol to one of them or register yours with "
        "meddiff.protocols.register_protocol(name, 'package.module:ProtocolClass')."
    )


def protocol_class(name: str | None) -> type | None:
    """The ``Protocol`` subclass registered as ``name`` (its module is imported now), or None for a protocol
    registered as a bare ``run`` function / module (which then has no options class to read).

    Raises:
        ConfigError: ``name`` is not registered, or its ``"module:Class"`` names no class.
    """
    if name not in PROTOCOLS:
        raise _unknown(name)
    target = PROTOCOLS[name]
    if isinstance(target, str) and ":" in target:
        module, _, cls_name = target.partition(":")
        target = getattr(importlib.import_module(module), cls_name, None)
        if not isinstance(target, type):
            raise ConfigError(f"protocol {name!r}: {module} defines no class {cls_name}.")
    return target if isinstance(target, type) else None


def get_protocol(name: str | None) -> RunFn:
    """The ``run`` of protocol ``name``: its ``Protocol`` class's ``run`` (the skeleton's), or the registered
    function / the ``run`` of the registered module.

    Raises:
        ConfigError: ``name`` is not registered (the message lists the registered names), or its module has no
            such class / no ``run``.
    """
    cls = protocol_class(name)
    if cls is not None:
        return cls().run
    target = PROTOCOLS[name]
    if not isinstance(target, str):
        return target
    run = getattr(importlib.import_module(target), "run", None)
    if not callable(run):
        raise ConfigError(f"protocol {name!r}: module {target} defines no run(model, datamodule, eval_cfg, "
                          "out_dir, device).")
    return run
