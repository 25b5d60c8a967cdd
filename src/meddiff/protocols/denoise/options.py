"""The ``eval:`` options of the denoise protocol (``configs/eval/denoise.yaml``) and the constants of its rules."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from meddiff.errors import ConfigError

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "mae", "vsi")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mae": False, "vsi": True}
MASKS = (None, "none", "foreground")
BM3D_SIGMA = ("known", "estimate")
CLASSICAL = ("noisy", "nlm", "bm3d")  # the candidates for "the best classical baseline"
DDIM_BUDGET = 50  # the quality bar's "DDIM with at most this many steps"
DDIM_TOLERANCE_DB = 0.5  # ... "within this many dB of the DDPM chain"


@dataclass
class SupervisedOptions:
    """The supervised U-Net baseline (``eval.supervised``)."""

    enabled: bool = True
    steps: int = 500
    lr: float = 1e-3
    loss: str = "l1"
    residual: bool = True
    net: dict | None = None  # net config; null = the experiment's net (stored in the checkpoint)
    cache_dir: str | None = None  # null = <out_dir>/baselines


@dataclass
class DenoiseEvalOptions:
    """Options of the denoising protocol (``configs/eval/denoise.yaml``)."""

    noise_levels: list[float] | None = None  # null = trained level(s): the fixed std, or low/mid/high of a range
    ddpm: bool = True  # the full ancestral chain (T network calls per patch)
    ddim_steps: list[int] = field(default_factory=lambda: [10, 25, 50])
    eta: float = 0.0
    num_samples: int | None = None  # samples averaged per patch; null = the model's num_samples
    batch_size: int = 64
    max_patches: int | None = None  # cap on test patches (whole slices, evenly spread); null = all
    dynamic_range: float = 2.0
    mask: str | None = None  # null | foreground
    foreground_threshold: float = -0.9
    nlm: bool = True
    nlm_h_factors: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2])
    nlm_patch_size: int = 5
    nlm_patch_distance: int = 6
    nlm_val_patches: int | None = None  # deprecated: use val_patches (kept so older checkpoints' configs load)
    bm3d: bool = True  # used when the optional extra is installed, reported as absent otherwise
    bm3d_sigma: str = "known"  # known (the level added) | estimate (per patch, Donoho's wavelet estimator)
    bm3d_profile: str = "np"
    bm3d_max_slices: int | None = None  # BM3D on at most this many of the test slices (evenly spread); null = all
    val_patches: int = 64  # validation patches (evenly spread) for every choice and verdict
    n_boot: int = 1000  # bootstrap replicates of the paired CIs
    supervised: SupervisedOptions = field(default_factory=SupervisedOptions)
    n_slices_out: int = 3
    write_tiff: bool = True
    write_nifti: bool = True
    figures: bool = True  # metric-vs-noise plots and the example grid (PNG)
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Normalise list fields and reject bad values (ConfigError naming the ``eval.<option>``)."""
        if self.noise_levels is not None:
            if isinstance(self.noise_levels, (int, float)):
                self.noise_levels = [float(self.noise_levels)]
            self.noise_levels = [float(s) for s in self.noise_levels]
            if not self.noise_levels or any(not (s >= 0 and math.isfinite(s)) for s in self.noise_levels):
                raise ConfigError(f"eval.noise_levels={self.noise_levels} must be a non-empty list of stds >= 0.")
        self.ddim_steps = [int(n) for n in (self.ddim_steps or [])]
        if any(n < 1 for n in self.ddim_steps):
            raise ConfigError(f"eval.ddim_steps={self.ddim_steps} must be positive step counts.")
        if not self.ddpm and not self.ddim_steps:
            raise ConfigError("eval.ddpm=false and eval.ddim_steps=[] leave no diffusion method to evaluate.")
        if self.batch_size < 1 or (self.max_patches is not None and self.max_patches < 1):
            raise ConfigError(
                f"eval.batch_size={self.batch_size} and eval.max_patches={self.max_patches} must be >= 1 (or null)."
            )
        if self.mask not in MASKS:
            raise ConfigError(f"eval.mask={self.mask!r} is unknown; use null or 'foreground'.")
        if not self.dynamic_range > 0:
            raise ConfigError(f"eval.dynamic_range={self.dynamic_range} must be > 0 (2.0 for [-1, 1] images).")
        if self.nlm and (not self.nlm_h_factors or any(h <= 0 for h in self.nlm_h_factors)):
            raise ConfigError(f"eval.nlm_h_factors={self.nlm_h_factors} must be a non-empty list of values > 0.")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"eval.num_samples={self.num_samples} must be >= 1 or null.")
        if self.nlm_val_patches is not None:
            log.warning("eval.nlm_val_patches is deprecated: it now sets eval.val_patches (every validation choice).")
            self.val_patches = int(self.nlm_val_patches)
            self.nlm_val_patches = None
        if self.val_patches < 1:
            raise ConfigError(f"eval.val_patches={self.val_patches} must be >= 1.")
        if self.bm3d_sigma not in BM3D_SIGMA:
            raise ConfigError(f"eval.bm3d_sigma={self.bm3d_sigma!r} is unknown; use one of {list(BM3D_SIGMA)}.")
        if self.bm3d_max_slices is not None and self.bm3d_max_slices < 1:
            raise ConfigError(f"eval.bm3d_max_slices={self.bm3d_max_slices} must be >= 1 or null (all slices).")
        if self.n_boot < 1:
            raise ConfigError(f"eval.n_boot={self.n_boot} must be >= 1 (e.g. 1000).")


def trained_noise_levels(noise_std: float | Sequence[float]) -> list[float]:
    """Evaluation levels for a model trained at ``noise_std``: ``[std]``, or ``[low, mid, high]`` of a range."""
    if isinstance(noise_std, (int, float)):
        return [float(noise_std)]
    lo, hi = (float(v) for v in noise_std)
    return [lo] if lo == hi else [lo, round((lo + hi) / 2, 6), hi]


def method_names(opts: DenoiseEvalOptions, use_bm3d: bool) -> list[str]:
    """Every method evaluated, in report order: baselines first, then the diffusion samplers (cheapest first)."""
    methods = ["noisy"] + (["nlm"] if opts.nlm else []) + (["bm3d"] if use_bm3d else [])
    methods += ["supervised"] if opts.supervised.enabled else []
    return methods + [f"ddim_{n}" for n in opts.ddim_steps] + (["ddpm"] if opts.ddpm else [])


def is_diffusion(method: str) -> bool:
    """Whether ``method`` is a sampler of the model (``ddim_<n>`` / ``ddpm``) rather than a baseline."""
    return method.startswith("ddim_") or method == "ddpm"


def ddim_by_steps(methods: Sequence[str]) -> list[str]:
    """The DDIM methods of ``methods``, fewest steps first."""
    return sorted((m for m in methods if m.startswith("ddim_")), key=lambda m: int(m.split("_")[1]))


def bm3d_status(opts: DenoiseEvalOptions, use_bm3d: bool) -> str:
    """``used`` / why BM3D is absent (an optional extra) or disabled."""
    if use_bm3d:
        return "used"
    return ("absent: optional extra bm3d not installed (pip install meddiff[denoise])" if opts.bm3d
            else "disabled (eval.bm3d=false)")
