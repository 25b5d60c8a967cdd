"""The selection step of the denoise protocol: everything chosen, on validation (and training) data only.

- the supervised U-Net baseline is fitted on the training pairs (:mod:`meddiff.protocols.denoise.baseline`);
- at every noise level the NLM ``h`` factor is chosen on ``val_patches`` validation patches (evenly spread);
- at the trained level(s) every method is also scored on those patches: the validation means behind the choices
  and verdicts of the quality bar (best DDIM, model sampler, best classical baseline; :mod:`.report`).

The DataModule is seen through :class:`meddiff.protocols.base.ValidationView` (asking it for test data raises).
Each choice reads through a view of its own, so its ``chosen_on`` is derived from the splits *it* read.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.errors import ConfigError
from meddiff.metrics import denoisers
from meddiff.protocols.base import ValidationView
from meddiff.protocols.denoise.methods import (
    VAL_SEED_OFFSET,
    MethodContext,
    agg,
    apply_method,
    batch_seed,
    mask_for,
    nlm_denoise,
    scores,
)
from meddiff.protocols.denoise.options import (
    CLASSICAL,
    DDIM_BUDGET,
    DDIM_TOLERANCE_DB,
    HIGHER_IS_BETTER,
    METRICS,
    DenoiseEvalOptions,
    bm3d_status,
    ddim_by_steps,
    method_names,
    trained_noise_levels,
)

log = logging.getLogger(__name__)

_SPLIT_WORD = {"train": "train", "val": "validation", "test": "test"}

#: validation means closer than this (dB of PSNR) are a tie, won by the earlier (cheaper) candidate: a choice
#: must not hinge on float noise (e.g. DDIM samplers that agree to 1e-5 dB)
TIE_DB = 1e-3


def chosen_on(splits_read: Sequence[str]) -> str | None:
    """``["train", "val"]`` -> ``"train+validation"`` (the words reports use); None when nothing was read."""
    return "+".join(_SPLIT_WORD.get(s, s) for s in splits_read) or None


@dataclass
class LevelChoice:
    """Everything chosen at one noise level, on validation patches (what :func:`choose_at_level` returns)."""

    chosen_on: str | None  # derived from the splits the choice read ("validation"); None = read nothing
    n_patches: int
    h_factor: float | None
    nlm: dict[str, Any]
    means: dict[str, dict[str, float]]  # method -> metric -> mean over the validation patches
    bar: dict[str, Any] = field(default_factory=dict)  # the quality bar's choices and verdict (:func:`bar_choices`)


@dataclass
class DenoiseSelection:
    """What the selection step hands to the test pass."""

    T: int  # the model's training timesteps (the DDPM chain's length)
    trained: list[float]  # the trained noise level(s): the quality bar applies there
    levels: list[float]  # the evaluated noise levels
    methods: list[str]
    use_bm3d: bool
    levels_chosen: dict[str, LevelChoice]  # level key (``f"{level:g}"``) -> the choices made there
    sup_model: torch.nn.Module | None = None
    supervised_info: dict[str, Any] | None = None
    splits_read: list[str] = field(default_factory=list)  # every split the selection step read

    def in_bar(self, level: float) -> bool:
        """Whether ``level`` lies in the trained range (the quality bar's choices and verdicts are made there)."""
        return min(self.trained) - 1e-9 <= level <= max(self.trained) + 1e-9


def select_on_validation(model: Any, data: ValidationView, opts: DenoiseEvalOptions, device: torch.device,
                         baseline_dir: Path) -> DenoiseSelection:
    """Fit the supervised baseline (training pairs) and make every choice at every level (validation patches)."""
    T = int(model.schedule.num_train_timesteps)
    bad = [n for n in opts.ddim_steps if n > T]
    if bad:
        raise ConfigError(f"eval.ddim_steps {bad} exceed the model's T={T} timesteps; use steps <= {T}.")
    trained = trained_noise_levels(data.noise_std)
    levels = opts.noise_levels or trained
    use_bm3d = opts.bm3d and denoisers.available()
    if not use_bm3d:
        log.warning("BM3D %s", bm3d_status(opts, use_bm3d))
    methods = method_names(opts, use_bm3d)
    # each choice reads through a view of the view: its splits_read is what that choice read (the outer view
    # records everything selection read, and both refuse the test split)
    sup_model, sup_info = fit_supervised(model, ValidationView(data), opts, device, baseline_dir)
    sel = DenoiseSelection(T, trained, [float(x) for x in levels], methods, use_bm3d, {}, sup_model, sup_info)
    for li, level in enumerate(sel.levels):
        ctx = MethodContext(model, opts, level, li, device, sup_model)
        sel.levels_chosen[f"{level:g}"] = choose_at_level(ValidationView(data), ctx,
                                                          methods if sel.in_bar(level) else [])
    sel.splits_read = data.splits_read
    return sel


def fit_supervised(model: Any, data: ValidationView, opts: DenoiseEvalOptions, device: torch.device,
                   baseline_dir: Path) -> tuple[torch.nn.Module | None, dict[str, Any] | None]:
    """The supervised U-Net on the training pairs (cached in ``baseline_dir``); ``(None, None)`` when disabled.

    ``info["chosen_on"]`` records the splits its weights were fitted on (``"train"``)."""
    if not opts.supervised.enabled:
        return None, None
    from meddiff.protocols.denoise.baseline import load_or_train_supervised

    net_cfg = opts.supervised.net
    if not net_cfg:
        raise ConfigError(
            "eval.supervised.net is not set: give the supervised U-Net's net config (configs/eval/denoise.yaml "
            "uses ${net}, the experiment's net), or set eval.supervised.enabled=false."
        )
    train = data.noisy_dataset("train")
    info = train.info  # the patch file's info: the same for every split
    data_id = {"path": str(Path(info.path).resolve()), "sha256": list(info.sha256),
               "train_volumes": list(train.volumes), "noise_std": data.noise_std,
               "batch_size": getattr(data, "batch_size", None)}
    sup_model, sup_info = load_or_train_supervised(
        opts.supervised.cache_dir or baseline_dir, net_cfg, data.train_dataloader(), data_id,
        in_channels=int(getattr(model, "cond_channels", 1)), out_channels=int(getattr(model, "image_channels", 1)),
        steps=opts.supervised.steps, lr=opts.supervised.lr, loss=opts.supervised.loss,
        residual=opts.supervised.residual, device=device, seed=opts.seed, progress=opts.progress,
    )
    return sup_model, {**sup_info, "chosen_on": chosen_on(data.splits_read)}


def choose_at_level(view: ValidationView, ctx: MethodContext, methods: Sequence[str]) -> LevelChoice:
    """Choose the NLM factor and score ``methods`` on (up to ``val_patches``) validation patches at ``ctx.level``.

    ``view`` is the DataModule as :class:`ValidationView`: asking it for the test split raises, and what it read
    (``view.splits_read``) is what ``chosen_on`` reports.
    """
    opts, level = ctx.opts, ctx.level
    if not opts.nlm and not methods:
        return LevelChoice(None, 0, None, {}, {})  # nothing to choose at this level
    val = view.noisy_dataset("val", noise_std=level)
    clean = cond = None
    if len(val) > 0:
        idx = np.unique(np.linspace(0, len(val) - 1, min(opts.val_patches, len(val))).round().astype(int))
        items = [val[int(i)] for i in idx]
        clean = torch.stack([it["image"] for it in items])
        cond = torch.stack([it["cond"] for it in items])
    on = chosen_on(view.splits_read) if clean is not None else None
    nlm: dict[str, Any] = {}
    h_factor = None
    if opts.nlm:
        if clean is None:
            log.warning("no validation patches: NLM uses h = 0.8 sigma (scikit-image's recommendation)")
            h_factor, grid = 0.8, {}
        else:
            h_factor, grid = choose_nlm_h(clean, cond.numpy(), level, opts)
        nlm = {"h_factor": h_factor, "h": h_factor * level, "val_psnr_by_h_factor": grid, "chosen_on": on}
    means: dict[str, dict[str, float]] = {}
    if clean is not None and methods:
        ctx.h_factor = h_factor
        means = score_patches(clean, cond, methods, ctx, seed_offset=VAL_SEED_OFFSET,
                              desc=f"validation sigma={level:g}")
    return LevelChoice(on, 0 if clean is None else len(clean), h_factor, nlm, means, bar_choices(means))


def bar_choices(means: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The quality bar's choices from the validation ``means`` (method -> metric -> mean); {} without any.

    - ``best_ddim_le_50``: the DDIM with <= 50 steps of best validation PSNR, and the verdict
      ``ddim_within_0.5db_of_ddpm`` (``val_ddpm_minus_best_ddim_psnr_db``);
    - ``model_method``: the diffusion method compared with the baselines (``ddpm``, else the best DDIM);
    - ``best_classical``: noisy / NLM / BM3D with the best validation PSNR.
    """
    if not means:
        return {}
    out: dict[str, Any] = {}
    ddims = [m for m in ddim_by_steps(list(means)) if int(m.split("_")[1]) <= DDIM_BUDGET]
    best_ddim = best(means, ddims)
    if best_ddim is not None and "ddpm" in means:
        val_gap = means["ddpm"]["psnr"] - means[best_ddim]["psnr"]
        out["best_ddim_le_50"] = best_ddim
        out["val_ddpm_minus_best_ddim_psnr_db"] = val_gap
        out["ddim_within_0.5db_of_ddpm"] = bool(val_gap <= DDIM_TOLERANCE_DB)
    out["model_method"] = "ddpm" if "ddpm" in means else best(means, ddim_by_steps(list(means)))
    out["best_classical"] = best(means, [m for m in CLASSICAL if m in means])
    return out


def choose_nlm_h(clean: torch.Tensor, noisy: np.ndarray, level: float, opts: DenoiseEvalOptions
                 ) -> tuple[float, dict[str, float]]:
    """The NLM ``h`` factor with the best mean PSNR on the validation patches ``clean``/``noisy [N, C, P, P]``."""
    mask = mask_for(clean, opts)
    grid: dict[str, float] = {}
    for h in opts.nlm_h_factors:
        pred = torch.from_numpy(nlm_denoise(noisy, level, h, opts.nlm_patch_size, opts.nlm_patch_distance))
        grid[f"{h:g}"] = agg([scores(clean, pred, mask, opts.dynamic_range)["psnr"]])[0]
    best_h = max(grid, key=lambda k: -math.inf if math.isnan(grid[k]) else grid[k])
    return float(best_h), grid


def score_patches(clean: torch.Tensor, cond: torch.Tensor, methods: Sequence[str], ctx: MethodContext,
                  seed_offset: int, desc: str) -> dict[str, dict[str, float]]:
    """Mean of each metric of each method over the patches ``clean``/``cond [N, C, P, P]`` (in batches)."""
    from tqdm.auto import tqdm

    opts = ctx.opts
    per: dict[str, dict[str, list[np.ndarray]]] = {m: defaultdict(list) for m in methods}
    starts = range(0, len(clean), opts.batch_size)
    bar = tqdm(total=len(starts) * len(methods), desc=desc, unit="method x batch", leave=False,
               disable=not opts.progress)
    for bi, start in enumerate(starts):
        c = clean[start:start + opts.batch_size].to(ctx.device)
        x = cond[start:start + opts.batch_size].to(ctx.device)
        mask = mask_for(c, opts)
        for m in methods:
            pred = apply_method(m, x, ctx, seed_offset + batch_seed(ctx, bi))
            for k, v in scores(c, pred, mask, opts.dynamic_range).items():
                per[m][k].append(v)
            bar.update(1)
    bar.close()
    return {m: {k: agg(per[m][k])[0] for k in METRICS} for m in methods}


def best(means: Mapping[str, Mapping[str, float]], candidates: Sequence[str], metric: str = "psnr") -> str | None:
    """The candidate with the best finite ``metric`` mean, the first within ``TIE_DB`` of it; None if none."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    vals = {m: sign * means[m][metric] for m in candidates if m in means and math.isfinite(means[m][metric])}
    if not vals:
        return None
    top = max(vals.values())
    return next(m for m in vals if vals[m] >= top - TIE_DB)
