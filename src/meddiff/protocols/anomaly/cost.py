"""Cost-aware choice of the reconstruction on validation: the sampling settings tried (``eval.t_start`` x
``eval.draws`` x ``eval.steps``), what each costs, and the rule that picks one.

Cost is UNet forwards per image relative to the patch grid (the same for every candidate): ``draws`` x (1 for the
one-step sampler, else ``steps``). Rule (``eval.cost_delta``): None = the best validation AUROC (ties: the first
candidate, as before); a float ``delta`` = the cheapest candidate whose validation AUROC is within ``delta`` of the
best one (ties in cost: the higher AUROC). The record says what was given up on validation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import is_dataclass, replace
from typing import Any

from meddiff.errors import ConfigError

from .options import EvalOptions, listify

__all__ = ["choose", "cost_record", "sampling_candidates", "unet_cost"]

#: eval options naming sampling fields tried on validation -> the sampling field
AXES = ("t_start", "draws", "steps")


def sampling_candidates(model: Any, opts: EvalOptions) -> list[Any | None]:
    """Copies of ``model.sampling`` (a dataclass with these fields) over the product of
    the requested ``eval.t_start`` / ``eval.draws`` / ``eval.steps`` values, each validated; ``[None]`` = as is."""
    asked = {k: listify(getattr(opts, k)) for k in AXES if getattr(opts, k, None) is not None}
    if not asked:
        return [None]
    base = getattr(model, "sampling", None)
    if not (is_dataclass(base) and all(hasattr(base, k) for k in asked)):
        given = ", ".join(f"eval.{k}={getattr(opts, k)!r}" for k in asked)
        raise ConfigError(f"{given} tries reconstruction settings, but {type(model).__name__} has no "
                          "model.sampling with these fields (partial-diffusion reconstruction); remove them.")
    out = []
    for values in itertools.product(*asked.values()):
        cfg = replace(base, **{k: int(v) for k, v in zip(asked, values)})
        cfg.validate(model.schedule.num_train_timesteps)
        out.append(cfg)
    return out


def unet_cost(cfg: Any | None) -> int | None:
    """UNet forwards per image per patch of a reconstruction config (None: unknown, e.g. the model's own)."""
    if cfg is None or not hasattr(cfg, "draws"):
        return None
    steps = 1 if getattr(cfg, "sampler", None) == "one_step" else int(getattr(cfg, "steps", None) or 1)
    return int(cfg.draws) * steps


def choose(aurocs: Sequence[float], costs: Sequence[int | None], delta: float | None) -> int:
    """Index of the chosen candidate (see the module docstring); NaN AUROCs never win."""
    vals = [a if not math.isnan(a) else -math.inf for a in aurocs]
    best = max(range(len(vals)), key=lambda i: (vals[i], -i))
    if delta is None or any(c is None for c in costs):
        return best
    ok = [i for i in range(len(vals)) if vals[i] >= vals[best] - float(delta)]
    return min(ok, key=lambda i: (costs[i], -vals[i], i))


def cost_record(aurocs: Sequence[float], costs: Sequence[int | None], chosen: int, delta: float | None) -> dict:
    """What the rule did: delta, the best and the chosen validation AUROC and cost, the AUROC given up."""
    best = choose(aurocs, costs, None)
    return {"rule": "best validation AUROC" if delta is None else "cheapest within delta of the best validation AUROC",
            "delta": delta, "best_val_auroc": aurocs[best], "best_unet_cost": costs[best],
            "chosen_val_auroc": aurocs[chosen], "chosen_unet_cost": costs[chosen],
            "val_auroc_given_up": aurocs[best] - aurocs[chosen], "chosen_on": "validation"}
