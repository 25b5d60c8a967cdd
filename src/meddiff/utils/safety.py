"""What a config read from a file may instantiate: the one allow-list.

A checkpoint carries its experiment config (``meddiff_config``), and ``meddiff.eval`` / a resume rebuild the model
and data from it with ``hydra.utils.instantiate``. A file from elsewhere must not be able to run code that way, so
every ``_target_`` in such a config is checked here before anything is instantiated:

- it must start with one of :data:`ALLOWED_TARGET_PREFIXES`;
- no part of the dotted path may start with ``_`` (no ``__globals__``/``__builtins__`` walks);
- the object it names must be defined in an allowed package (its ``__module__``), so a path through an import
  inside an allowed module (``meddiff.utils.io.os.system``) is refused too.

Anything else is a :class:`~meddiff.errors.ConfigError` naming the key and the target, raised before any of the
config is instantiated.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from meddiff.errors import ConfigError

#: the packages whose classes and functions a stored config may instantiate
ALLOWED_TARGET_PREFIXES: tuple[str, ...] = ("meddiff.", "torch.optim.", "torch.nn.", "monai.networks.", "diffusers.")

_TARGET_KEYS = ("_target_",)


def _allowed_name(name: str) -> bool:
    return any(name.startswith(p) for p in ALLOWED_TARGET_PREFIXES)


def _locate(target: str) -> Any:
    """Import the longest importable module prefix of ``target`` and walk the remaining attributes."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def check_target(target: Any, where: str = "_target_") -> None:
    """Refuse a ``_target_`` outside the allow-list (see the module docstring); ``where`` names its key."""
    hint = (f"allowed are classes and functions of {', '.join(p.rstrip('.') for p in ALLOWED_TARGET_PREFIXES)}. "
            "A config read from a checkpoint or run dir may only build models, nets, optimizers and data of these "
            "packages; if this file is not yours, do not use it.")
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{where}={target!r} is not a dotted name; {hint}")
    if not _allowed_name(target) or any(p.startswith("_") or not p for p in target.split(".")):
        raise ConfigError(f"{where}={target!r} is not allowed: {hint}")
    try:
        obj = _locate(target)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}={target!r} names nothing importable ({type(e).__name__}: {e}); {hint}") from e
    module = getattr(obj, "__module__", None) or ""
    if not _allowed_name(module + "."):
        raise ConfigError(f"{where}={target!r} resolves to an object of {module or 'an unknown module'!r}, "
                          f"not of an allowed package: {hint}")


def check_config_targets(cfg: Any, where: str = "config") -> None:
    """Check every ``_target_`` in a (nested) config: dicts, lists, OmegaConf containers. Raises on the first bad
    one, naming its key path (e.g. ``meddiff_config.model.net._target_``)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, DictConfig | ListConfig):
            cfg = OmegaConf.to_container(cfg, resolve=False)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            path = f"{where}.{key}"
            if key in _TARGET_KEYS:
                check_target(value, path)
            else:
                check_config_targets(value, path)
    elif isinstance(cfg, list | tuple):
        for i, value in enumerate(cfg):
            check_config_targets(value, f"{where}[{i}]")
