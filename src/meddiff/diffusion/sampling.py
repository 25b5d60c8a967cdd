"""``SamplingConfig``: the one vocabulary for "how a model samples" (pure torch; no Lightning, data or anomaly code).

Every model family nests it as ``model.sampling`` (and ``model.val_sampling``: the fields changed for the cheaper
per-epoch validation pass). The fields:

- ``sampler``: ``ddim`` | ``ddpm`` (a reverse chain) or ``one_step`` (one x0 prediction at ``t_start``, pDDPM);
- ``steps``: reverse steps (respaced); ``None`` = every timestep of the chain;
- ``spacing``: ``leading`` | ``trailing`` | ``linspace`` respacing of a chain from pure noise
  (:func:`~meddiff.diffusion.samplers.make_timesteps`); a partial chain from ``t_start`` always uses
  :func:`~meddiff.diffusion.samplers.make_partial_timesteps`;
- ``eta``: DDIM stochasticity (0 = deterministic); ``t_start``: ``None`` = start from pure noise at ``T``, an int =
  partial diffusion (the input noised to ``t_start``, then denoised: SDEdit / pDDPM / AnoDDPM);
- ``clip``: clamp each step's x0 estimate to ``[-c, c]`` (``True`` = 1, ``None`` = off);
- ``seed``: seed of the starting and step noise; ``draws``: independent samples averaged per input;
- ``precision``: how the network runs (``None`` = the caller's autocast context, ``auto``, ``bf16``, ``16``, ``32``;
  Lightning's names accepted); ``noise``: the noise kind of the chain (``meddiff.diffusion.noise.NOISE_KINDS``).

:meth:`SamplingConfig.validate` checks everything once against the schedule's length; a family rejects fields it
does not use (:meth:`SamplingConfig.require_unset`) instead of silently ignoring them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

import torch

from meddiff.diffusion.noise import NOISE_KINDS
from meddiff.diffusion.samplers import SAMPLERS, SPACINGS, make_partial_timesteps
from meddiff.errors import ConfigError

__all__ = ["AUTO", "ONE_STEP", "PRECISIONS", "SamplingConfig", "network_dtype", "with_precision"]

ONE_STEP = "one_step"
# accepted name (ours or Lightning's) -> autocast dtype of the network call (None = autocast off, float32)
PRECISIONS: dict[str, torch.dtype | None] = {
    "32": None, "32-true": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
    "16": torch.float16, "16-mixed": torch.float16,
}
AUTO = "auto"  # bf16 where the device computes it natively (see network_dtype)

S = TypeVar("S", bound="SamplingConfig")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingConfig:
    """How a model samples (see the module docstring). Written into reports with :meth:`as_dict`."""

    sampler: str = "ddim"
    steps: int | None = 50
    spacing: str = "leading"
    eta: float = 0.0
    t_start: int | None = None
    clip: float | bool | None = None
    seed: int = 0
    draws: int = 1
    precision: str | None = None
    noise: str = "gaussian"

    def validate(self: S, num_train_timesteps: int | None = None, where: str = "model.sampling") -> S:
        """Raise ``ConfigError`` naming ``where.<field>``; returns ``self``. Depth and steps are checked against the
        schedule's length ``T`` when it is given (``options_from`` calls this without it)."""
        if self.sampler not in (*SAMPLERS, ONE_STEP):
            raise ConfigError(f"{where}.sampler={self.sampler!r} is unknown; choose one of {[*SAMPLERS, ONE_STEP]}.")
        if self.sampler == ONE_STEP and self.t_start is None:
            raise ConfigError(f"{where}.sampler=one_step predicts x0 at {where}.t_start, which is null; set a depth, "
                              "e.g. t_start: 250.")
        if self.spacing not in SPACINGS:
            raise ConfigError(f"{where}.spacing={self.spacing!r} is unknown; choose one of {list(SPACINGS)}.")
        if isinstance(self.eta, bool) or not isinstance(self.eta, int | float) or not self.eta >= 0:
            raise ConfigError(f"{where}.eta={self.eta!r} must be a number >= 0 (0 = deterministic DDIM).")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise ConfigError(f"{where}.steps={self.steps!r} must be an integer >= 1, or null for every timestep.")
        if self.t_start is not None and (not _is_int(self.t_start) or self.t_start < 0):
            raise ConfigError(f"{where}.t_start={self.t_start!r} must be an integer >= 0 (a timestep), or null to "
                              "start from pure noise.")
        if not _is_int(self.seed):
            raise ConfigError(f"{where}.seed={self.seed!r} must be an integer.")
        if not _is_int(self.draws) or self.draws < 1:
            raise ConfigError(f"{where}.draws={self.draws!r} must be an integer >= 1 (samples averaged per input).")
        if self.precision is not None and str(self.precision) not in (*PRECISIONS, AUTO):
            raise ConfigError(f"{where}.precision={self.precision!r} is unknown; choose null (the caller's context), "
                              f"{AUTO!r} or {sorted(PRECISIONS)} (Lightning's names are accepted).")
        if self.noise not in NOISE_KINDS:
            raise ConfigError(f"{where}.noise={self.noise!r} is unknown; choose one of {list(NOISE_KINDS)}.")
        if self.clip is not None and not isinstance(self.clip, bool) and not (
                isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"{where}.clip={self.clip!r} must be true (clamp to [-1, 1]), a positive number or null.")
        if num_train_timesteps is not None:
            T = int(num_train_timesteps)
            if self.t_start is not None and not self.t_start < T:
                raise ConfigError(f"{where}.t_start={self.t_start} is outside [0, {T}); pick a noise level inside the "
                                  f"schedule, e.g. {T // 4}.")
            if self.t_start is None and self.steps is not None and not self.steps <= T:
                raise ConfigError(f"{where}.steps={self.steps} is outside [1, {T}] (T = schedule.num_train_timesteps)"
                                  "; use e.g. 50 for DDIM or null for the full chain.")
            if self.t_start is not None and self.sampler != ONE_STEP:
                try:
                    make_partial_timesteps(self.t_start, self.steps)
                except ConfigError as e:
                    raise ConfigError(f"{where}.steps={self.steps} does not fit {where}.t_start={self.t_start}: "
                                      f"{e}") from None
        return self

    def require_unset(self, names: Iterable[str], owner: str, where: str = "model.sampling") -> None:
        """``ConfigError`` when a field ``owner`` does not use differs from :class:`SamplingConfig`'s default
        (a setting that would be silently ignored)."""
        defaults = {f.name: f.default for f in fields(SamplingConfig)}
        for name in names:
            value, default = getattr(self, name), defaults[name]
            if value != default:
                raise ConfigError(f"{where}.{name}={value!r} is not used by {owner}; remove it (or set {default!r}).")

    def with_changes(self: S, changes: dict[str, Any] | None, where: str = "model.val_sampling") -> S:
        """A copy with ``changes`` (a mapping of field names, e.g. ``model.val_sampling``) applied."""
        if not changes:
            return self
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"{where} has unknown keys {unknown}; use model.sampling fields: {sorted(known)}.")
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def with_precision(model_fn: Callable[..., torch.Tensor], precision: str | None, device_type: str,
                   dtype: torch.dtype, native_bf16: bool = False) -> Callable[..., torch.Tensor]:
    """``model_fn`` run under ``precision``, its output cast to ``dtype`` (``precision`` None: unchanged).

    ``"bf16"`` (``"16"``): bfloat16 (float16) autocast around the network call only; ``"32"``: autocast disabled there
    (float32 even when the caller runs under autocast, e.g. a bf16-mixed Lightning validation step); ``"auto"``: see
    :func:`network_dtype` (``native_bf16``: whether this CPU computes bf16 natively; the caller measures it).
    """
    if precision is None:
        return model_fn
    low = network_dtype(precision, device_type, native_bf16)

    def fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=low or torch.bfloat16, enabled=low is not None):
            out = model_fn(*args, **kwargs)
        return out.to(dtype)

    return fn


def network_dtype(precision: str, device_type: str, native_bf16: bool = False) -> torch.dtype | None:
    """Autocast dtype of a ``precision`` name on ``device_type`` (None = float32). ``auto``: bf16 on CUDA with bf16
    (else float16), bf16 on a CPU with native bf16 (``native_bf16``), float32 otherwise."""
    if str(precision) != AUTO:
        return PRECISIONS[str(precision)]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu":
        return torch.bfloat16 if native_bf16 else None
    return None
