"""Anomaly scoring state for the diffusion models that detect anomalies (not every diffusion model does).

- :class:`AnomalyScoring`: the scoring config (``model.scoring``: map, post-processing, reduction) and the
  validation AUROC (``val/auroc``: each labelled validation batch is reconstructed and scored) and, when the
  validation data carry pools (``data.aucp_holdout > 0``), the label-free ``val/aucp``
  (:mod:`meddiff.models.aucp_validation`). Used by every model that scores anomalies (``UnconditionalDiffusion``,
  ``GuidedDiffusion``); its ``eval_protocol`` is ``"anomaly"``.
- :class:`PartialDiffusionReconstruction`: adds the partial-diffusion healthy estimate (``model.recon``: noise to
  ``t_start``, denoise, optionally patched; ``meddiff.anomaly.reconstruction``) and ``reconstruct(batch, recon)``,
  which takes an explicit reconstruction config so protocols can try depths without changing the model.
  ``model.val_recon`` optionally changes fields of it for the per-epoch ``val/auroc`` only (e.g. ``n_noise: 1``
  when the evaluation averages 8 noise draws: monitoring stays cheap, the evaluation keeps ``model.recon``).

Both are ``DiffusionModule`` subclasses meant to be combined (cooperative ``__init__``: each takes its own keyword
and passes the rest on), e.g. ``class Refiner(PartialDiffusionReconstruction, SomeConditionalModule)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import fields, replace
from typing import Any

import torch

from meddiff.anomaly.reconstruction import ReconstructionConfig, reconstruct
from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.errors import ConfigError
from meddiff.models.aucp_validation import KNOWN_HEALTHY, AUCpValidation, auroc_rows, pool_names
from meddiff.models.base import DiffusionModule, _select
from meddiff.utils.options import options_from

__all__ = ["AnomalyScoring", "PartialDiffusionReconstruction", "drop_legacy_recon"]


class AnomalyScoring(AUCpValidation, DiffusionModule):
    """A diffusion model whose ``reconstruct(batch)`` is a healthy estimate that ``meddiff.anomaly`` scores.

    Args (besides :class:`~meddiff.models.base.DiffusionModule`'s):
        scoring: :class:`~meddiff.anomaly.scoring.ScoringConfig` fields for ``val/auroc`` (and the anomaly
            protocol's default setting).
        aucp_rho: share of healthy images in the unannotated pool, if known (logs ``val/aucp_debiased``).

    Validation adds ``val/auroc`` over the batches that carry ``label`` (0 healthy / 1 anomalous) while
    :attr:`score_in_validation` is True; the region is ``batch['brain_mask']`` when present. Batches tagged with
    ``pool`` (``data.aucp_holdout > 0``: the val split as ``unannotated_labelled``, then a loader of held-out
    ``known_healthy`` images) also feed ``val/aucp``, logged in the epochs that scored such rows: the val rows keep
    their ``val/auroc`` and ``val/loss`` exactly as without pools, and the known-healthy rows enter neither.
    """

    eval_protocol: str | None = "anomaly"

    def __init__(self, *args: Any, scoring: Mapping[str, Any] | None = None, aucp_rho: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scoring_cfg: ScoringConfig = options_from(ScoringConfig, scoring, "model.scoring")
        self.init_aucp(aucp_rho)  # also makes self.val_auroc (a RawScoreAUROC: exact on scores of any range)
        self._val_has_anomalies = False

    @property
    def score_in_validation(self) -> bool:
        """Whether this validation batch is reconstructed and scored for ``val/auroc``."""
        return True

    def log(self, name: str, value: Any, *args: Any, add_dataloader_idx: bool = False, **kwargs: Any) -> None:
        """``LightningModule.log`` without the ``/dataloader_idx_N`` suffix: with ``aucp_holdout`` the validation
        loaders are pools of one validation set, and ``val/loss`` keeps its name (one loader only: no effect)."""
        super().log(name, value, *args, add_dataloader_idx=add_dataloader_idx, **kwargs)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        tagged = "pool" in batch
        pools = pool_names(batch) if tagged else None
        known = None if pools is None else torch.tensor([p == KNOWN_HEALTHY for p in pools],
                                                        device=batch["image"].device)
        if known is None or not known.any():
            super().validation_step(batch, batch_idx)  # val/loss, as without pools
        elif not known.all():
            super().validation_step(_select(batch, ~known), batch_idx)
        if not self.score_in_validation or not ("label" in batch or tagged):
            return
        recon = self.validation_reconstruct(batch)
        scores = score_batch(batch["image"], recon, batch.get("brain_mask"), self.scoring_cfg)["score"]
        if tagged:
            self.update_aucp(batch, scores, pools)
            lab = auroc_rows(pools, scores.device)
            if "label" in batch and lab.any():
                labels = batch["label"].long()
                self.val_auroc.update(scores if lab.all() else scores[lab], labels if lab.all() else labels[lab])
                self._val_has_anomalies = True
        else:
            self.val_auroc.update(scores, batch["label"].long())
            self._val_has_anomalies = True

    def validation_reconstruct(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The healthy estimate scored for ``val/auroc`` (default: :meth:`reconstruct`)."""
        return self.reconstruct(batch)

    def on_validation_epoch_end(self) -> None:
        if self._val_has_anomalies:
            try:
                auroc = self.val_auroc.compute()
            except Exception:  # one class only in this (sanity-check) pass
                auroc = torch.tensor(float("nan"))
            self.log("val/auroc", auroc, prog_bar=True, sync_dist=True)
            self.val_auroc.reset()
            self._val_has_anomalies = False
        if self.aucp_seen():
            self.log_aucp()


class PartialDiffusionReconstruction(AnomalyScoring):
    """Healthy estimate by partial diffusion: noise ``batch['image']`` to ``recon.t_start`` and denoise it.

    Args (besides :class:`AnomalyScoring`'s):
        recon: :class:`~meddiff.anomaly.reconstruction.ReconstructionConfig` fields (validated against the
            schedule's length at construction).
        val_recon: fields of ``recon`` changed for the per-epoch ``val/auroc`` only (None or ``{}``: ``recon`` as
            is). The evaluation protocol and :meth:`reconstruct` always use ``recon``.
    """

    def __init__(self, *args: Any, recon: Mapping[str, Any] | None = None,
                 val_recon: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recon_cfg: ReconstructionConfig = options_from(ReconstructionConfig, recon, "model.recon")
        self.recon_cfg.validate(self.schedule.num_train_timesteps)
        self.val_recon: dict[str, Any] = _recon_changes(val_recon)
        self.validation_recon_cfg().validate(self.schedule.num_train_timesteps)

    def validation_recon_cfg(self) -> ReconstructionConfig:
        """``recon_cfg`` with the ``val_recon`` changes (read at call time: subclasses may adjust ``recon_cfg``)."""
        return replace(self.recon_cfg, **self.val_recon) if self.val_recon else self.recon_cfg

    def validation_reconstruct(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.reconstruct(batch, self.validation_recon_cfg())

    def reconstruct(self, batch: Mapping[str, Any], recon: ReconstructionConfig | None = None) -> torch.Tensor:
        """Healthy estimate of ``batch['image']``: ``[B, C, H, W] in [-1, 1]``.

        ``recon`` (default: the model's ``recon_cfg``) is used as given and never stored: a protocol trying other
        depths passes a copy (``dataclasses.replace(model.recon_cfg, t_start=...)``).
        """
        cfg = self.recon_cfg if recon is None else recon
        return reconstruct(self.model_fn(batch), self.schedule, batch["image"], cfg)


def _recon_changes(val_recon: Mapping[str, Any] | None) -> dict[str, Any]:
    """``model.val_recon`` as a plain dict of known :class:`ReconstructionConfig` fields (ConfigError otherwise)."""
    if val_recon is None:
        return {}
    if not isinstance(val_recon, Mapping):
        raise ConfigError(f"model.val_recon={val_recon!r} must be a mapping of model.recon fields, e.g. {{n_noise: 1}}.")
    known = {f.name for f in fields(ReconstructionConfig)}
    unknown = sorted(set(val_recon) - known)
    if unknown:
        raise ConfigError(f"model.val_recon has unknown keys {unknown}; use model.recon fields: {sorted(known)}.")
    return dict(val_recon)


def drop_legacy_recon(kwargs: MutableMapping[str, Any], owner: str, instead: str) -> None:
    """Remove ``recon`` from the constructor ``kwargs`` of a model that does not reconstruct by partial diffusion.

    Checkpoints written before the models were split (meddiff 0.1) store ``recon: null`` in their config; it is
    accepted and ignored with a ``DeprecationWarning`` for one release. A non-null ``recon`` would be silently
    unused, so it is a ``ConfigError`` pointing at ``instead``.
    """
    if "recon" not in kwargs:
        return
    value = kwargs.pop("recon")
    if value is not None:
        raise ConfigError(f"model.recon is not used by {owner} ({instead}); remove it from the model config.")
    warnings.warn(
        f"model.recon: null is no longer an option of {owner} and is ignored; remove it from the config "
        "(accepted for checkpoints written by meddiff 0.1, for one release).",
        DeprecationWarning,
        stacklevel=3,
    )
