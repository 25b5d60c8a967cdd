"""Reverse-process samplers (DDPM, DDIM), partial reconstructions, inversion and guidance, pure torch.

Every function takes a :class:`~meddiff.diffusion.schedule.NoiseSchedule` and, where a network is needed, a
``model_fn(x_t: [B, ...], t: LongTensor [B]) -> output`` whose output is interpreted according to
``schedule.prediction_type`` (epsilon, x0 or v).

Notation: ``ā_t`` is ``schedule.alpha_bar(t)``; the *previous* timestep ``s = prev_t`` is the next entry of the
(possibly respaced) descending timestep list, ``-1`` after the last one, with ``ā_{-1} = 1``. Using ``ā_s`` of the
respaced list (not ``ā_{t-1}``) is what makes respaced DDPM sampling correct.

Per-step scalar coefficients are Python floats computed in float64 from ``schedule.alpha_bar_float`` (no device
sync; no float32 cancellation in ``1 - ā`` near ``t = 0``, where diffusers loses ~1e-3 relative accuracy). Only
the tensors take the dtype of ``x_t``.

Long chains (:func:`sample`, :func:`reconstruct_from`, :func:`ddim_invert`) run under ``torch.no_grad()``; a
``model_fn`` that needs gradients (classifier guidance) can re-enable them locally with ``torch.enable_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from meddiff.diffusion.noise import gaussian_like
from meddiff.diffusion.schedule import NoiseSchedule
from meddiff.errors import ConfigError

__all__ = [
    "SPACINGS",
    "SAMPLERS",
    "VARIANCE_TYPES",
    "ModelFn",
    "make_timesteps",
    "make_partial_timesteps",
    "ddpm_step",
    "ddim_step",
    "sample",
    "reconstruct_from",
    "one_step_x0",
    "ddim_invert",
    "cfg_combine",
]

SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

ModelFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------- timesteps
def make_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading") -> Tensor:
    """Respaced inference timesteps, a descending LongTensor of length ``n = num_inference_steps``.

    With ``T = num_train_timesteps`` (same conventions as diffusers, Lin et al. 2023, Table 2):

    - ``"leading"``:  ``t_k = k * (T // n)`` for ``k = n-1 .. 0``        (T=1000, n=10: 900, 800, ..., 0)
    - ``"trailing"``: ``t_k = round(T - k * T / n) - 1`` for ``k = 0 .. n-1`` (999, 899, ..., 99)
    - ``"linspace"``: ``round(linspace(0, T - 1, n))`` reversed           (999, 888, ..., 111, 0)

    Rounding is half-to-even, as numpy's. Raises ConfigError for an unknown spacing or ``n`` outside ``[1, T]``.
    """
    T, n = int(num_train_timesteps), int(num_inference_steps)
    if spacing not in SPACINGS:
        raise ConfigError(f"timestep spacing={spacing!r} is not supported; choose one of {list(SPACINGS)}.")
    if T < 1:
        raise ConfigError(f"num_train_timesteps={T} must be >= 1.")
    if not 1 <= n <= T:
        raise ConfigError(
            f"num_inference_steps={n} is outside [1, {T}]; a model trained with {T} timesteps can be sampled "
            f"with at most {T} steps."
        )
    k = torch.arange(n, dtype=torch.float64)
    if spacing == "leading":
        ts = (k * (T // n)).flip(0)
    elif spacing == "trailing":
        # numpy's arange(T, 0, -T/n) evaluates start + k * ((start - T/n) - start); copy that exactly.
        delta = (T - T / n) - T
        ts = torch.round(T + k * delta) - 1
    else:
        if n == 1:
            ts = torch.zeros(1, dtype=torch.float64)
        else:
            vals = k * ((T - 1) / (n - 1))
            vals[-1] = T - 1
            ts = torch.round(vals).flip(0)
    return ts.to(torch.long)


def make_partial_timesteps(t_start: int, num_steps: int | None = None) -> Tensor:
    """Descending timesteps starting at ``t_start``, evenly spaced down towards 0 ("trailing" spacing).

    ``t_k = round((t_start + 1) - k * (t_start + 1) / num_steps) - 1`` for ``k = 0 .. num_steps-1``; the first
    value is always ``t_start``. ``num_steps=None`` (or ``t_start + 1``) gives every step ``t_start, ..., 0``;
    ``t_start=999, num_steps=10`` gives the trailing list ``999, 899, ..., 99``.
    """
    t_start = int(t_start)
    if t_start < 0:
        raise ConfigError(f"t_start={t_start} must be >= 0.")
    n = t_start + 1 if num_steps is None else int(num_steps)
    if not 1 <= n <= t_start + 1:
        raise ConfigError(
            f"num_steps={num_steps} is outside [1, {t_start + 1}] for t_start={t_start}; use at most one step per "
            "timestep (or None for every step)."
        )
    k = torch.arange(n, dtype=torch.float64)
    return (torch.round((t_start + 1) - k * ((t_start + 1) / n)) - 1).to(torch.long)


def _timestep_list(schedule: NoiseSchedule, timesteps: Tensor | Iterable[int], descending: bool) -> list[int]:
    ts = [int(t) for t in (timesteps.flatten().tolist() if isinstance(timesteps, Tensor) else timesteps)]
    if not ts:
        raise ConfigError("timesteps is empty; give at least one timestep (see make_timesteps).")
    T = schedule.num_train_timesteps
    for t in ts:
        if not 0 <= t < T:
            raise ConfigError(
                f"timestep {t} is outside [0, {T}); build timesteps with make_timesteps({T}, n)."
            )
    pairs = zip(ts, ts[1:])
    ok = all(a > b for a, b in pairs) if descending else all(a < b for a, b in pairs)
    if not ok:
        order = "descending" if descending else "ascending"
        raise ConfigError(f"timesteps must be strictly {order}; got {ts[:6]}{'...' if len(ts) > 6 else ''}.")
    return ts


def _check_t_start(schedule: NoiseSchedule, t_start: int) -> int:
    T = schedule.num_train_timesteps
    if isinstance(t_start, Tensor):
        t_start = t_start.item()
    if int(t_start) != t_start or not 0 <= int(t_start) < T:
        raise ConfigError(
            f"t_start={t_start} is outside [0, {T}); choose an integer timestep between 0 and {T - 1} "
            f"(e.g. {T // 2 - 1} for half of the chain)."
        )
    return int(t_start)


def _check_step(schedule: NoiseSchedule, t: int, prev_t: int) -> tuple[int, int]:
    t, prev_t = int(t), int(prev_t)
    T = schedule.num_train_timesteps
    if not 0 <= t < T:
        raise ConfigError(f"t={t} is outside [0, {T}); choose a timestep between 0 and {T - 1}.")
    if not -1 <= prev_t < t:
        raise ConfigError(
            f"prev_t={prev_t} must satisfy -1 <= prev_t < t={t}: the next entry of the descending timestep list, "
            "or -1 after the last one."
        )
    return t, prev_t


def _clip_range(clip_sample: float | bool | None) -> float | None:
    if clip_sample is None or clip_sample is False:
        return None
    if clip_sample is True:
        return 1.0
    c = float(clip_sample)
    if not c > 0:
        raise ConfigError(
            f"clip_sample={clip_sample} must be a positive range (e.g. 1.0), True, False or None."
        )
    return c


def _step_noise(noise: Tensor | None, generator, like: Tensor) -> Tensor:
    if noise is not None:
        if generator is not None:
            raise ConfigError("pass either noise or generator to a sampler step, not both.")
        return noise.to(device=like.device, dtype=like.dtype)
    return gaussian_like(like, generator=generator)


# ---------------------------------------------------------------------------------------------------- steps
def ddpm_step(
    schedule: NoiseSchedule,
    model_output: Tensor,
    t: int,
    prev_t: int,
    x_t: Tensor,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_sample: float | bool | None = None,
    variance_type: str = "fixed_small",
) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM step ``x_t -> x_s`` with ``s = prev_t`` (Ho et al. 2020, eq. 6-7, for any ``s < t``).

    With ``ā_t``, ``ā_s`` (``ā_{-1} = 1``), ``α = ā_t / ā_s`` and ``β = 1 - α`` (the effective beta of the
    respaced step)::

        x0^   = predict_x0(model_output, x_t, t)            (clamped to [-c, c] if clip_sample=c)
        mu    = sqrt(ā_s) β / (1 - ā_t) · x0^  +  sqrt(α) (1 - ā_s) / (1 - ā_t) · x_t
        var   = (1 - ā_s) / (1 - ā_t) · β  ("fixed_small", posterior variance, floored at 1e-20)  or  β ("fixed_large")
        x_s   = mu + sqrt(var) · z,   z ~ N(0, I); no noise on the last step (s = -1)

    (diffusers adds noise whenever ``t > 0``, i.e. also on a last step from ``t > 0`` as in trailing spacing, where
    the floored variance makes it ~1e-10 · z; the results agree.)

    Args:
        model_output: network output at ``(x_t, t)``, shape of ``x_t`` ``[B, ...]``.
        t, prev_t: current timestep and the next one of the descending list (``-1`` after the last).
        noise: ``z`` to use (else drawn from ``generator``, like diffusers' ``randn_tensor``).
        clip_sample: ``None``/``False`` (no clipping), ``True`` (= 1.0) or a positive range ``c``.

    Returns:
        ``(x_prev, x0_pred)``, both shaped like ``x_t``.
    """
    t, prev_t = _check_step(schedule, t, prev_t)
    if variance_type not in VARIANCE_TYPES:
        raise ConfigError(
            f"variance_type={variance_type!r} is not supported; choose one of {list(VARIANCE_TYPES)}."
        )
    clip = _clip_range(clip_sample)
    a_t = schedule.alpha_bar_float(t)
    a_s = schedule.alpha_bar_float(prev_t)
    alpha = a_t / a_s
    beta = 1.0 - alpha

    x0_pred = schedule.predict_x0(model_output, x_t, t)
    if clip is not None:
        x0_pred = x0_pred.clamp(-clip, clip)

    coef_x0 = math.sqrt(a_s) * beta / (1.0 - a_t)
    coef_xt = math.sqrt(alpha) * (1.0 - a_s) / (1.0 - a_t)
    x_prev = coef_x0 * x0_pred + coef_xt * x_t

    if prev_t >= 0:
        var = max((1.0 - a_s) / (1.0 - a_t) * beta, 1e-20) if variance_type == "fixed_small" else beta
        z = _step_noise(noise, generator, model_output)
        x_prev = x_prev + math.sqrt(var) * z
    return x_prev, x0_pred


def ddim_step(
    schedule: NoiseSchedule,
    model_output: Tensor,
    t: int,
    prev_t: int,
    x_t: Tensor,
    eta: float = 0.0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_sample: float | bool | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step ``x_t -> x_s`` with ``s = prev_t`` (Song et al. 2021, eq. 12)::

        x0^   = predict_x0(model_output, x_t, t)   (clamped if clip_sample; eps^ is taken before clipping,
        eps^  = predict_eps(model_output, x_t, t)   as diffusers does by default)
        sigma = eta · sqrt((1 - ā_s) / (1 - ā_t) · (1 - ā_t / ā_s))
        x_s   = sqrt(ā_s) x0^ + sqrt(1 - ā_s - sigma²) eps^ + sigma · z

    ``eta=0`` is deterministic (no noise is drawn); ``eta=1`` has DDPM's posterior variance. With ``eta > 0`` a ``z``
    is drawn at every step (also the last, where sigma = 0), as diffusers does, so seeded runs match it.

    Returns:
        ``(x_prev, x0_pred)``, both shaped like ``x_t``.
    """
    t, prev_t = _check_step(schedule, t, prev_t)
    if not eta >= 0:
        raise ConfigError(f"eta={eta} must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like noise).")
    clip = _clip_range(clip_sample)
    a_t = schedule.alpha_bar_float(t)
    a_s = schedule.alpha_bar_float(prev_t)

    x0_pred = schedule.predict_x0(model_output, x_t, t)
    eps_pred = schedule.predict_eps(model_output, x_t, t)
    if clip is not None:
        x0_pred = x0_pred.clamp(-clip, clip)

    var = (1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)
    sigma = eta * math.sqrt(var)
    dir_coef = math.sqrt(max(1.0 - a_s - sigma**2, 0.0))
    x_prev = math.sqrt(a_s) * x0_pred + dir_coef * eps_pred
    if eta > 0:
        z = _step_noise(noise, generator, model_output)
        x_prev = x_prev + sigma * z
    return x_prev, x0_pred


# ---------------------------------------------------------------------------------------------------- loops
def _progress(it: Sequence[int], enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


def _t_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Tensor | Sequence[int],
    sampler: str = "ddpm",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_sample: float | bool | None = None,
    progress: bool = False,
    noise_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Run the reverse chain over descending ``timesteps`` starting from ``x_T`` (noise at ``timesteps[0]``).

    For ``k = 0 .. n-1``: ``out = model_fn(x, t_k · 1_B)`` and ``x <- step(out, t_k, t_{k+1}, x)`` with
    ``t_n = -1``; ``step`` is :func:`ddpm_step` or :func:`ddim_step` (``eta`` only affects DDIM).

    ``noise_fn(x) -> z`` replaces the Gaussian step noise (e.g. ``lambda x: make_noise("simplex", x, g)`` for
    AnoDDPM); it is called only on steps that add noise, and ``generator`` is then not used for step noise.

    Returns:
        the final sample ``x_0`` (shape of ``x_T``).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler!r} is not supported; choose one of {list(SAMPLERS)}.")
    ts = _timestep_list(schedule, timesteps, descending=True)
    x = x_T
    for i in _progress(range(len(ts)), progress, f"{sampler} sampling"):
        t = ts[i]
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        out = model_fn(x, _t_batch(t, x))
        adds_noise = prev_t >= 0 if sampler == "ddpm" else eta > 0
        z = noise_fn(out) if (noise_fn is not None and adds_noise) else None
        g = None if noise_fn is not None else generator
        if sampler == "ddpm":
            x, _ = ddpm_step(schedule, out, t, prev_t, x, noise=z, generator=g, clip_sample=clip_sample)
        else:
            x, _ = ddim_step(
                schedule, out, t, prev_t, x, eta=eta, noise=z, generator=g, clip_sample=clip_sample
            )
    return x


@torch.no_grad()
def reconstruct_from(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    t_start: int,
    num_steps: int | None = None,
    sampler: str = "ddim",
    eta: float = 0.0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_sample: float | bool | None = None,
    progress: bool = False,
    noise_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Partial diffusion + denoising (SDEdit / AnoDDPM-style reconstruction).

    ``x_{t_start} = q_sample(x0, t_start, noise)`` (``noise`` given, else ``noise_fn(x0)`` if given, else drawn
    from ``generator``), then :func:`sample` over ``make_partial_timesteps(t_start, num_steps)``: ``t_start``
    and evenly spaced timesteps below it (``num_steps=None``: every step ``t_start, ..., 0``). For AnoDDPM pass
    ``noise_fn=lambda x: make_noise("simplex", x, g)`` so both the forward and the step noise are simplex.

    Returns:
        the reconstruction, shaped like ``x0``.
    """
    t_start = _check_t_start(schedule, t_start)
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler!r} is not supported; choose one of {list(SAMPLERS)}.")
    ts = make_partial_timesteps(t_start, num_steps)
    if noise is None:
        noise = noise_fn(x0) if noise_fn is not None else gaussian_like(x0, generator=generator)
    x_t = schedule.q_sample(x0, _t_batch(t_start, x0), noise)
    return sample(
        model_fn,
        schedule,
        x_t,
        ts,
        sampler=sampler,
        eta=eta,
        generator=generator,
        clip_sample=clip_sample,
        progress=progress,
        noise_fn=noise_fn,
    )


def one_step_x0(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    t_start: int,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """pDDPM-style reconstruction: a single forward pass at ``t_start``.

    ``x_t = q_sample(x0, t_start, noise)``; returns ``predict_x0(model_fn(x_t, t_start), x_t, t_start)``
    (for an x0-predicting model simply its output). Runs with the caller's grad mode.
    """
    t_start = _check_t_start(schedule, t_start)
    if noise is None:
        noise = gaussian_like(x0, generator=generator)
    tb = _t_batch(t_start, x0)
    x_t = schedule.q_sample(x0, tb, noise)
    return schedule.predict_x0(model_fn(x_t, tb), x_t, tb)


@torch.no_grad()
def ddim_invert(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    timesteps_ascending: Tensor | Sequence[int],
    progress: bool = False,
) -> Tensor:
    """Deterministic DDIM inversion (the eta=0 ODE run forwards) of ``x0`` to the last timestep.

    Starting from ``x = x0`` at ``s = -1`` (``ā_s = 1``), for each ``t`` of the ascending list::

        eps^ = predict_eps(model_fn(x, t), x, t)          (model evaluated at the target timestep, as
        x0^  = (x - sqrt(1 - ā_s) eps^) / sqrt(ā_s)        diffusers' DDIMInverseScheduler does)
        x    = sqrt(ā_t) x0^ + sqrt(1 - ā_t) eps^,   s <- t

    Running :func:`sample` with ``sampler="ddim", eta=0`` over the same timesteps reversed maps the result back to
    approximately ``x0`` (exactly when the model's epsilon does not depend on ``x``/``t``).

    Returns:
        ``x_{t_last}``, shaped like ``x0``.
    """
    ts = _timestep_list(schedule, timesteps_ascending, descending=False)
    x = x0
    a_s = schedule.alpha_bar_float(-1)
    for t in _progress(ts, progress, "ddim inversion"):
        a_t = schedule.alpha_bar_float(t)
        out = model_fn(x, _t_batch(t, x))
        eps = schedule.predict_eps(out, x, t)
        x0_pred = (x - math.sqrt(1.0 - a_s) * eps) / math.sqrt(a_s)
        x = math.sqrt(a_t) * x0_pred + math.sqrt(1.0 - a_t) * eps
        a_s = a_t
    return x


def cfg_combine(out_uncond: Tensor, out_cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``out_uncond + w · (out_cond - out_uncond)``.

    ``w = 1`` returns the conditional output, ``w = 0`` the unconditional one, ``w > 1`` extrapolates towards the
    condition. Works for eps, x0 or v outputs alike (all are affine in the score).
    """
    return out_uncond + guidance_scale * (out_cond - out_uncond)
