"""``eval:`` options of the guided protocol (``configs/eval/guided.yaml``; ``+eval.<key>=`` on the CLI)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meddiff.errors import ConfigError
from meddiff.protocols.common import check_healthy_baselines

__all__ = ["REDUCTIONS", "GuidedEvalOptions"]

#: slice -> volume score reductions tried on validation
REDUCTIONS: tuple[str, ...] = ("mean", "median", "p90", "max")


@dataclass
class GuidedEvalOptions:
    """``eval:`` options of the guided protocol (``configs/eval/guided.yaml``; ``+eval.<key>=`` on the CLI).

    Translation overrides (``None`` = the model's ``model.sampling`` value): ``guidance_scale``, ``t_start``,
    ``num_steps`` (``sampling.steps``), ``invert``. Inputs: ``input``, ``input_label``, ``max_volumes``,
    ``val_max_volumes``, ``slice_stride``. Analysis: ``ssim_outlier``, ``n_worst``, ``ms_ssim_scales``, ``max_psnr``, ``reductions``,
    ``n_boot``, ``seed``, ``volume_plots``. Baselines: ``baselines``, ``baseline_max_items``. Optional metrics:
    ``vsi``, ``lpips_torch_home``, ``fid_weights``.
    """

    input: Any = None
    input_label: int | str | None = None
    guidance_scale: float | None = None
    t_start: int | None = None
    num_steps: int | None = None
    invert: bool | None = None
    max_volumes: int | None = None
    val_max_volumes: int | None = None
    slice_stride: int = 1
    batch_size: int = 64
    ssim_outlier: float = 0.6
    n_worst: int = 8
    ms_ssim_scales: int = 3
    max_psnr: float = 100.0
    reductions: Sequence[str] = REDUCTIONS
    n_boot: int = 1000
    seed: int = 0
    volume_plots: bool = True
    vsi: bool = True
    baselines: Sequence[str] = ("nearest_healthy", "mean_healthy")  # healthy-set baselines ([] = mean intensity)
    baseline_max_items: int = 5000  # CN training slices they use at most (a fixed seeded subset)
    lpips_torch_home: str | None = None
    fid_weights: str | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming a bad option (run by :func:`meddiff.utils.options.options_from`)."""
        if self.guidance_scale is not None and not float(self.guidance_scale) >= 0:
            raise ConfigError(
                f"eval.guidance_scale={self.guidance_scale!r} must be >= 0 (0 = unconditional, ~3 = the seed's)."
            )
        for name in ("max_volumes", "val_max_volumes"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"eval.{name}={v!r} must be >= 1 or null (all volumes).")
        if int(self.slice_stride) < 1 or int(self.batch_size) < 1 or int(self.n_worst) < 0:
            raise ConfigError(
                f"eval.slice_stride={self.slice_stride}, eval.batch_size={self.batch_size} must be >= 1 and "
                f"eval.n_worst={self.n_worst} >= 0."
            )
        if not -1.0 <= float(self.ssim_outlier) <= 1.0:
            raise ConfigError(
                f"eval.ssim_outlier={self.ssim_outlier!r} must be an SSIM value in [-1, 1] (seed: 0.6)."
            )
        if int(self.ms_ssim_scales) < 1:
            raise ConfigError(f"eval.ms_ssim_scales={self.ms_ssim_scales!r} must be >= 1 (3 for 64-128 px).")
        self.reductions = tuple(str(r) for r in (self.reductions or ()))
        bad = [r for r in self.reductions if r not in REDUCTIONS]
        if not self.reductions or bad:
            raise ConfigError(
                f"eval.reductions={list(self.reductions)} must be a non-empty subset of {list(REDUCTIONS)}."
            )
        if isinstance(self.n_boot, bool) or int(self.n_boot) < 0:
            raise ConfigError(f"eval.n_boot={self.n_boot!r} must be an integer >= 0.")
        names = [self.baselines] if isinstance(self.baselines, str) else list(self.baselines or ())
        self.baselines = tuple(str(b) for b in names)
        check_healthy_baselines(self.baselines, self.baseline_max_items)

    def sampling_overrides(self) -> dict[str, Any]:
        """The ``model.sampling`` fields these options change (the ones not None), by their sampling names."""
        changes = {"guidance_scale": self.guidance_scale, "t_start": self.t_start, "steps": self.num_steps,
                   "invert": self.invert}
        return {k: v for k, v in changes.items() if v is not None}
