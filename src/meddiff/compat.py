"""Stored configs from older meddiff versions, translated on load (never kept as config aliases).

A checkpoint or run dir carries the config it was trained with. When code moves (a class to another module) or an
option is renamed, the stored config names the old place; :func:`translate_stored_config` rewrites it to today's
names *before* the trust check (:mod:`meddiff.utils.safety`) and instantiation, so old files keep loading while the
configs and code carry one name only.

- :data:`MOVED_TARGETS`: old ``_target_`` -> new ``_target_`` (a class that moved);
- :data:`KEY_TRANSLATORS`: functions ``(cfg: dict) -> None`` that rewrite renamed option keys in place (e.g. an old
  model option spelling to today's ``model.sampling``); each must be a no-op on a current config.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

__all__ = ["KEY_TRANSLATORS", "MOVED_TARGETS", "translate_stored_config"]

#: old ``_target_`` -> its current dotted path (add a row when a class a config can name moves)
MOVED_TARGETS: dict[str, str] = {
    # the run wing moved out of utils/ and sweeps/ (runs/, callbacks/)
    "meddiff.utils.checkpoint.LastCheckpoint": "meddiff.callbacks.LastCheckpoint",
    "meddiff.utils.hydra_utils.StoreConfigInCheckpoint": "meddiff.callbacks.StoreConfigInCheckpoint",
    "meddiff.utils.csv_history.CSVHistoryLogger": "meddiff.runs.csv_history.CSVHistoryLogger",
    "meddiff.sweeps.callback.SweepSummary": "meddiff.runs.sweep.callback.SweepSummary",
}

#: in-place rewrites of renamed option keys in a whole stored config, applied in order
KEY_TRANSLATORS: list[Callable[[MutableMapping[str, Any]], None]] = []


def _retarget(node: Any) -> None:
    if isinstance(node, MutableMapping):
        target = node.get("_target_")
        if isinstance(target, str) and target in MOVED_TARGETS:
            node["_target_"] = MOVED_TARGETS[target]
        for value in node.values():
            _retarget(value)
    elif isinstance(node, list):
        for value in node:
            _retarget(value)


def translate_stored_config(cfg: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``cfg`` (plain dicts/lists, changed in place and returned) with moved targets and renamed keys of older
    meddiff versions rewritten to today's spelling."""
    _retarget(cfg)
    for translate in KEY_TRANSLATORS:
        translate(cfg)
    return cfg
