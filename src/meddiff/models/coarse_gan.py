"""``CoarseGenerator``: Brainomaly (Siddiquee et al., WACV 2024), the coarse stage of the refiner family.

A generator translates every image to a healthy estimate ``healthy(x) = tanh(x + G(x))`` (``meddiff.nets.gan``);
a PatchGAN critic is trained with WGAN-GP to tell known-healthy images ``x_B`` from translated images of the
unannotated mixed pool ``x_A`` (healthy and diseased, labels never used):

    L_D = -D(x_B) + D(healthy(x_A)) + lambda_gp * GP        (GP on random interpolates of x_B and healthy(x_A))
    L_G = -D(healthy(x_A)) + lambda_id * |x_B - healthy(x_B)|_1      (identity on known-healthy images only)

One *iteration* is one critic update; the generator is updated on every ``n_critic``-th iteration (on the same
batch). Adam (lr 1e-4, betas (0.5, 0.999)) for both, with the learning rate decayed linearly to 0 over the last
``decay_iters`` iterations. Optimisation is manual (``automatic_optimization = False``); it runs under DDP (which
needs ``trainer.strategy=ddp_find_unused_parameters_true``: the generator takes no part in the critic's loss) and
under bf16/16-mixed (losses and the gradient-penalty norm are computed in float32).

Note on ``trainer.max_steps``: Lightning counts every optimizer step in manual optimisation, so N iterations are
``N + N // n_critic`` steps. Give ``num_iters`` instead; training stops there.

Training batches come from two pools: ``{"known_healthy": batch_B, "mixed": batch_A}`` (an
``ImageFolderAnomalyDataModule`` with ``train_pools=[known_healthy, mixed]``). ``reconstruct(batch)`` returns the
healthy estimate, so the one anomaly scorer (``meddiff.anomaly.scoring``) makes this a complete detector; its
validation (the anomaly-validation component ``meddiff.models.validation``) logs ``val/aucp`` (label-free selection) and,
with a labelled validation pool, ``val/auroc``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from meddiff.errors import ConfigError, DataError
from meddiff.models.validation import KNOWN_HEALTHY, AnomalyValidation, pool_names

log = logging.getLogger(__name__)

TRAIN_POOLS = ("known_healthy", "mixed")


def two_pool_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_B known-healthy, x_A mixed)`` images ``[B, C, H, W]`` from a two-pool training batch."""
    if not isinstance(batch, Mapping) or not all(k in batch for k in TRAIN_POOLS):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise DataError(
            f"CoarseGenerator trains on two pools per step (known-healthy and the unannotated mixed set) but the "
            f"training batch has keys {keys}; use data=image_folder with data.train_pools=[known_healthy, mixed]."
        )
    x_b, x_a = batch["known_healthy"]["image"], batch["mixed"]["image"]
    if "label" in batch["mixed"]:
        raise DataError("the mixed pool's training batches carry 'label': its labels must never reach training.")
    if x_b.shape[1:] != x_a.shape[1:]:
        raise DataError(f"known-healthy images {tuple(x_b.shape[1:])} and mixed images {tuple(x_a.shape[1:])} "
                        "differ in channels or size; set data.image_size / data.channels.")
    return x_b, x_a


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP penalty ``E[(||grad_x D(x_hat)||_2 - 1)^2]`` on random interpolates of ``real`` and ``fake``.

    Uses the first ``min(len(real), len(fake))`` rows of each. Returns a float32 scalar.
    """
    n = min(real.shape[0], fake.shape[0])
    real, fake = real[:n].detach(), fake[:n].detach()
    alpha = torch.rand(n, 1, 1, 1, device=real.device, dtype=real.dtype, generator=generator)
    x_hat = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.float().sum(), x_hat, create_graph=True)
    return ((grad.float().flatten(1).norm(dim=1) - 1.0) ** 2).mean()


class CoarseGenerator(L.LightningModule):
    """Brainomaly's WGAN-GP generator/critic pair as a LightningModule (manual optimisation).

    Args:
        generator: ``BrainomalyGenerator`` (``healthy(x)``, ``forward(x) -> map``).
        critic: ``PatchCritic``.
        lr, betas: Adam settings of both optimizers.
        lambda_gp: gradient-penalty weight (10). lambda_id: identity-loss weight on known-healthy images (1, the
            official Brainomaly default).
        n_critic: the generator is updated on every ``n_critic``-th iteration (2 in Brainomaly).
        num_iters: total iterations (critic updates); training stops there. ``None``: derived from the trainer
            (``max_steps`` converted from optimizer steps, else ``max_epochs`` x batches per epoch).
        decay_iters: the LR decays linearly to 0 over the last ``decay_iters`` iterations (``None``: a quarter of
            ``num_iters``, Brainomaly's 100k of 400k; 0: constant LR).
        scoring: ``ScoringConfig`` fields for validation scores (map, reduction, ...).
        aucp_rho: share of healthy images in the unannotated pool, if known (logs ``val/aucp_debiased``).
    """

    eval_protocol: str = "refiner"

    def __init__(
        self,
        generator: nn.Module,
        critic: nn.Module,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.999),
        lambda_gp: float = 10.0,
        lambda_id: float = 1.0,
        n_critic: int = 2,
        num_iters: int | None = None,
        decay_iters: int | None = None,
        scoring: Mapping[str, Any] | None = None,
        aucp_rho: float | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        betas = tuple(float(b) for b in betas)
        if not (float(lr) > 0 and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ConfigError(f"model.lr={lr} must be > 0 and model.betas={list(betas)} two values in [0, 1).")
        if isinstance(n_critic, bool) or int(n_critic) < 1:
            raise ConfigError(f"model.n_critic={n_critic} must be an integer >= 1 (Brainomaly: 2).")
        for name, v in (("num_iters", num_iters), ("decay_iters", decay_iters)):
            if v is not None and (isinstance(v, bool) or int(v) < 0):
                raise ConfigError(f"model.{name}={v} must be a non-negative integer or null.")
        if num_iters is not None and decay_iters is not None and int(decay_iters) > int(num_iters):
            raise ConfigError(f"model.decay_iters={decay_iters} exceeds model.num_iters={num_iters}.")
        if float(lambda_gp) < 0 or float(lambda_id) < 0:
            raise ConfigError(f"model.lambda_gp={lambda_gp} and model.lambda_id={lambda_id} must be >= 0.")
        self.anomaly_val = AnomalyValidation(scoring, aucp_rho, label_free=True)
        # plain values only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {"lr": float(lr), "betas": list(betas), "lambda_gp": float(lambda_gp), "lambda_id": float(lambda_id),
             "n_critic": int(n_critic), "num_iters": None if num_iters is None else int(num_iters),
             "decay_iters": None if decay_iters is None else int(decay_iters),
             "scoring": self.anomaly_val.scoring.as_dict(), "aucp_rho": aucp_rho},
            logger=False,
        )
        self.generator, self.critic = generator, critic
        self.lr, self.betas = float(lr), betas
        self.lambda_gp, self.lambda_id, self.n_critic = float(lambda_gp), float(lambda_id), int(n_critic)
        self.num_iters = None if num_iters is None else int(num_iters)
        self.decay_iters = None if decay_iters is None else int(decay_iters)
        # iterations done (critic updates): saved in checkpoints, so the LR schedule and the G cadence resume exactly
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ the healthy estimate
    def reconstruct(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Healthy estimate ``tanh(x + G(x))`` of ``batch['image']``: ``[B, C, H, W]`` in ``(-1, 1)``."""
        with torch.no_grad():
            return self.generator.healthy(batch["image"])

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self.reconstruct(batch)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=self.betas)
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=self.lr, betas=self.betas)
        return [opt_g, opt_d]

    def total_iters(self) -> int | None:
        """``num_iters``, or the iterations the trainer will run (optimizer steps converted), or None."""
        if self.num_iters is not None:
            return self.num_iters
        trainer = self._trainer
        if trainer is None:
            return None
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps * self.n_critic // (self.n_critic + 1)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            batches = trainer.num_training_batches
            if batches != float("inf"):
                return int(trainer.max_epochs * batches)
        return None

    def lr_factor(self, iteration: int) -> float:
        """LR multiplier at ``iteration``: 1, then linear to 0 over the last ``decay_iters`` iterations."""
        total = self.total_iters()
        if total is None:
            return 1.0
        decay = self.decay_iters if self.decay_iters is not None else total // 4
        start = total - decay
        if decay <= 0 or iteration < start:
            return 1.0
        return max(0.0, (total - iteration) / decay)

    def on_fit_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = getattr(self.trainer.strategy, "model", None)
        if isinstance(wrapped, DistributedDataParallel) and not wrapped.find_unused_parameters:
            raise ConfigError(
                "CoarseGenerator under DDP needs unused-parameter detection (the generator takes no part in the "
                "critic's loss): set trainer.strategy=ddp_find_unused_parameters_true."
            )

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x_b, x_a = two_pool_batch(batch)
        opt_g, opt_d = self.optimizers()
        it = int(self.iterations)
        factor = self.lr_factor(it)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = self.lr * factor

        # critic: known-healthy images are "real", translated mixed images "fake"
        with torch.no_grad():
            fake = self.generator.healthy(x_a)
        with self.toggled_optimizer(opt_d):
            d_real = self.critic(x_b).float().mean()
            d_fake = self.critic(fake).float().mean()
            gp = gradient_penalty(self.critic, x_b, fake)
            d_loss = d_fake - d_real + self.lambda_gp * gp
            _check_finite(d_loss, "critic", it)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
        n = x_b.shape[0]
        self.log_dict({"train/d_loss": d_loss.detach(), "train/gp": gp.detach(),
                       "train/wasserstein": (d_real - d_fake).detach(), "train/lr": torch.tensor(self.lr * factor)},
                      on_step=True, on_epoch=False, batch_size=n)

        if (it + 1) % self.n_critic == 0:
            with self.toggled_optimizer(opt_g):
                g_adv = -self.critic(self.generator.healthy(x_a)).float().mean()
                g_id = F.l1_loss(self.generator.healthy(x_b).float(), x_b.float())
                g_loss = g_adv + self.lambda_id * g_id
                _check_finite(g_loss, "generator", it)
                opt_g.zero_grad(set_to_none=True)
                self.manual_backward(g_loss)
                opt_g.step()
            self.log_dict({"train/g_loss": g_loss.detach(), "train/g_adv": g_adv.detach(),
                           "train/g_id": g_id.detach()}, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self.iterations += 1
        total = self.total_iters()
        if self.num_iters is not None and total is not None and int(self.iterations) >= total:
            self.trainer.should_stop = True

    # ------------------------------------------------------------------ validation (AUCp, labelled AUROC)
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        x = batch["image"]
        healthy = self.reconstruct(batch)
        self.anomaly_val.update(batch, self.anomaly_val.scores(batch, healthy))
        known = torch.tensor([p == KNOWN_HEALTHY for p in pool_names(batch)], device=x.device)
        if known.any():
            l1 = (healthy[known].float() - x[known].float()).abs().mean()
            self.log("val/l1_known_healthy", l1, on_epoch=True, sync_dist=True, batch_size=int(known.sum()),
                     add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        self.anomaly_val.log_epoch(self.log)

    # ------------------------------------------------------------------ estimates (the protocols' interface)
    def estimates(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The one healthy estimate, named: ``{"coarse": tanh(x + G(x))}``, ``[B, C, H, W]`` in ``(-1, 1)``."""
        return {"coarse": self.reconstruct(batch)}


def _check_finite(loss: torch.Tensor, which: str, it: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"The {which} loss is {loss.item()} at iteration {it}. Lower model.lr, check the data for NaN/inf "
            "(images must be finite in [-1, 1]), or train with trainer.precision=32."
        )
