"""``RefinerDiffusion``: a residual diffusion refiner on top of a frozen coarse generator (Brainomaly-Diff, seed 003,
done the way working refiners do it: SR3 / ResShift / CorrDiff).

- **Coarse**: the frozen ``CoarseGenerator``'s healthy estimate ``c = tanh(x + G(x))``, loaded weights-only from
  ``coarse_ckpt`` (a ``.ckpt`` or a coarse run dir, whose AUCp-selected checkpoint is used).
- **Training** on known-healthy images only: the target is the residual ``r = (x - c) / s`` (``s`` =
  ``residual_scale``; ``"auto"`` = the std of the residual on the first training batch, stored in the checkpoint),
  diffused with the schedule (eps / x0 / v as ``schedule.prediction_type`` says). The network sees
  ``cat([r_t, c])`` (2 channels for grayscale) and the real timestep ``t`` (MONAI ``DiffusionModelUNet``'s
  embedding). Loss, optimizer, LR schedule and EMA are ``DiffusionModule``'s.
- **Inference**: ``refined = c + s * r0`` with ``r0`` sampled by DDIM or DDPM in ``num_steps`` (1-50) steps, either
  from pure noise at ``T`` (``t_start: null``, "trailing" spacing so the first step is ``T - 1``) or, SDEdit-style,
  from the observed residual ``(x - c) / s`` noised to ``t_start``. ``reconstruct(batch)`` returns ``refined``, so the
  one anomaly scorer and the protocols apply unchanged; :meth:`coarse` and :meth:`refine` let a protocol score the
  coarse and refined estimates of the same images.

Validation: ``val/loss`` on known-healthy images, ``val/aucp`` (label-free) and, with a labelled pool,
``val/auroc`` from a refinement with ``val_num_steps`` steps.

The refiner's checkpoints hold the generator's weights and (in the stored config) its architecture, so evaluating a
refiner needs no coarse checkpoint file.
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.diffusion import SAMPLERS, SPACINGS, make_noise, make_timesteps, reconstruct_from, sample
from meddiff.errors import ConfigError, DataError
from meddiff.models.aucp_validation import KNOWN_HEALTHY, AUCpValidation, pool_names
from meddiff.models.base import DiffusionModule, _select
from meddiff.models.conditional import net_in_channels
from meddiff.nets.gan import BrainomalyGenerator
from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY
from meddiff.runs.checkpoint_selection import checkpoint_dir_of, load_weights_only, selection_checkpoints
from meddiff.utils.options import options_from

log = logging.getLogger(__name__)

#: generator classes a stored coarse config may name (stored configs instantiate only allow-listed targets)
GENERATOR_TARGETS = {"meddiff.nets.gan.BrainomalyGenerator": BrainomalyGenerator,
                     "meddiff.nets.BrainomalyGenerator": BrainomalyGenerator}


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (checkpoints must load weights-only)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def generator_arch(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{"class": <allow-listed class path>, "kwargs": {...}}`` from a stored generator config.

    Accepts the CoarseGenerator's own config (``{"_target_": ..., **kwargs}``) or this form. The form has no
    ``_target_`` on purpose: Hydra must not instantiate a stored architecture on its own.
    """
    cfg = dict(_plain(cfg))
    if "class" in cfg:
        target, kwargs = cfg["class"], dict(cfg.get("kwargs") or {})
    else:
        target = cfg.pop("_target_", None)
        kwargs = cfg
    if target not in GENERATOR_TARGETS:
        raise ConfigError(f"coarse generator class {target!r} is not an allowed generator class "
                          f"({sorted(GENERATOR_TARGETS)}).")
    return {"class": target, "kwargs": kwargs}


def build_generator(cfg: Mapping[str, Any]) -> nn.Module:
    """A generator from a stored config (see :func:`generator_arch`); only allow-listed classes are built."""
    arch = generator_arch(cfg)
    return GENERATOR_TARGETS[arch["class"]](**arch["kwargs"])


def resolve_coarse_checkpoint(path: str | Path) -> tuple[Path, str]:
    """``(file, rule)``: a ``.ckpt`` file as given (rule ``given``), or a coarse run dir's AUCp-selected checkpoint
    (else its ``last.ckpt``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p, "given"
    if p.is_dir():
        rules = selection_checkpoints(checkpoint_dir_of(p))
        for rule in ("aucp", "last"):
            if rule in rules:
                return rules[rule], rule
        raise ConfigError(f"model.coarse_ckpt={str(p)!r} is a folder without checkpoints/last.ckpt; pass the coarse "
                          "run dir (or a .ckpt) written by `python -m meddiff.train experiment=brainomaly_coarse`.")
    raise ConfigError(
        f"model.coarse_ckpt={str(p)!r} does not exist. Train the coarse stage first "
        "(`python -m meddiff.train experiment=brainomaly_coarse hydra.run.dir=<coarse run dir>`) and pass its run dir "
        "or a .ckpt from its checkpoints/ folder."
    )


def load_coarse_generator(path: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Load a frozen generator from a ``CoarseGenerator`` checkpoint (weights-only).

    Returns ``(generator in eval mode without grads, its architecture config, info {path, rule, iterations})``.
    Raises ConfigError when the file is missing, not loadable weights-only, or not a CoarseGenerator checkpoint.
    """
    file, rule = resolve_coarse_checkpoint(path)
    ckpt = load_weights_only(file, "model.coarse_ckpt")
    model_cfg = (ckpt.get(CKPT_CONFIG_KEY) or {}).get("model") or {}
    target = str(model_cfg.get("_target_", ""))
    state = {k[len("generator."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    if not target.endswith("CoarseGenerator") or not state or "generator" not in model_cfg:
        raise ConfigError(
            f"model.coarse_ckpt={str(file)!r} is not a CoarseGenerator checkpoint (its model is {target or 'unknown'}, "
            f"{len(state)} generator weights); pass a checkpoint of `experiment=brainomaly_coarse`."
        )
    arch = generator_arch(model_cfg["generator"])
    gen = build_generator(arch)
    gen.load_state_dict(state)
    info = {"path": str(file), "rule": rule, "iterations": int(ckpt["state_dict"].get("iterations", -1))}
    return gen, arch, info


class RefinerDiffusion(AUCpValidation, DiffusionModule):
    """Residual diffusion refiner of a frozen coarse generator's healthy estimate.

    Args (besides :class:`~meddiff.models.base.DiffusionModule`'s ``net, schedule, optimizer, lr_scheduler, loss,
    huber_delta, t_range, noise, ema_decay, scoring, compile``):
        coarse_ckpt: ``CoarseGenerator`` checkpoint file or coarse run dir (needed to train; optional when
            ``coarse_net`` is given and the weights come from this model's own checkpoint).
        coarse_net: the generator's architecture ``{"class": ..., "kwargs": {...}}`` (written into this model's
            checkpoints automatically; no ``_target_``, so Hydra never instantiates it).
        image_channels: image channels ``C``; ``net.in_channels`` must be ``2 C`` (residual + coarse).
        residual_scale: ``s`` in ``r = (x - c) / s``: a positive number or ``"auto"``.
        sampler: ``ddim`` | ``ddpm``. num_steps: reverse steps (1-50). eta: DDIM noise (0 = deterministic).
        t_start: ``None`` = sample the residual from pure noise; an int = SDEdit from the observed residual at
            ``t_start``. timestep_spacing: of the pure-noise chain (``trailing`` starts at ``T - 1``).
        sample_seed: seed of the sampling noise (reproducible reconstructions).
        val_num_steps: steps of the refinement scored in validation (``None`` = ``num_steps``).
        val_score_batches: validation batches scored per pool (``None`` = all).
        aucp_rho: share of healthy images in the unannotated pool, if known (``val/aucp_debiased``).
    """

    eval_protocol: str = "refiner"

    def __init__(
        self,
        net: nn.Module,
        schedule: nn.Module,
        *args: Any,
        coarse_ckpt: str | None = None,
        coarse_net: Mapping[str, Any] | None = None,
        image_channels: int = 1,
        residual_scale: float | str = "auto",
        sampler: str = "ddim",
        num_steps: int = 10,
        eta: float = 0.0,
        t_start: int | None = None,
        timestep_spacing: str = "trailing",
        sample_seed: int = 0,
        val_num_steps: int | None = None,
        val_score_batches: int | None = None,
        aucp_rho: float | None = None,
        **kwargs: Any,
    ) -> None:
        # plain containers only: hyperparameters are saved from these locals, and checkpoints load weights-only
        coarse_net = _plain(coarse_net)
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        args = tuple(_plain(a) for a in args)
        scoring = kwargs.pop("scoring", None)  # the anomaly map/score of validation (the one scorer)
        super().__init__(net, schedule, *args, **kwargs)
        self.scoring_cfg: ScoringConfig = options_from(ScoringConfig, scoring, "model.scoring")
        self.image_channels = int(image_channels)
        have, want = net_in_channels(self.net), 2 * self.image_channels
        if have is not None and have != want:
            raise ConfigError(f"net.in_channels={have} but the refiner feeds cat([r_t, coarse]) = {want} channels "
                              f"(2 x model.image_channels={self.image_channels}); set net.in_channels={want}.")
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler={sampler!r} is unknown; choose one of {list(SAMPLERS)}.")
        if timestep_spacing not in SPACINGS:
            raise ConfigError(f"model.timestep_spacing={timestep_spacing!r} is unknown; choose one of {list(SPACINGS)}.")
        self.check_steps(num_steps, t_start, "model.num_steps")
        if val_num_steps is not None:
            self.check_steps(val_num_steps, t_start, "model.val_num_steps")
        if not float(eta) >= 0:
            raise ConfigError(f"model.eta={eta} must be >= 0 (0 = deterministic DDIM).")
        if residual_scale != "auto" and not (isinstance(residual_scale, int | float) and residual_scale > 0):
            raise ConfigError(f"model.residual_scale={residual_scale!r} must be a positive number or 'auto'.")
        if val_score_batches is not None and int(val_score_batches) < 0:
            raise ConfigError(f"model.val_score_batches={val_score_batches} must be >= 0 or null (all).")
        self.sampler, self.num_steps, self.eta = sampler, int(num_steps), float(eta)
        self.t_start = None if t_start is None else int(t_start)
        self.timestep_spacing, self.sample_seed = timestep_spacing, int(sample_seed)
        self.val_num_steps = None if val_num_steps is None else int(val_num_steps)
        self.val_score_batches = None if val_score_batches is None else int(val_score_batches)
        self.init_aucp(aucp_rho)
        # NaN until estimated ("auto"); a buffer, so checkpoints carry the scale the net was trained with
        scale = float("nan") if residual_scale == "auto" else float(residual_scale)
        self.register_buffer("residual_std", torch.tensor(scale, dtype=torch.float32))
        self.coarse_net, self.coarse_arch, self.coarse_info = self._make_coarse(coarse_ckpt, coarse_net)
        gen_channels = getattr(self.coarse_net, "channels", self.image_channels)
        if gen_channels != self.image_channels:
            raise ConfigError(f"the coarse generator works on {gen_channels} channel(s) but model.image_channels="
                              f"{self.image_channels}; train both stages on the same data.channels.")
        self.hparams["coarse_source"] = dict(self.coarse_info)

    # ------------------------------------------------------------------ the frozen coarse stage
    @staticmethod
    def _make_coarse(coarse_ckpt: str | None, coarse_net: Mapping[str, Any] | None
                     ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
        if coarse_ckpt:
            path = Path(str(coarse_ckpt)).expanduser()
            if path.exists() or coarse_net is None:
                gen, arch, info = load_coarse_generator(path)
            else:  # evaluating a refiner checkpoint whose coarse file has moved: weights come from its state_dict
                log.info("model.coarse_ckpt=%s is gone; building the generator from model.coarse_net (the refiner "
                         "checkpoint holds its weights).", path)
                arch = generator_arch(coarse_net)
                gen, info = build_generator(arch), {"path": str(path), "rule": "stored"}
        elif coarse_net is not None:
            arch = generator_arch(coarse_net)
            gen, info = build_generator(arch), {"path": None, "rule": "stored"}
        else:
            raise ConfigError(
                "RefinerDiffusion needs the coarse stage: set model.coarse_ckpt=<coarse run dir or .ckpt> (train it "
                "with `python -m meddiff.train experiment=brainomaly_coarse`)."
            )
        gen.eval().requires_grad_(False)
        return gen, arch, info

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
    def check_steps(self, num_steps: int, t_start: int | None, what: str = "num_steps") -> None:
        T = self.schedule.num_train_timesteps
        if t_start is not None and not 0 <= int(t_start) < T:
            raise ConfigError(f"model.t_start={t_start} is outside [0, {T}); use null to start from pure noise.")
        hi = min(50, T if t_start is None else int(t_start) + 1)
        if isinstance(num_steps, bool) or not 1 <= int(num_steps) <= hi:
            raise ConfigError(f"{what}={num_steps} is outside [1, {hi}] (refinement takes 1-50 steps"
                              f"{'' if t_start is None else ', at most t_start + 1'}).")

    def item_noise(self, ids: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``noise_fn(like) -> z``: Gaussian noise whose row ``i`` comes from a generator seeded by the last path
        component of ``ids[i]`` (the file name; not its folder, which may encode the label) and ``sample_seed``, so an
        image's reconstruction depends neither on its batch, its position in it, nor its label folder."""
        names = [str(i).rsplit("/", 1)[-1] for i in ids]
        gens = [torch.Generator().manual_seed(zlib.crc32(n.encode()) + self.sample_seed) for n in names]

        def noise_fn(like: torch.Tensor) -> torch.Tensor:
            z = torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens])
            return z.to(device=like.device, dtype=like.dtype)

        return noise_fn

    @torch.no_grad()
    def refine(self, x: torch.Tensor, coarse: torch.Tensor, num_steps: int | None = None,
               sampler: str | None = None, generator: torch.Generator | None = None,
               ids: Sequence[str] | None = None) -> torch.Tensor:
        """``coarse + s * r0`` with the residual ``r0`` sampled conditioned on ``coarse``: ``[B, C, H, W]`` in [-1, 1].

        Uses the EMA weights in eval mode; ``num_steps``/``sampler`` default to the model's. With ``ids`` (one per
        image) each image's noise is seeded by its id (order-independent results); else by ``generator`` (default:
        seeded with ``sample_seed``).
        """
        steps = self.num_steps if num_steps is None else int(num_steps)
        self.check_steps(steps, self.t_start)
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler={sampler!r} is unknown; choose one of {list(SAMPLERS)}.")
        noise_fn = None
        if ids is not None and len(ids) == x.shape[0]:
            noise_fn = self.item_noise(ids)
        elif generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.sample_seed)
        s = self.scale
        fn = self.model_fn({"coarse": coarse})
        clip = 2.0 / s  # |x - c| <= 2 for images in [-1, 1]
        if self.t_start is None:
            ts = make_timesteps(self.schedule.num_train_timesteps, steps, self.timestep_spacing)
            r_T = noise_fn(coarse) if noise_fn is not None else make_noise("gaussian", coarse, generator=generator)
            r0 = sample(fn, self.schedule, r_T, ts, sampler=sampler, eta=self.eta, generator=generator,
                        clip_sample=clip, noise_fn=noise_fn)
        else:
            r0 = reconstruct_from(fn, self.schedule, (x - coarse) / s, self.t_start, steps, sampler=sampler,
                                  eta=self.eta, generator=generator, clip_sample=clip, noise_fn=noise_fn)
        return (coarse + s * r0).clamp(-1.0, 1.0)

    def reconstruct(self, batch: Mapping[str, Any], num_steps: int | None = None) -> torch.Tensor:
        """The refined healthy estimate of ``batch['image']``: ``[B, C, H, W]`` in ``[-1, 1]`` (noise seeded per
        image id when the batch has ``id``)."""
        x = batch["image"]
        return self.refine(x, self.coarse(batch), num_steps=num_steps, ids=batch.get("id"))

    # ------------------------------------------------------------------ validation (loss, AUCp, labelled AUROC)
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        x = batch["image"]
        pools = pool_names(batch)
        known = torch.tensor([p == KNOWN_HEALTHY for p in pools], device=x.device)
        if known.any():
            gen = torch.Generator(device=x.device).manual_seed(1000 + batch_idx)
            loss = self.diffusion_loss(_select(batch, known), generator=gen)
            self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=int(known.sum()),
                     add_dataloader_idx=False)
        if self.val_score_batches is not None and batch_idx >= self.val_score_batches:
            return
        recon = self.reconstruct(batch, num_steps=self.val_num_steps)
        scores = score_batch(x.float(), recon.float(), batch.get("brain_mask"), self.scoring_cfg)["score"]
        self.update_pools(batch, scores)

    def on_validation_epoch_end(self) -> None:
        self.log_pools()

    # ------------------------------------------------------------------ self-contained checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(CKPT_CONFIG_KEY)
        if isinstance(stored, dict) and isinstance(stored.get("model"), dict):
            stored = copy.deepcopy(stored)
            stored["model"]["coarse_net"] = dict(self.coarse_arch)
            checkpoint[CKPT_CONFIG_KEY] = stored


__all__ = ["RefinerDiffusion", "build_generator", "load_coarse_generator", "resolve_coarse_checkpoint"]
