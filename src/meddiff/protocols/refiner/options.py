"""The refiner protocol's ``eval:`` options and the label statements its report carries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meddiff.errors import ConfigError

LABELS_NONE = "none: pool membership only (known-healthy = 0, unlabelled pool = 1)"
LABELS_TEST = "test/ folder labels (pos / Ungood = 1, neg / good = 0)"
LABELS_MIXED = ("folder labels of the unannotated mixed set (train/pos vs train/neg_mixed, or BMAD valid/), read "
                "only here, for scoring; never in training or selection")
LABELS_VAL = "labelled validation folder labels (val/pos vs val/neg, or BMAD valid/): selection only"


@dataclass
class RefinerEvalOptions:
    """Options of the refiner protocol (``eval:`` in the configs)."""

    n_boot: int = 1000
    seed: int = 0
    steps: Sequence[int] = (1, 4, 10, 50)  # refinement steps measured on test (never chosen on it)
    steps_max_images: int | None = None  # test images in the steps sweep (the first ones); None = all
    rho: float | None = None  # share of healthy images in the unannotated pool; None = the model's aucp_rho
    checkpoint_dir: str | None = None  # the run's checkpoints; None = <out_dir>/checkpoints
    compare_checkpoints: bool = True
    max_images: int | None = None  # per pool (quick looks); None = all
    baselines: bool = True
    baseline_max_train: int = 2000  # known-healthy training images the nearest-neighbour baseline searches
    subject_reduction: str = "mean"
    pixel: bool = True  # pixel AUROC/AUPRC and Dice at a validation threshold, where masks exist
    figures: bool = True
    progress: bool = False

    def validate(self) -> None:
        if isinstance(self.n_boot, bool) or int(self.n_boot) < 0:
            raise ConfigError(f"eval.n_boot={self.n_boot} must be an integer >= 0.")
        if self.rho is not None and not 0 <= float(self.rho) < 1:
            raise ConfigError(f"eval.rho={self.rho} must be in [0, 1) or null.")
        if self.subject_reduction not in ("mean", "max"):
            raise ConfigError(f"eval.subject_reduction={self.subject_reduction!r}: choose mean or max.")
        for name in ("steps_max_images", "max_images"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) < 1):
                raise ConfigError(f"eval.{name}={v!r} must be a positive integer or null.")
