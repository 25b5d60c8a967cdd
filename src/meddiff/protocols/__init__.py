"""Evaluation protocols, looked up by the model's ``eval_protocol`` (``meddiff.eval`` runs them).

A protocol is ``run(model, datamodule, eval_cfg: dict, out_dir: Path, device) -> report``: it chooses what it
chooses on validation data, touches the test split once, writes ``report.json`` (JSON-ready, with a ``"summary"``
dict of headline floats), ``metrics.csv`` and its figures into ``out_dir``, and returns the report. Protocols
read models and data through public methods and never change them. The skeleton for writing one is
:class:`meddiff.protocols.base.Protocol`.

Registered protocols (imported only when used):

==========  ==============================  ==========================================================
``anomaly``  ``meddiff.protocols.anomaly``  reconstruction-based anomaly detection (depth, post-processing)
``denoise``  ``meddiff.protocols.denoise``  conditional denoising vs noisy input, NLM, supervised U-Net
``guided``   ``meddiff.protocols.guided``   healthy counterfactuals by classifier-free guidance (ADNI)
``refiner``  ``meddiff.protocols.refiner``  coarse GAN + diffusion refiner: inductive, transductive, AUCp
==========  ==============================  ==========================================================

Adding one: give the model class ``eval_protocol = "<name>"`` and register the name, either with the module that
holds ``run`` (imported lazily, so registering costs nothing)::

    from meddiff.protocols import register_protocol
    register_protocol("my_protocol", "mypackage.my_protocol")

or with the function itself, as a decorator::

    @register_protocol("my_protocol")
    def run(model, datamodule, eval_cfg, out_dir, device): ...

Built-in protocols are listed in ``PROTOCOLS`` below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, overload

from meddiff.errors import ConfigError

#: ``run(model, datamodule, eval_cfg, out_dir, device) -> report``
RunFn = Callable[[Any, Any, "dict[str, Any]", Path, Any], "dict[str, Any]"]

#: name -> a module path holding ``run`` (imported on first use) or the ``run`` function itself
PROTOCOLS: dict[str, str | RunFn] = {
    "anomaly": "meddiff.protocols.anomaly",
    "denoise": "meddiff.protocols.denoise",
    "guided": "meddiff.protocols.guided",
    "refiner": "meddiff.protocols.refiner",
}

__all__ = ["PROTOCOLS", "RunFn", "get_protocol", "register_protocol"]


@overload
def register_protocol(name: str, target: str | RunFn) -> str | RunFn: ...
@overload
def register_protocol(name: str, target: None = None) -> Callable[[RunFn], RunFn]: ...


def register_protocol(name: str, target: str | RunFn | None = None) -> Any:
    """Register protocol ``name``: ``target`` is a module path holding ``run`` or the ``run`` function.

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


def get_protocol(name: str | None) -> RunFn:
    """The ``run`` function of protocol ``name`` (its module is imported now).

    Raises:
        ConfigError: ``name`` is not registered (the message lists the registered names) or its module has no
            ``run``.
    """
    if name not in PROTOCOLS:
        raise ConfigError(
            f"eval_protocol={name!r} is not a registered evaluation protocol; known: {sorted(PROTOCOLS)}. "
            "Set the model class's eval_protocol to one of them or register yours with "
            "meddiff.protocols.register_protocol(name, 'package.module')."
        )
    target = PROTOCOLS[name]
    if not isinstance(target, str):
        return target
    run = getattr(importlib.import_module(target), "run", None)
    if not callable(run):
        raise ConfigError(f"protocol {name!r}: module {target} defines no run(model, datamodule, eval_cfg, "
                          "out_dir, device).")
    return run
