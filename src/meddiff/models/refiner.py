"""``RefinerDiffusion``: a residual diffusion refiner on top of a frozen coarse generator (Brainomaly-Diff, seed 003,
done the way working refiners do it: SR3 / ResShift / CorrDiff).

- **Coarse**: the frozen ``CoarseGenerator``'s healthy estimate ``c = tanh(x + G(x))``, loaded weights-only from
  ``coarse_ckpt`` (a ``.ckpt`` or a coarse run dir, whose AUCp-selected checkpoint is used; ``meddiff.models.frozen``).
- **Training** on known-healthy images only: the target is the residual ``r = (x - c) / s`` (``s`` =
  ``residual_scale``; ``"auto"`` = the std of the residual on the first training batch, stored in the checkpoint),
  diffused with the schedule (eps / x0 / v as ``schedule.prediction_type`` says). The network sees
  ``cat([r_t, c])`` (2 channels for grayscale) and the real timestep ``t`` (MONAI ``DiffusionModelUNet``'s
  embedding). Loss, optimizer, LR schedule and EMA are ``DiffusionModule``'s.
- **Inference**: ``refined = c + s * r0`` with ``r0`` sampled by DDIM or DDPM in ``sampling.steps`` (1-50), either
  from pure noise at ``T`` (``t_start: null``, "trailing" spacing so the first step is ``T - 1``) or, SDEdit-style,
  from the observed residual ``(x - c) / s`` noised to ``t_start``. ``reconstruct(batch)`` returns ``refined``, so the
  one anomaly scorer and the protocols apply unchanged; :meth:`coarse` and :meth:`refine` let a protocol score the
  coarse and refined estimates of the same images.

Validation: ``val/loss`` on known-healthy images, ``val/aucp`` (label-free) and, with a labelled pool,
``val/auroc`` from a refinement with ``model.val_sampling`` (the one anomaly-validation component,
``meddiff.models.validation``).

The refiner's checkpoints hold the generator's weights and (in the stored config) its architecture, so evaluating a
refiner needs no coarse checkpoint file.
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from meddiff.diffusion import SAMPLERS, make_noise, make_timesteps, reconstruct_from, sample
from meddiff.diffusion.sampling import SamplingConfig
from meddiff.errors import ConfigError, DataError
from meddiff.models.base import DiffusionModule
from meddiff.models.conditional import net_in_channels
from meddiff.models.frozen import frozen_first_stage, plain
from meddiff.models.validation import AnomalyValidation
from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY

log = logging.getLogger(__name__)

#: ``model.sampling`` fields the refiner does not use (it clips the residual at 2 / s itself, one draw)
_UNUSED = ("clip", "draws", "precision", "noise")


class RefinerDiffusion(DiffusionModule):
    """Residual diffusion refiner of a frozen coarse generator's healthy estimate.

    Args (besides :class:`~meddiff.models.base.DiffusionModule`'s ``net, schedule, optimizer, lr_scheduler, loss,
    huber_delta, t_range, noise, ema_decay, scoring, compile``):
        coarse_ckpt: ``CoarseGenerator`` checkpoint file or coarse run dir (needed to train; optional when
            ``coarse_net`` is given and the weights come from this model's own checkpoint).
        coarse_net: the generator's architecture ``{"class": ..., "kwargs": {...}}`` (written into this model's
            checkpoints automatically; no ``_target_``, so Hydra never instantiates it).
        image_channels: image channels ``C``; ``net.in_channels`` must be ``2 C`` (residual + coarse).
        residual_scale: ``s`` in ``r = (x - c) / s``: a positive number or ``"auto"``.
        scoring: :class:`~meddiff.anomaly.scoring.ScoringConfig` fields of the validation scores.
        aucp_rho: share of healthy images in the unannotated pool, if known (``val/aucp_debiased``).

    ``model.sampling``: ``sampler`` ddim | ddpm, ``steps`` (1-50), ``eta``, ``t_start`` (``None`` = sample the residual
    from pure noise; an int = SDEdit from the observed residual at ``t_start``), ``spacing`` (of the pure-noise
    chain; ``trailing`` starts at ``T - 1``), ``seed``. ``model.val_sampling`` (e.g. ``{steps: 4}``) changes it for
    validation; ``model.val_batches``: validation batches scored per pool (``None`` = all).
    """

    eval_protocol: str = "refiner"

    sampling_defaults = {"sampler": "ddim", "steps": 10, "spacing": "trailing"}

    def __init__(
        self,
        net: nn.Module,
        schedule: nn.Module,
        *args: Any,
        coarse_ckpt: str | None = None,
        coarse_net: Mapping[str, Any] | None = None,
        image_channels: int = 1,
        residual_scale: float | str = "auto",
        scoring: Mapping[str, Any] | None = None,
        aucp_rho: float | None = None,
        **kwargs: Any,
    ) -> None:
        # plain containers only: hyperparameters are saved from these locals, and checkpoints load weights-only
        coarse_net = plain(coarse_net)
        kwargs = {k: plain(v) for k, v in kwargs.items()}
        args = tuple(plain(a) for a in args)
        scoring = plain(scoring)
        super().__init__(net, schedule, *args, **kwargs)
        self.anomaly_val = AnomalyValidation(scoring, aucp_rho, label_free=True)
        self.image_channels = int(image_channels)
        have, want = net_in_channels(self.net), 2 * self.image_channels
        if have is not None and have != want:
            raise ConfigError(f"net.in_channels={have} but the refiner feeds cat([r_t, coarse]) = {want} channels "
                              f"(2 x model.image_channels={self.image_channels}); set net.in_channels={want}.")
        self.check_both_samplings()
        if residual_scale != "auto" and not (isinstance(residual_scale, int | float) and residual_scale > 0):
            raise ConfigError(f"model.residual_scale={residual_scale!r} must be a positive number or 'auto'.")
        # NaN until estimated ("auto"); a buffer, so checkpoints carry the scale the net was trained with
        scale = float("nan") if residual_scale == "auto" else float(residual_scale)
        self.register_buffer("residual_std", torch.tensor(scale, dtype=torch.float32))
        self.coarse_net, self.coarse_arch, self.coarse_info = frozen_first_stage(coarse_ckpt, coarse_net,
                                                                                 CKPT_CONFIG_KEY)
        gen_channels = getattr(self.coarse_net, "channels", self.image_channels)
        if gen_channels != self.image_channels:
            raise ConfigError(f"the coarse generator works on {gen_channels} channel(s) but model.image_channels="
                              f"{self.image_channels}; train both stages on the same data.channels.")
        self.hparams["coarse_source"] = dict(self.coarse_info)

    def check_sampling(self, cfg: SamplingConfig, where: str) -> None:
        """``ConfigError`` (naming ``where``) unless ``cfg`` is a refinement this model runs: ddim / ddpm,
        ``steps`` in ``[1, 50]`` (at most ``t_start + 1``), ``t_start`` in ``[0, T)`` or None, no unused field."""
        if cfg.sampler not in SAMPLERS:
            raise ConfigError(f"{where}.sampler={cfg.sampler!r} is unknown here; choose one of {list(SAMPLERS)}.")
        cfg.require_unset(_UNUSED, "the refiner", where)
        T = self.schedule.num_train_timesteps
        if cfg.t_start is not None and not 0 <= int(cfg.t_start) < T:
            raise ConfigError(f"{where}.t_start={cfg.t_start} is outside [0, {T}); use null to start from pure "
                              "noise.")
        hi = min(50, T if cfg.t_start is None else int(cfg.t_start) + 1)
        steps = cfg.steps
        if steps is None or isinstance(steps, bool) or not 1 <= int(steps) <= hi:
            raise ConfigError(f"{where}.steps={steps} is outside [1, {hi}] (refinement takes 1-50 steps"
                              f"{'' if cfg.t_start is None else ', at most t_start + 1'}).")

    # ------------------------------------------------------------------ the frozen coarse stage
    def train(self, mode: bool = True) -> RefinerDiffusion:
        super().train(mode)
        self.coarse_net.eval()  # frozen: always in inference mode
        return self

    @torch.no_grad()
    def coarse(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The coarse healthy estimate ``[B, C, H, W]`` in ``(-1, 1)`` (``batch['coarse']`` if already present)."""
        if "coarse" in batch:
            return batch["coarse"]
        return self.coarse_net.healthy(batch["image"])

    @property
    def scale(self) -> float:
        s = float(self.residual_std)
        if not math.isfinite(s) or s <= 0:
            raise ConfigError("model.residual_scale='auto' has not been estimated yet (it is set on the first "
                              "training batch); train the refiner or give a positive model.residual_scale.")
        return s

    def _maybe_estimate_scale(self, residual: torch.Tensor) -> None:
        if math.isfinite(float(self.residual_std)):
            return
        std = residual.detach().float().std().clamp_min(1e-4)
        if self._trainer is not None and self.trainer.world_size > 1:
            std = self.all_gather(std).float().mean()
        self.residual_std.fill_(float(std))
        log.info("residual scale (std of x - coarse on the first training batch): %.4g", float(std))

    # ------------------------------------------------------------------ DiffusionModule hooks
    def _residual_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with ``image`` = the scaled residual ``(x - c) / s`` and ``coarse`` = ``c``."""
        x = batch["image"]
        c = self.coarse(batch)
        r = x - c
        self._maybe_estimate_scale(r)
        return {**batch, "image": r / self.scale, "coarse": c}

    def net_input(self, x_t: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """``cat([r_t, coarse], 1)``: ``[B, 2C, H, W]``."""
        c = batch.get("coarse")
        if c is None:
            raise DataError("the refiner's network input needs batch['coarse'] (the coarse healthy estimate).")
        return torch.cat([x_t, c.to(x_t.dtype)], dim=1)

    def diffusion_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The base denoising loss on the residual, conditioned on the coarse estimate."""
        return super().diffusion_loss(self._residual_batch(batch), generator=generator)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not isinstance(batch, Mapping) or "image" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise DataError(f"RefinerDiffusion trains on known-healthy images only, but the training batch has keys "
                            f"{keys}; use data.train_pools=[known_healthy].")
        if "label" in batch and bool((batch["label"] != 0).any()):
            raise DataError("RefinerDiffusion trains on known-healthy images only, but a training batch holds "
                            "label != 0; train on the known-healthy pool (data.train_pools=[known_healthy]).")
        return super().training_step(batch, batch_idx)

    # ------------------------------------------------------------------ inference
    def item_noise(self, ids: Sequence[str], seed: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """``noise_fn(like) -> z``: Gaussian noise whose row ``i`` comes from a generator seeded by the last path
        component of ``ids[i]`` (the file name; not its folder, which may encode the label) and ``seed`` (default
        ``model.sampling.seed``), so an image's reconstruction depends neither on its batch, its position in it, nor
        its label folder."""
        seed = self.sampling.seed if seed is None else int(seed)
        names = [str(i).rsplit("/", 1)[-1] for i in ids]
        gens = [torch.Generator().manual_seed(zlib.crc32(n.encode()) + seed) for n in names]

        def noise_fn(like: torch.Tensor) -> torch.Tensor:
            z = torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens])
            return z.to(device=like.device, dtype=like.dtype)

        return noise_fn

    @torch.no_grad()
    def refine_with(self, x: torch.Tensor, coarse: torch.Tensor, cfg: SamplingConfig,
                    generator: torch.Generator | None = None, ids: Sequence[str] | None = None) -> torch.Tensor:
        """``coarse + s * r0`` with the residual ``r0`` sampled by ``cfg`` conditioned on ``coarse``: ``[B, C, H, W]``
        in [-1, 1]. EMA weights in eval mode. With ``ids`` (one per image) each image's noise is seeded by its id
        (order-independent results); else by ``generator`` (default: seeded with ``cfg.seed``)."""
        self.check_sampling(cfg, "sampling")
        noise_fn = None
        if ids is not None and len(ids) == x.shape[0]:
            noise_fn = self.item_noise(ids, cfg.seed)
        elif generator is None:
            generator = torch.Generator(device=x.device).manual_seed(cfg.seed)
        s = self.scale
        fn = self.model_fn({"coarse": coarse})
        clip = 2.0 / s  # |x - c| <= 2 for images in [-1, 1]
        steps = int(cfg.steps)
        if cfg.t_start is None:
            ts = make_timesteps(self.schedule.num_train_timesteps, steps, cfg.spacing)
            r_T = noise_fn(coarse) if noise_fn is not None else make_noise("gaussian", coarse, generator=generator)
            r0 = sample(fn, self.schedule, r_T, ts, sampler=cfg.sampler, eta=cfg.eta, generator=generator,
                        clip_sample=clip, noise_fn=noise_fn)
        else:
            r0 = reconstruct_from(fn, self.schedule, (x - coarse) / s, cfg.t_start, steps, sampler=cfg.sampler,
                                  eta=cfg.eta, generator=generator, clip_sample=clip, noise_fn=noise_fn)
        return (coarse + s * r0).clamp(-1.0, 1.0)

    def reconstruct(self, batch: Mapping[str, Any], sampling: SamplingConfig | None = None) -> torch.Tensor:
        """The refined healthy estimate of ``batch['image']`` with ``sampling`` (default ``model.sampling``):
        ``[B, C, H, W]`` in ``[-1, 1]`` (noise seeded per image id when the batch has ``id``)."""
        cfg = self.sampling if sampling is None else sampling
        return self.refine_with(batch["image"], self.coarse(batch), cfg, ids=batch.get("id"))

    # ------------------------------------------------------------------ validation (loss, AUCp, labelled AUROC)
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``val/loss`` on the known-healthy rows; the refinement with ``val_sampling`` scored on ``val_batches``."""
        self.anomaly_val.step(self, batch, batch_idx, dataloader_idx)


    # ------------------------------------------------------------------ self-contained checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(CKPT_CONFIG_KEY)
        if isinstance(stored, dict) and isinstance(stored.get("model"), dict):
            stored = copy.deepcopy(stored)
            stored["model"]["coarse_net"] = dict(self.coarse_arch)
            checkpoint[CKPT_CONFIG_KEY] = stored

    # ------------------------------------------------------------------ estimates (the protocols' interface)
    @torch.no_grad()
    def estimates(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Both healthy estimates of ``batch['image']`` from one coarse pass: ``{"coarse": ..., "refined": ...}``,
        each ``[B, C, H, W]`` in ``[-1, 1]``; ``refined`` with ``model.sampling`` (noise seeded per id)."""
        c = self.coarse(batch)
        return {"coarse": c, "refined": self.refine_with(batch["image"], c, self.sampling, ids=batch.get("id"))}


__all__ = ["RefinerDiffusion"]
