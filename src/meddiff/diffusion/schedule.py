"""Discrete-time Gaussian diffusion schedule (DDPM forward process), pure torch.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021; Salimans & Ho 2022):

- ``beta_t`` for ``t = 0 .. T-1`` is the per-step noise variance, ``alpha_t = 1 - beta_t``;
- ``alpha_bar_t = prod_{s <= t} alpha_s`` (``ā_t``), so that the forward marginal is
  ``q(x_t | x_0) = N(sqrt(ā_t) x_0, (1 - ā_t) I)``, i.e. ``x_t = sqrt(ā_t) x_0 + sqrt(1 - ā_t) eps``;
- the velocity is ``v = sqrt(ā_t) eps - sqrt(1 - ā_t) x_0``;
- the signal-to-noise ratio is ``snr_t = ā_t / (1 - ā_t)``.

Timesteps are 0-based as in diffusers: ``t = 0`` is the least noisy step, ``t = T-1`` the noisiest; ``ā`` of the
virtual step ``t = -1`` (the clean data) is 1.

All tables are float32 buffers (``betas`` exactly as diffusers builds them; the products and square roots are
computed in float64 and then cast). Methods gather coefficients and cast them *locally* to the input's dtype, so a
bf16/fp16 call never degrades the tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from meddiff.errors import ConfigError

__all__ = ["NoiseSchedule", "BETA_SCHEDULES", "PREDICTION_TYPES", "canonical_prediction_type"]

#: Accepted ``beta_schedule`` names. ``"squaredcos_cap_v2"`` is accepted as an alias of ``"cosine"``.
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "custom")
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}

#: Canonical prediction types and their accepted aliases.
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_PREDICTION_ALIASES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "sample": "sample",
    "x0": "sample",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
}


def canonical_prediction_type(name: str) -> str:
    """Map ``name`` (``"epsilon"|"eps"``, ``"sample"|"x0"``, ``"v_prediction"|"v"``) to its canonical form.

    Raises:
        ConfigError: for any other name.
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in _PREDICTION_ALIASES:
        raise ConfigError(
            f"prediction_type={name!r} is not supported; choose one of "
            f"{sorted(_PREDICTION_ALIASES)} (canonical: {list(PREDICTION_TYPES)})."
        )
    return _PREDICTION_ALIASES[key]


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Squared-cosine ("squaredcos_cap_v2", Nichol & Dhariwal 2021) betas, float64 math, float32 result.

    ``f(s) = cos(((s + 0.008) / 1.008) * pi / 2) ** 2`` and ``beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta)``.
    """
    steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return betas.to(torch.float32)


class NoiseSchedule(nn.Module):
    """Noise schedule of a discrete DDPM with ``T = num_train_timesteps`` steps.

    Args:
        num_train_timesteps: ``T >= 1``.
        beta_schedule: ``"linear"`` (float32 ``linspace(beta_start, beta_end, T)``), ``"scaled_linear"``
            (``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` in float32), ``"cosine"`` (alias
            ``"squaredcos_cap_v2"``; ``beta_start``/``beta_end`` are ignored) or ``"custom"`` (``trained_betas``).
        beta_start, beta_end: end points of the linear schedules.
        trained_betas: the ``T`` betas of a ``"custom"`` schedule, each in ``(0, 1]``.
        prediction_type: what the network predicts: ``"epsilon"`` (alias ``"eps"``), ``"sample"`` (alias
            ``"x0"``) or ``"v_prediction"`` (alias ``"v"``). Stored in canonical form.

    Buffers (float32, shape ``[T]``, non-persistent: they follow ``.to(device)`` but are rebuilt from the config
    rather than saved in checkpoints): ``betas``, ``alphas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``.

    Timestep arguments ``t`` are a LongTensor ``[B]`` (one timestep per batch item), a 0-d tensor or a Python
    int; coefficients are broadcast over the trailing dimensions of the data (``[B, C, H, W]`` or ``[B, C, D, H,
    W]``).
    """

    final_alpha_cumprod: float = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        trained_betas: Sequence[float] | Tensor | None = None,
        prediction_type: str = "epsilon",
    ) -> None:
        super().__init__()
        if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) != num_train_timesteps:
            raise ConfigError(f"num_train_timesteps={num_train_timesteps!r} must be an integer >= 1.")
        num_train_timesteps = int(num_train_timesteps)
        if num_train_timesteps < 1:
            raise ConfigError(
                f"num_train_timesteps={num_train_timesteps} must be >= 1 (typical values: 1000, 4000)."
            )
        name = _SCHEDULE_ALIASES.get(beta_schedule, beta_schedule)
        if name not in BETA_SCHEDULES:
            raise ConfigError(
                f"beta_schedule={beta_schedule!r} is not supported; choose one of {list(BETA_SCHEDULES)} "
                f"(or the alias 'squaredcos_cap_v2' for 'cosine')."
            )
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = name
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.prediction_type = canonical_prediction_type(prediction_type)

        if name == "custom":
            betas = self._custom_betas(trained_betas, num_train_timesteps)
        else:
            if trained_betas is not None:
                raise ConfigError(
                    f"trained_betas was given with beta_schedule={beta_schedule!r}; set beta_schedule='custom' "
                    "to use them, or drop trained_betas."
                )
            if name == "linear":
                betas = torch.linspace(
                    self.beta_start, self.beta_end, num_train_timesteps, dtype=torch.float32
                )
            elif name == "scaled_linear":
                betas = (
                    torch.linspace(
                        self.beta_start**0.5, self.beta_end**0.5, num_train_timesteps, dtype=torch.float32
                    )
                    ** 2
                )
            else:  # cosine
                betas = _cosine_betas(num_train_timesteps)
            if not (0.0 < float(betas.min()) and float(betas.max()) <= 1.0):
                raise ConfigError(
                    f"beta_start={beta_start}, beta_end={beta_end} give betas outside (0, 1]; "
                    "choose 0 < beta_start <= beta_end <= 1 (e.g. 1e-4 and 0.02)."
                )

        self._betas_f32 = betas.detach().to(device="cpu", dtype=torch.float32).clone()
        # float64 ā on CPU (plain attribute, not a buffer: float64 is unsupported on some devices) for the
        # scalar coefficients of sampler steps, where 1 - ā near t = 0 suffers cancellation in float32.
        self._alphas_cumprod_f64 = torch.cumprod(1.0 - self._betas_f32.double(), dim=0)
        for key, table in self._build_tables(self._betas_f32).items():
            self.register_buffer(key, table, persistent=False)

    _TABLES = ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")

    @staticmethod
    def _build_tables(betas: Tensor) -> dict[str, Tensor]:
        """The float32 tables from float32 ``betas``: ``alpha = 1 - beta``, ``ā = cumprod(alpha)`` and the square
        roots, computed in float64 and cast once."""
        b64 = betas.to(torch.float64)
        alphas = 1.0 - b64
        ac = torch.cumprod(alphas, dim=0)
        out = {
            "betas": b64,
            "alphas": alphas,
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        }
        return {k: v.to(torch.float32) for k, v in out.items()}

    def _apply(self, fn, *args, **kwargs):
        """Let ``.to(device)``/``.cuda()`` move the tables but keep them float32 under dtype casts.

        ``module.to(torch.bfloat16)`` (e.g. Lightning's ``bf16-true`` precision) would otherwise round ``ā`` to
        three significant digits (``1 - ā_0`` becomes 0); the tables are rebuilt exactly instead.
        """
        super()._apply(fn, *args, **kwargs)
        tables = None
        for key in self._TABLES:
            buf = self._buffers.get(key)
            if buf is not None and buf.dtype != torch.float32:
                if tables is None:
                    tables = self._build_tables(self._betas_f32)
                self._buffers[key] = tables[key].to(buf.device)
        return self

    @staticmethod
    def _custom_betas(trained_betas, num_train_timesteps: int) -> Tensor:
        if trained_betas is None:
            raise ConfigError(
                "beta_schedule='custom' needs trained_betas: pass a list of num_train_timesteps betas in (0, 1]."
            )
        betas = torch.as_tensor(trained_betas, dtype=torch.float32).flatten()
        if betas.numel() != num_train_timesteps:
            raise ConfigError(
                f"trained_betas has {betas.numel()} values but num_train_timesteps={num_train_timesteps}; "
                "give exactly one beta per training timestep."
            )
        if not bool(torch.isfinite(betas).all()) or float(betas.min()) <= 0.0 or float(betas.max()) > 1.0:
            raise ConfigError(
                f"trained_betas must lie in (0, 1]; got min={float(betas.min())}, max={float(betas.max())}."
            )
        return betas

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return (
            f"num_train_timesteps={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, "
            f"prediction_type={self.prediction_type!r}"
        )

    def __len__(self) -> int:
        return self.num_train_timesteps

    def _as_index(self, t: Tensor | int) -> Tensor:
        """``t`` as a long tensor on the tables' device."""
        if isinstance(t, Tensor):
            if t.is_floating_point() or t.is_complex():
                raise ConfigError(f"timesteps must be integers (a LongTensor), got dtype {t.dtype}.")
            return t.to(device=self.alphas_cumprod.device, dtype=torch.long)
        return torch.as_tensor(int(t), dtype=torch.long, device=self.alphas_cumprod.device)

    def check_timesteps(self, t: Tensor | int, name: str = "t") -> None:
        """Raise :class:`ConfigError` unless every value of ``t`` lies in ``[0, T)``."""
        idx = self._as_index(t)
        if idx.numel() == 0:
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.num_train_timesteps:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"{name}={bad} is outside [0, {self.num_train_timesteps}); choose a timestep between 0 and "
                f"{self.num_train_timesteps - 1}."
            )

    def _coef(self, table: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
        """Gather ``table[t]`` and shape/cast it to broadcast against ``like`` (``[B, ...]``).

        ``t`` of shape ``[B]`` becomes ``[B, 1, ..., 1]``; a 0-d/int ``t`` becomes a 0-d tensor. The table itself
        is never modified.
        """
        idx = self._as_index(t)
        c = table[idx]
        if c.dim() == 1:
            c = c.reshape(c.shape[0], *([1] * (like.dim() - 1)))
        return c.to(device=like.device, dtype=like.dtype)

    # ------------------------------------------------------------------ tables
    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """``ā_t`` as float32, same shape as ``t``; ``t < 0`` (the clean data) gives ``final_alpha_cumprod = 1``.

        Raises ConfigError for ``t >= T``.
        """
        idx = self._as_index(t)
        if idx.numel() and int(idx.max()) >= self.num_train_timesteps:
            raise ConfigError(
                f"t={int(idx.max())} is outside [-1, {self.num_train_timesteps}); alpha_bar takes timesteps "
                f"below {self.num_train_timesteps} (negative means the clean sample, ā=1)."
            )
        vals = self.alphas_cumprod[idx.clamp(min=0)]
        return torch.where(idx < 0, torch.full_like(vals, self.final_alpha_cumprod), vals)

    def alpha_bar_float(self, t: int) -> float:
        """``ā_t`` of one integer timestep as a Python float computed in float64 (``t < 0`` gives 1.0).

        Used by the samplers for their per-step scalar coefficients (no device sync, no float32 cancellation in
        ``1 - ā``).
        """
        t = int(t)
        if t >= self.num_train_timesteps:
            raise ConfigError(
                f"t={t} is outside [-1, {self.num_train_timesteps}); alpha_bar takes timesteps below "
                f"{self.num_train_timesteps} (negative means the clean sample, ā=1)."
            )
        return self.final_alpha_cumprod if t < 0 else float(self._alphas_cumprod_f64[t])

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ``ā_t / (1 - ā_t)`` (float32, same shape as ``t``)."""
        self.check_timesteps(t)
        ac = self.alphas_cumprod[self._as_index(t)]
        return ac / (1.0 - ac)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """Sample the forward marginal: ``x_t = sqrt(ā_t) x0 + sqrt(1 - ā_t) noise``.

        Args:
            x0: clean data ``[B, ...]``.
            t: LongTensor ``[B]`` (or int), each in ``[0, T)``.
            noise: ``eps ~ N(0, I)`` (or simplex noise), same shape as ``x0``.

        Returns:
            ``x_t`` with the shape and dtype of ``x0``.
        """
        self.check_timesteps(t)
        a = self._coef(self.sqrt_alphas_cumprod, t, x0)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * x0 + s * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Velocity target ``v = sqrt(ā_t) noise - sqrt(1 - ā_t) x0`` (Salimans & Ho 2022), shape of ``x0``."""
        self.check_timesteps(t)
        a = self._coef(self.sqrt_alphas_cumprod, t, x0)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * noise - s * x0

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Regression target of the network for ``x_t = q_sample(x0, t, noise)``.

        ``noise`` for ``"epsilon"``, ``x0`` for ``"sample"`` and ``velocity(x0, noise, t)`` for ``"v_prediction"``.
        """
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.velocity(x0, noise, t)

    # ------------------------------------------------------------------ conversions
    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Predicted clean sample from the network output at ``(x_t, t)``.

        - epsilon: ``x0 = (x_t - sqrt(1 - ā_t) eps) / sqrt(ā_t)``
        - sample:  ``x0 = model_output``
        - v:       ``x0 = sqrt(ā_t) x_t - sqrt(1 - ā_t) v``
        """
        if self.prediction_type == "sample":
            return model_output
        a = self._coef(self.sqrt_alphas_cumprod, t, x_t)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * model_output) / a
        return a * x_t - s * model_output

    def predict_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Predicted noise from the network output at ``(x_t, t)``.

        - epsilon: ``eps = model_output``
        - sample:  ``eps = (x_t - sqrt(ā_t) x0) / sqrt(1 - ā_t)``
        - v:       ``eps = sqrt(ā_t) v + sqrt(1 - ā_t) x_t``
        """
        if self.prediction_type == "epsilon":
            return model_output
        a = self._coef(self.sqrt_alphas_cumprod, t, x_t)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction_type == "sample":
            return (x_t - a * model_output) / s
        return a * model_output + s * x_t

    def predict_v(self, model_output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Predicted velocity ``v = sqrt(ā_t) eps - sqrt(1 - ā_t) x0`` from the network output at ``(x_t, t)``."""
        if self.prediction_type == "v_prediction":
            return model_output
        a = self._coef(self.sqrt_alphas_cumprod, t, x_t)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return a * self.predict_eps(model_output, x_t, t) - s * self.predict_x0(model_output, x_t, t)
