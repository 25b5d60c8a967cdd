"""``eval:`` options of the anomaly protocol (``configs/eval/default.yaml``)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meddiff.anomaly.scoring import ScoringConfig
from meddiff.errors import ConfigError
from meddiff.metrics.baselines import MAX_REFERENCE
from meddiff.protocols.common import check_healthy_baselines

__all__ = ["EvalOptions", "listify"]


def listify(v: Any) -> list:
    """A config value as a list (a scalar becomes a one-item list; strings are scalars)."""
    return list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, str) else [v]


@dataclass
class EvalOptions:
    """Evaluation options (``eval:`` in the configs).

    ``select_on_val``: compare the candidate settings (``map`` x ``sign`` x ``median_size`` x ``reduction``, and
    the sampling ``t_start`` x ``draws`` x ``steps``, picked by ``cost_delta``: see ``cost.py``) on validation; false
    keeps the model's configured scoring. ``n_boot``: bootstrap replicates of the CIs (0 = point values only). ``baselines``: the healthy-set baselines beside the model (``[]`` = mean intensity
    only), built from at most ``baseline_max_items`` healthy training images.
    """

    select_on_val: bool = True
    map: Sequence[str] = ("l1",)
    sign: Sequence[str] = ("abs",)  # residual signs tried: abs | positive (hyperintense) | negative (hypointense)
    median_size: Sequence[int] = (1, 3)
    reduction: Sequence[str] = ("mean", "max", "percentile")
    q: float = 99.0
    n_boot: int = 1000
    pixel_bins: int = 1000
    max_batches: int | None = None
    n_figure_rows: int = 8
    seed: int = 0
    t_start: Sequence[int] | int | None = None  # reconstruction depths tried on validation (None = the model's)
    draws: Sequence[int] | int | None = None  # noise draws tried on validation (None = the model's)
    steps: Sequence[int] | int | None = None  # sampler steps tried on validation (None = the model's)
    cost_delta: float | None = None  # None: best validation AUROC; d: cheapest setting within d of the best
    baselines: Sequence[str] = ("nearest_healthy", "mean_healthy")  # healthy-set baselines ([] = mean intensity only)
    baseline_max_items: int = MAX_REFERENCE  # healthy training images they use at most (a fixed seeded subset)
    #: the fixed scoring reported beside the chosen one (``report["fixed_scoring"]``): these ScoringConfig fields
    #: on top of the model's configured scoring (None = the configured scoring as is), e.g. pDDPM's published
    #: ``{median_size: 5, reduction: mean}``; never selected, scored on the same test reconstructions
    fixed_scoring: Mapping[str, Any] | None = None
    #: the generalisation check (``report["generalisation"]``, :mod:`.generalisation`): unseen anomaly kinds pasted
    #: into at most ``generalisation_max_items`` healthy test images cached by the test pass, split across the kinds
    #: (that many extra reconstructions), scored with the validation-chosen settings
    generalisation: bool = True
    generalisation_max_items: int = 200

    def __post_init__(self) -> None:
        n = self.generalisation_max_items
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"eval.generalisation_max_items={n!r} must be a positive integer (e.g. 200); switch "
                              "the check off with eval.generalisation=false.")

    def fixed(self, configured: ScoringConfig) -> ScoringConfig:
        """The fixed scoring: ``configured`` with ``fixed_scoring``'s fields (a ``ConfigError`` names an unknown
        field)."""
        if not self.fixed_scoring:
            return configured
        unknown = sorted(set(self.fixed_scoring) - set(configured.as_dict()))
        if unknown:
            raise ConfigError(f"eval.fixed_scoring has unknown field(s) {unknown}; valid: "
                              f"{sorted(configured.as_dict())}.")
        return configured.with_(**dict(self.fixed_scoring))

    def candidates(self, default: ScoringConfig) -> list[ScoringConfig]:
        """The scoring settings compared on validation (``[default]`` without selection)."""
        if not self.select_on_val:
            return [default]
        grid = itertools.product(listify(self.map), listify(self.sign), listify(self.median_size),
                                 listify(self.reduction))
        return [default.with_(map=m, sign=str(s), median_size=int(k), reduction=r, q=float(self.q))
                for m, s, k, r in grid]

    def healthy_baselines(self) -> list[str]:
        """The requested healthy-set baselines (``eval.baselines``), checked."""
        names = None if self.baselines is None else [str(b) for b in listify(self.baselines)]
        return check_healthy_baselines(names, self.baseline_max_items)
