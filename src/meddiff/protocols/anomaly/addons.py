"""Add-ons of the anomaly protocol, switched on by the batch fields they need.

An add-on extends the test report when test batches carry its field: the test pass collects that field per item
(``[B, ...]`` tensors, with the items' ``id``) and hands it to the add-on, which adds report sections, ``summary``
keys and figure data (:meth:`AnomalyAddon.extend`), then writes its files (:meth:`AnomalyAddon.write`). The built-in
one: ``subtypes`` -> :mod:`meddiff.protocols.anomaly.ct_subtypes` (RSNA CT: per-subtype AUROC, CT figures).

Register another with ``register_addon("field", "package.module:Class")`` (imported when a batch carries it).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from meddiff.errors import ConfigError

__all__ = ["ADDONS", "AnomalyAddon", "addon_fields", "addon_for", "register_addon"]

#: batch field -> ``"module:Class"`` of the add-on it switches on
ADDONS: dict[str, str] = {"subtypes": "meddiff.protocols.anomaly.ct_subtypes:CTSubtypes"}


class AnomalyAddon(Protocol):
    """What an add-on provides (no base class to inherit)."""

    def extend(self, report: dict[str, Any], scores: Mapping[str, np.ndarray], labels: np.ndarray,
               subjects: Sequence[str] | None, values: np.ndarray, ids: Sequence[str],
               names: Sequence[str] | None, opts: Any) -> dict[str, Any]:
        """Add sections and ``report["summary"]`` keys from the test scores (``{method: [N]}``, model and every
        baseline), labels ``[N]``, subjects, the field's ``values`` ``[N, ...]``, item ids and the field's column
        ``names``; return figure data for :meth:`write` (merged into the outcome's figures)."""
        ...

    def write(self, report: Mapping[str, Any], figures: Mapping[str, Any], out_dir: Path) -> None:
        """Write the add-on's tables and figures into ``out_dir``."""
        ...


def register_addon(field: str, target: str) -> None:
    """Switch the add-on ``target`` (``"package.module:Class"``) on for test batches carrying ``field``."""
    if not isinstance(field, str) or not field or not isinstance(target, str) or ":" not in target:
        raise ConfigError(f"register_addon({field!r}, {target!r}): give a batch field and 'package.module:Class'.")
    ADDONS[field] = target


def addon_fields() -> tuple[str, ...]:
    """The batch fields that switch an add-on on."""
    return tuple(ADDONS)


def addon_for(field: str) -> AnomalyAddon:
    """A fresh instance of the add-on for ``field`` (its module is imported now)."""
    module, _, cls = ADDONS[field].partition(":")
    return getattr(importlib.import_module(module), cls)()
