"""Everything the refiner protocol chooses, chosen without the test split (through ``ValidationView``).

- **Baselines** are built from the known-healthy *training* pool (``known_healthy``) only: never from the AUCp
  hold-out (``known_healthy_val``, the healthy side of AUCp, where a nearest-neighbour baseline would find its own
  images at distance 0), never from test.
- **The best trivial baseline** (the one the model's margin is measured against) is the one with the highest image
  AUROC on the labelled validation pool (``labelled_val``); without one, the highest label-free AUCp on validation
  (``known_healthy_val`` vs the unannotated ``mixed`` pool); without either, ``common.auroc_margin`` takes the best
  on test and labels it ``"test"``. Selection records every baseline's validation number; the pick itself is
  ``common.auroc_margin``'s (one rule for every protocol).
- **Pixel thresholds** (Dice) per estimate and baseline: the best pooled Dice on labelled-validation masks.
- **The checkpoint rule** that picked the evaluated weights is derived by comparing them with the run's kept
  checkpoints (``aucp``, ``labelled_validation``, ``last``): a record, read from files, not from data.
- **Every saved checkpoint** of the run (one per distinct weights, in step order) becomes a copy of the model for
  the AUCp-selector measurement (:mod:`.selector`) and the by-rule table; their labelled-validation scores come from
  the same pass over ``labelled_val`` as the baselines' (a measurement: nothing is chosen by them).

``chosen_on`` is derived from the pools the choice actually read (recorded by :class:`_PoolsRead`). In the BMAD
layout the labelled validation pool (``valid/``) is also the unannotated pool of the transductive numbers: those
are then scored on the data the baseline and thresholds were chosen on (the inductive ones never are).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.aucp import aucp
from meddiff.metrics.detection import detection_ci
from meddiff.metrics.pixel import PixelAccumulator, choose_threshold
from meddiff.protocols.base import ValidationView, chosen_on
from meddiff.protocols.common import HEALTHY_BASELINES, build_healthy_baselines, load_healthy_reference
from meddiff.protocols.refiner.options import RefinerEvalOptions
from meddiff.protocols.refiner.scoring import (
    CKPT,
    Baselines,
    Scored,
    Scorer,
    baseline_scorer,
    model_scorer,
    score_pool,
)
from meddiff.runs.checkpoint_selection import RULES_NEEDING_LABELS, load_weights_only, selection_checkpoints

log = logging.getLogger(__name__)

#: the pool the baselines' reference images come from: the known-healthy TRAINING images
BASELINE_POOL = "known_healthy"
RULE_TEXT = {"aucp": "best val/aucp (label-free)", "labelled_validation": "best val/auroc (NEEDS LABELS)",
             "last": "last checkpoint (no selection)"}


@dataclass
class SavedCheckpoint:
    """One set of weights the run saved (several files may hold it, e.g. ``last.ckpt`` and the best one)."""

    key: str  # the file stem of its first file in step order (e.g. ``val-step250``)
    paths: list[Path]
    step: int | None  # ``global_step`` stored in the file
    rules: list[str]  # the selection rules whose checkpoint it is
    is_model: bool  # the evaluated model's own weights
    error: str | None = None  # a file that does not load into the model

    def as_dict(self) -> dict[str, Any]:
        out = {"key": self.key, "paths": [str(p) for p in self.paths], "step": self.step, "rules": self.rules,
               "is_evaluated_model": self.is_model}
        return out if self.error is None else {**out, "error": self.error}


@dataclass
class RefinerSelection:
    """What :func:`select` chose: the baselines, their validation numbers (by which ``common.auroc_margin`` picks
    the best), pixel thresholds, the checkpoint rule and ``record`` (JSON-ready, becomes ``report["selection"]``);
    the run's saved checkpoints, model copies with their weights (``copies[key]``) and the labelled-validation scores
    of the model and the copies (``val``, keys ``<estimate>`` and ``ckpt/<key>/<estimate>``) for the measurement."""

    baselines: Baselines | None
    baseline_values: dict[str, float] | None  # each baseline's validation number; the best is chosen by it
    pixel_thresholds: dict[str, float]
    rules: dict[str, Path]
    matched: list[str]
    record: dict[str, Any] = field(default_factory=dict)
    saved: list[SavedCheckpoint] = field(default_factory=list)
    copies: dict[str, Any] = field(default_factory=dict)
    val: Scored | None = None


class _PoolsRead:
    """The validation view, recording which pools the choices read. Which pools belong to the validation split the
    datamodule says (``val_loader_pools()``, read through the view, so ``splits_read`` records ``"val"`` and
    ``chosen_on`` is derived from it)."""

    def __init__(self, view: ValidationView) -> None:
        self.view, self.read = view, []
        self.val_pools = set(view.val_loader_pools())

    def loader(self, name: str) -> Any:
        self.read.append(name)
        return self.view.pool_loader(name)

    def dataset(self, name: str) -> Any:
        self.read.append(name)
        return self.view.pool_dataset(name)

    def has(self, name: str) -> bool:
        return bool(self.view.has_pool(name))

    def has_val(self, name: str) -> bool:
        """Whether ``name`` is one of the validation split's pools and has images."""
        return name in self.val_pools and self.has(name)


def build_baselines(pools: _PoolsRead, opts: RefinerEvalOptions, device: torch.device) -> Baselines | None:
    """Nearest / mean healthy over ``baseline_max_train`` known-healthy *training* images (a fixed seeded subset),
    built by ``meddiff.protocols.common``."""
    if not opts.baselines:
        return None
    ds = pools.dataset(BASELINE_POOL)
    reference, n_total, seconds = load_healthy_reference(ds, opts.baseline_max_train, opts.seed)
    healthy = build_healthy_baselines(reference, list(HEALTHY_BASELINES), device, n_total, seconds)
    return Baselines(healthy, built_from=BASELINE_POOL, n_images=int(reference.shape[0]), n_pool=n_total)


def _both_classes(y: np.ndarray | None) -> bool:
    return y is not None and 0 < int(y.sum()) < y.size


def _labelled_val(model: Any, pools: _PoolsRead, opts: RefinerEvalOptions, baselines: Baselines | None,
                  copies: Mapping[str, Any], device: torch.device) -> tuple[Scored | None, dict[str, PixelAccumulator]]:
    """One pass over the labelled validation pool (None without one): the baselines, the model (its maps give the
    Dice thresholds where masks exist; its scores the selector measurement) and every checkpoint copy."""
    if not pools.has_val("labelled_val"):
        return None, {}
    cfg = model.anomaly_val.scoring
    masks = opts.pixel and "mask" in pools.dataset("labelled_val")[0]
    pixel: dict[str, PixelAccumulator] = {}
    scorers: dict[str, Scorer] = {}
    if baselines is not None:
        scorers["baselines"] = baseline_scorer(baselines, cfg, pixel if masks else None)
    if masks or copies:  # no masks and nothing to measure: no model pass
        scorers["model"] = model_scorer(model, pixel=pixel if masks else None)
    for key, other in copies.items():
        scorers[f"checkpoint:{key}"] = model_scorer(other, prefix=f"{CKPT}{key}/")
    if not scorers:
        return None, {}
    val = score_pool(pools.loader("labelled_val"), scorers, device, opts.max_images, "labelled validation",
                     opts.progress)
    return val, pixel


def _validation_values(model: Any, pools: _PoolsRead, opts: RefinerEvalOptions, baselines: Baselines,
                       val: Scored | None, device: torch.device) -> dict[str, Any]:
    """Every baseline's validation number (labelled AUROC on ``val``, else label-free AUCp) the best one is chosen by
    (``common.auroc_margin``)."""
    names = baselines.names
    if val is not None:
        if _both_classes(val.y):
            value = {n: detection_ci(val.get(n), val.y, n_boot=0)["auroc"] for n in names}
            return {"criterion": "image AUROC on labelled validation", "values": value, "pools": ["labelled_val"],
                    "n": int(val.n)}
        log.warning("the labelled validation pool has one class only; the best baseline is chosen by AUCp.")
    if pools.has_val("known_healthy_val") and pools.has_val("mixed"):
        scorers = {"baselines": baseline_scorer(baselines, model.anomaly_val.scoring)}
        healthy = score_pool(pools.loader("known_healthy_val"), scorers, device, opts.max_images, "", False)
        mixed = score_pool(pools.loader("mixed"), scorers, device, opts.max_images, "", False)
        value = {n: aucp(healthy.get(n), mixed.get(n)) for n in names}
        return {"criterion": "AUCp (label-free): known_healthy_val = 0 vs mixed = 1", "values": value,
                "pools": ["known_healthy_val", "mixed"], "n": int(healthy.n + mixed.n)}
    return {"criterion": None, "values": None, "pools": [],
            "why_not": "no labelled validation pool and no known-healthy hold-out (data.val_fraction=0): the best "
                       "baseline is the best on test (labelled so; it can only shrink the model's margin)"}


def _same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k].detach().cpu(), b[k].detach().cpu()) for k in a)


def checkpoint_rules(model: Any, ckpt_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """The run's rule -> checkpoint map and the rules whose weights equal the model's."""
    try:
        rules = selection_checkpoints(ckpt_dir)
    except ConfigError as exc:
        log.warning("cannot read the run's checkpoints in %s: %s", ckpt_dir, exc)
        return {}, []
    own = model.state_dict()
    matched = []
    for rule, path in rules.items():
        try:
            if _same_weights(own, load_weights_only(path)["state_dict"]):
                matched.append(rule)
        except ConfigError as exc:
            log.warning("checkpoint %s (%s) not comparable: %s", path, rule, exc)
    return rules, matched


def _step_order(item: tuple[Path, int | None]) -> tuple[bool, int, bool, str]:
    path, step = item
    return (step is None, step or 0, path.stem == "last", path.name)  # a named file before last.ckpt on ties


def saved_checkpoints(model: Any, ckpt_dir: Path, rules: Mapping[str, Path]
                      ) -> tuple[list[SavedCheckpoint], dict[str, Any]]:
    """Every ``*.ckpt`` in ``ckpt_dir``, one entry per distinct weights in step order, and ``key -> copy`` of the
    model with each one's weights (not for the model's own weights). The evaluated model is never changed."""
    from meddiff.runs.checkpoint_selection import checkpoint_dir_of

    folder = checkpoint_dir_of(ckpt_dir)
    if not folder.is_dir():
        return [], {}
    loaded: list[tuple[Path, int | None, dict[str, torch.Tensor] | None, str | None]] = []
    for path in sorted(folder.glob("*.ckpt")):
        try:
            ckpt = load_weights_only(path)
            step = ckpt.get("global_step")
            loaded.append((path, None if step is None else int(step), ckpt["state_dict"], None))
        except ConfigError as exc:
            loaded.append((path, None, None, str(exc)))
    loaded.sort(key=lambda t: _step_order((t[0], t[1])))
    own = model.state_dict()
    groups: list[tuple[SavedCheckpoint, dict[str, torch.Tensor] | None]] = []
    for path, step, state, error in loaded:
        same = next((g for g, st in groups if state is not None and st is not None and _same_weights(st, state)),
                    None)
        if same is not None:
            same.paths.append(path)
            continue
        entry = SavedCheckpoint(path.stem, [path], step, [], state is not None and _same_weights(own, state), error)
        groups.append((entry, state))
    for rule, path in rules.items():
        for entry, _ in groups:
            if any(p.resolve() == Path(path).resolve() for p in entry.paths):
                entry.rules.append(rule)
    copies: dict[str, Any] = {}
    for entry, state in groups:
        if entry.is_model or state is None:
            continue
        try:
            other = copy.deepcopy(model)
            other.load_state_dict(state)
            copies[entry.key] = other.eval()
        except (RuntimeError, ConfigError) as exc:  # another architecture: listed with its error, not scored
            entry.error = str(exc).splitlines()[0]
    return [g for g, _ in groups], copies


def select(model: Any, data: ValidationView, opts: RefinerEvalOptions, device: torch.device,
           ckpt_dir: Path) -> RefinerSelection:
    """Every choice of the protocol, on training/validation pools only (see the module docstring)."""
    pools = _PoolsRead(data)
    rules, matched = checkpoint_rules(model, ckpt_dir)
    rule = next((r for r in ("aucp", "aucp_debiased", "labelled_validation", "last") if r in matched), None)
    record: dict[str, Any] = {
        "rule": rule or "unknown (weights match no checkpoint of the run)",
        "matched_rules": matched, "needs_labels": rule in RULES_NEEDING_LABELS if rule else None,
        "available": {r: str(p) for r, p in rules.items()}, "rules": dict(RULE_TEXT),
    }
    saved, copies = saved_checkpoints(model, ckpt_dir, rules) if opts.compare_checkpoints else ([], {})
    if saved:
        record["saved_checkpoints"] = [e.as_dict() for e in saved]
    baselines = build_baselines(pools, opts, device)
    val, pixel = _labelled_val(model, pools, opts, baselines, copies, device)
    values, thresholds = None, {}
    for name, acc in pixel.items():
        try:
            thresholds[name] = choose_threshold(acc)
        except DataError as exc:  # no lesion pixels in validation: no threshold, the Dice is not reported
            log.warning("no validation pixel threshold for %s: %s", name, exc)
    if thresholds:
        record["pixel_threshold"] = {"values": thresholds, "criterion": "best pooled Dice",
                                     "chosen_on": chosen_on(data.splits_read), "pools": ["labelled_val"]}
    if baselines is not None:
        choice = _validation_values(model, pools, opts, baselines, val, device)
        values = choice["values"]
        record["baselines"] = {"built_from": baselines.built_from, "n_images": baselines.n_images,
                               "n_pool": baselines.n_pool, "names": baselines.names,
                               "cost": {k: b.cost.as_dict() for k, b in baselines.healthy.items()}}
        record["best_baseline"] = {**choice, "chosen_on": chosen_on(data.splits_read, values is not None, "test")}
    compared = any(p in pools.val_pools for p in pools.read)
    record["chosen_on"] = chosen_on(data.splits_read, compared, otherwise="none (nothing chosen on data)")
    record["pools_read"] = list(dict.fromkeys(pools.read))
    record["splits_read"] = data.splits_read
    return RefinerSelection(baselines, values, thresholds, rules, matched, record, saved, copies, val)
