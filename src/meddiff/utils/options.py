"""Config -> dataclass: the one parser for option groups (``eval``, ``recon``, ``scoring``, ...).

Unknown keys are an error naming them and the valid ones (a typo in a YAML must never be silently ignored);
nested dataclass fields are parsed recursively; ``validate()`` runs when the dataclass defines it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from meddiff.errors import ConfigError

T = TypeVar("T")


def as_dict(cfg: Any) -> dict[str, Any]:
    """A plain ``dict`` from a mapping, an OmegaConf ``DictConfig`` (resolved) or None."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        pass
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"expected a mapping of options, got {type(cfg).__name__}: {cfg!r}")
    return dict(cfg)


def options_from(cls: type[T], cfg: Any, what: str) -> T:
    """Build dataclass ``cls`` from ``cfg`` (mapping / DictConfig / None / an instance of ``cls``).

    Args:
        cls: a dataclass type.
        cfg: the option values; missing keys take the dataclass defaults.
        what: the config path used in messages, e.g. ``"eval"`` or ``"model.recon"``.
    Raises:
        ConfigError: unknown keys (named, with the valid ones), or whatever ``cls.validate()`` raises.
    """
    if isinstance(cfg, cls):
        return cfg
    values = as_dict(cfg)
    flds = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(flds))
    if unknown:
        raise ConfigError(f"Unknown {what} option(s) {unknown}; valid options are {sorted(flds)}.")
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        sub = hints.get(name)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub) and (value is None or isinstance(value, Mapping)):
            values[name] = options_from(sub, value, f"{what}.{name}")
    try:
        opts = cls(**values)
    except TypeError as exc:  # e.g. a required field missing
        raise ConfigError(f"{what}: {exc}") from exc
    validate = getattr(opts, "validate", None)
    if callable(validate):
        validate()
    return opts
