"""``DiffusionModule``: the one LightningModule all diffusion models derive from.

It owns what every variant shares: the denoising loss on eps / x0 / v (l1, l2, huber), the optimizer and LR
schedule, the EMA of the weights (used for validation, evaluation and sampling), NaN fail-fast, logging and the
healthy validation loss. Subclasses override only what differs:

- ``net_input(x_t, batch)``: what the network sees (conditional models concatenate ``cond``);
- ``conditioning_keys``: the batch entries ``model_fn`` gathers per item (e.g. ``("cond",)``);
- ``class_labels(batch, train)``: class ids for guided models;
- ``loss_region(x0)``: where the loss counts (patched DDPM: one patch);
- ``reconstruct(batch, sampling=None)``: the healthy / denoised estimate ``[B, C, H, W] in [-1, 1]``;
- ``check_sampling(cfg, where)``: the family's own limits on ``model.sampling`` (fields it does not use, ranges).

How a model samples is one vocabulary for every family: ``model.sampling`` (a
:class:`~meddiff.diffusion.sampling.SamplingConfig`, or the family's subclass named by ``sampling_class``) and
``model.val_sampling`` (fields changed for the cheaper per-epoch validation pass). Anomaly validation (scoring, AUCp
pools, which batches) is a component the anomaly families hold (``meddiff.models.validation``). All diffusion math
comes from ``meddiff.diffusion``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from meddiff.diffusion import NoiseSchedule, make_noise
from meddiff.diffusion.sampling import SamplingConfig
from meddiff.errors import ConfigError
from meddiff.models.ema import EMA
from meddiff.utils.options import as_dict, options_from

LOSSES = ("l1", "l2", "huber")


class DiffusionModule(L.LightningModule):
    """Shared training/validation logic for diffusion models on dict batches.

    Args:
        net: denoiser with ``forward(x, t, class_labels=None)`` (see ``meddiff.nets``).
        schedule: the noise schedule (its ``prediction_type`` decides what the net predicts).
        optimizer: a partial ``torch.optim`` constructor taking the parameters (Hydra ``_partial_: true``).
        lr_scheduler: optional partial LR-scheduler constructor taking the optimizer.
        loss: ``l1``, ``l2`` or ``huber`` on the prediction target.
        t_range: training timesteps are drawn uniformly from ``[t_min, t_max)`` (``t_max`` null = T). Limiting it
            to the noise levels that reconstruction uses focuses capacity where scoring needs it.
        noise: ``gaussian`` or ``simplex``.
        ema_decay: EMA decay of the weights (0 disables EMA).
        compile: ``torch.compile`` the net for training.
        sampling: ``sampling_class`` fields (``model.sampling``), over the family's ``sampling_defaults``.
        val_sampling: fields of ``sampling`` changed for the per-epoch validation pass only (None = as is).
        val_batches: validation batches sampled/scored per loader (None = all, 0 = loss only; see
            :func:`meddiff.models.validation.chosen_batches`).
        fixed_noise_seed: None (normal training) or a seed the random state is reset to at every training step, so
            one batch gets the same t, noise (and patch) each step: ``debug=overfit`` can then drive the loss to ~0.
    """

    #: the evaluation protocol ``meddiff.eval`` runs: a name in ``meddiff.protocols`` (``anomaly``, ``denoise``,
    #: ``guided``, or one added with ``meddiff.protocols.register_protocol``); each model class names its own
    eval_protocol: str | None = None
    #: batch entries holding per-image conditioning, gathered per item by ``model_fn`` (e.g. ``("cond",)``)
    conditioning_keys: tuple[str, ...] = ()
    #: the family's sampling config class and its defaults (``model.sampling`` overrides them)
    sampling_class: ClassVar[type[SamplingConfig]] = SamplingConfig
    sampling_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        loss: str = "l2",
        huber_delta: float = 0.1,
        t_range: tuple[int, int | None] | list | None = None,
        noise: str = "gaussian",
        ema_decay: float = 0.999,
        compile: bool = False,
        sampling: Mapping[str, Any] | None = None,
        val_sampling: Mapping[str, Any] | None = None,
        val_batches: int | None = None,
        fixed_noise_seed: int | None = None,
    ) -> None:
        super().__init__()
        # plain values only: checkpoints stay loadable with torch.load(weights_only=True); the full experiment
        # config (optimizer included) is stored beside them by meddiff.train
        self.save_hyperparameters(ignore=["net", "schedule", "optimizer", "lr_scheduler"], logger=False)
        self.make_optimizer, self.make_lr_scheduler = optimizer, lr_scheduler
        if loss not in LOSSES:
            raise ConfigError(f"model.loss={loss!r} is unknown; choose one of {list(LOSSES)}.")
        self.net = net
        self.schedule = schedule
        self.ema = EMA(net, ema_decay) if ema_decay > 0 else None
        self._epoch_loss = torch.zeros(2, dtype=torch.float64)  # train/loss_epoch accumulator (on_train_epoch_end)
        self._val_loss = torch.zeros(2, dtype=torch.float64)  # val/loss accumulator (on_validation_epoch_end)
        self.loss_name = loss
        self.huber_delta = huber_delta
        self.noise_kind = noise
        make_noise(noise, torch.zeros(1, 1, 4, 4))  # fail fast on an unknown noise kind
        T = schedule.num_train_timesteps
        t_min, t_max = (list(t_range) + [None, None])[:2] if t_range is not None else (0, None)
        t_min, t_max = int(t_min or 0), int(t_max if t_max is not None else T)
        if not 0 <= t_min < t_max <= T:
            raise ConfigError(f"model.t_range=[{t_min}, {t_max}] must satisfy 0 <= t_min < t_max <= T={T}.")
        self.t_min, self.t_max = t_min, t_max
        self.sampling = options_from(self.sampling_class, {**self.sampling_defaults, **as_dict(sampling)},
                                     "model.sampling").validate(T)
        if val_sampling is not None and not isinstance(val_sampling, Mapping):
            raise ConfigError(f"model.val_sampling={val_sampling!r} must be a mapping of model.sampling fields, e.g. "
                              "{draws: 1}, or null.")
        self.val_sampling: dict[str, Any] = as_dict(val_sampling)
        self.validation_sampling().validate(T, "model.val_sampling")
        if val_batches is not None and (isinstance(val_batches, bool) or int(val_batches) != val_batches
                                        or int(val_batches) < 0):
            raise ConfigError(f"model.val_batches={val_batches!r} must be an integer >= 0 (0 = loss only) or null "
                              "(all).")
        self.val_batches = None if val_batches is None else int(val_batches)
        self.fixed_noise_seed = None if fixed_noise_seed is None else int(fixed_noise_seed)

    # ------------------------------------------------------------------ hooks subclasses override
    def net_input(self, x_t: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """What the network sees at noise level t: ``[B, C_in, H, W]``."""
        return x_t

    def class_labels(self, batch: Mapping[str, Any], train: bool) -> torch.Tensor | None:
        """Class ids ``[B]`` for class-conditional nets, or None."""
        return None

    def loss_region(self, x0: torch.Tensor) -> torch.Tensor | None:
        """Bool ``[B, 1, H, W]`` where the sample is noised and the loss counts; None = everywhere."""
        return None

    def reconstruct(self, batch: Mapping[str, Any], sampling: SamplingConfig | None = None) -> torch.Tensor:
        """The model's estimate for ``batch`` (healthy or denoised): ``[B, C, H, W] in [-1, 1]``. ``sampling``
        (default ``model.sampling``) is used as given and never stored: a protocol passes a changed copy."""
        raise NotImplementedError(f"{type(self).__name__} does not define reconstruct(batch).")

    def check_sampling(self, cfg: SamplingConfig, where: str) -> None:
        """The family's own limits on a sampling config (``ConfigError`` naming ``where``); none in the base."""

    # ------------------------------------------------------------------ sampling
    def validation_sampling(self) -> SamplingConfig:
        """``model.sampling`` with the ``model.val_sampling`` changes (read at call time)."""
        return self.sampling.with_changes(self.val_sampling)

    def check_both_samplings(self) -> None:
        """:meth:`check_sampling` on ``model.sampling`` and the validation config (families call it once built)."""
        self.check_sampling(self.sampling, "model.sampling")
        self.check_sampling(self.validation_sampling(), "model.val_sampling")

    def validation_reconstruct(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The estimate validation scores: :meth:`reconstruct` with :meth:`validation_sampling`."""
        return self.reconstruct(batch, self.validation_sampling())

    # ------------------------------------------------------------------ shared machinery
    @property
    def denoiser(self) -> nn.Module:
        """The EMA weights outside training, the online weights while training."""
        if self.ema is not None and not self.training:
            return self.ema.shadow
        return self.net

    def model_fn(self, batch: Mapping[str, Any], class_labels: torch.Tensor | None = None):
        """``fn(x_t, t, idx=None) -> output`` closing over the batch's conditioning.

        ``idx`` (LongTensor ``[n]``) names the batch row each of the n items belongs to, so patched reconstruction
        can run many patches of one image with that image's conditioning.
        """
        labels = class_labels if class_labels is not None else self.class_labels(batch, train=False)

        def fn(x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
            sub = batch if idx is None else _index_batch(batch, idx, self.conditioning_keys)
            lab = labels if (labels is None or idx is None) else labels[idx]
            return self.denoiser(self.net_input(x_t, sub), t, lab)

        return fn

    def sample_timesteps(self, n: int) -> torch.Tensor:
        return torch.randint(self.t_min, self.t_max, (n,), device=self.device)

    def diffusion_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoising loss on one batch (online weights in training, EMA weights in eval)."""
        x0 = batch["image"]
        if generator is None:
            t = self.sample_timesteps(x0.shape[0])
        else:
            t = torch.randint(self.t_min, self.t_max, (x0.shape[0],), device=x0.device, generator=generator)
        noise = make_noise(self.noise_kind, x0, generator=generator)
        x_t = self.schedule.q_sample(x0, t, noise)
        region = self.loss_region(x0)
        if region is not None:
            x_t = torch.where(region, x_t, x0)
        out = self.denoiser(self.net_input(x_t, batch), t, self.class_labels(batch, train=self.training))
        target = self.schedule.training_target(x0, noise, t)
        return self._reduce_loss(out, target, region)

    def _reduce_loss(self, out: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
        out, target = out.float(), target.float()
        if self.loss_name == "l1":
            per = (out - target).abs()
        elif self.loss_name == "l2":
            per = (out - target) ** 2
        else:
            per = F.huber_loss(out, target, delta=self.huber_delta, reduction="none")
        if region is None:
            return per.mean()
        weight = region.expand_as(per).to(per.dtype)
        return (per * weight).sum() / weight.sum().clamp_min(1.0)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if self.fixed_noise_seed is None:
            loss = self.diffusion_loss(batch)
        else:
            # the same draws every step (t, noise, the family's own: patch, label dropout), in a forked random state
            # so nothing else's randomness changes: a fixed batch then has a fixed target the net can fit exactly
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.fixed_noise_seed)
                loss = self.diffusion_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss is {loss.item()} at global step {self.global_step}. Lower model.optimizer.lr, "
                "check the data for NaN/inf (images must be finite in [-1, 1]), or train with trainer.precision=32."
            )
        n = batch["image"].shape[0]
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        self._epoch_loss += torch.stack([loss.detach().float() * n, loss.new_tensor(float(n))]).cpu().double()
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_loss = torch.zeros(2, dtype=torch.float64)  # [sum of loss x batch size, images] on this process

    def on_train_epoch_end(self) -> None:
        """``train/loss_epoch``: the batch-size-weighted mean over the epoch's batches of ALL processes.

        Reduced here, in a hook every process runs at the same point, rather than with ``self.log(...,
        sync_dist=True)``: Lightning syncs such a value lazily, when something reads the logged metrics, and under
        DDP a reader on rank 0 alone (run status, loggers) made that all-reduce cross the other processes'
        collectives (a gloo size mismatch that killed the refiner's 2-process run)."""
        total = self._epoch_loss.to(self.device)
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        if float(total[1]) > 0:
            self.log("train/loss_epoch", (total[0] / total[1]).float(), on_step=False, on_epoch=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.net)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``val/loss`` on the healthy rows (``label == 0``, or all rows without labels), seeded per batch."""
        self.log_val_loss(batch, batch_idx, healthy_rows(batch))

    def log_val_loss(self, batch: Mapping[str, Any], batch_idx: int, rows: torch.Tensor) -> None:
        """Add the loss on the rows ``rows`` (bool ``[B]``) of ``batch`` (noise seeded by the batch index) to
        ``val/loss``, logged once per epoch in :meth:`on_validation_epoch_end` over every validation loader: the
        loaders are pools of one validation set, and Lightning refuses one key logged from several loaders."""
        if rows.any():
            gen = torch.Generator(device=batch["image"].device).manual_seed(1000 + batch_idx)
            loss = self.diffusion_loss(select_rows(batch, rows), generator=gen)
            n = int(rows.sum())
            self._val_loss += torch.stack([loss.detach().float() * n, loss.new_tensor(float(n))]).cpu().double()

    def on_validation_epoch_start(self) -> None:
        self._val_loss = torch.zeros(2, dtype=torch.float64)  # [sum of loss x rows, rows] on this process

    def on_validation_epoch_end(self) -> None:
        """``val/loss``: the row-weighted mean over every loader and process (reduced here, in a hook every process
        runs, as ``train/loss_epoch``); then the family's anomaly validation (``val/auroc``, ``val/aucp``) if any."""
        total = self._val_loss.to(self.device)
        if getattr(self._trainer, "world_size", 1) > 1:  # no trainer (a unit test calling the hook): one process
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        if float(total[1]) > 0:
            self.log("val/loss", (total[0] / total[1]).float(), prog_bar=True, on_epoch=True)
        anomaly_val = getattr(self, "anomaly_val", None)
        if anomaly_val is not None:
            anomaly_val.log_epoch(self.log)

    def num_val_batches(self, dataloader_idx: int = 0) -> float | None:
        """Batches of validation loader ``dataloader_idx`` as the trainer counts them (None without a trainer)."""
        trainer = getattr(self, "_trainer", None)
        nums = getattr(trainer, "num_val_batches", None) if trainer is not None else None
        return float(nums[dataloader_idx]) if nums and dataloader_idx < len(nums) else None

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self.reconstruct(batch)

    def configure_optimizers(self) -> Any:
        make_opt = self.make_optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        opt = make_opt(params=self.net.parameters())
        if self.make_lr_scheduler is None:
            return opt
        sched = self.make_lr_scheduler(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            self.net = torch.compile(self.net)


def healthy_rows(batch: Mapping[str, Any]) -> torch.Tensor:
    """Bool ``[B]``: rows with ``label == 0`` (all rows when the batch has no ``label``)."""
    x0 = batch["image"]
    if "label" not in batch:
        return torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    return batch["label"] == 0


def select_rows(batch: Mapping[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """Rows of a dict batch (tensors indexed, lists filtered)."""
    out: dict[str, Any] = {}
    idx = rows.nonzero().flatten()
    for k, v in batch.items():
        if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == rows.shape[0]:
            out[k] = v[idx]
        elif isinstance(v, (list, tuple)) and len(v) == rows.shape[0]:
            out[k] = [v[i] for i in idx.tolist()]
        else:
            out[k] = v
    return out


def _index_batch(batch: Mapping[str, Any], idx: torch.Tensor, keys: tuple[str, ...]) -> dict[str, Any]:
    """The conditioning tensors ``keys`` of a batch gathered at rows ``idx`` (``[n]``, repeats allowed)."""
    return {k: (v[idx] if k in keys and torch.is_tensor(v) else v) for k, v in batch.items()}
