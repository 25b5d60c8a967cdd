"""One anomaly-validation component for every family that scores anomalies: scoring, AUCp pools, which batches.

:class:`AnomalyValidation` (an ``nn.Module`` a model holds as ``self.anomaly_val``; its metric states are not
persistent, so checkpoints keep their keys) scores a validation batch's healthy estimate with the one scorer
(``meddiff.anomaly.scoring``: ``model.scoring``), accumulates the scores per pool and logs ``val/aucp`` (Brainomaly's
label-free AUCp, + ``val/aucp_debiased``) beside the labelled ``val/auroc``. :func:`chosen_batches` is the policy of
which validation batches are scored (``model.val_batches``). Used by ``unconditional``, ``guided``, ``refiner`` and
``coarse_gan`` (the conditional denoiser uses the batch policy only).

Validation batches say which *pool* each image comes from (batch key ``pool``, one string per image). The tag is
the image's role for AUCp, and says whether its ``label`` may be read for ``val/auroc``:

- ``known_healthy``: known-healthy images held out of training (image folders; the ``data.aucp_holdout`` pool of
  any SplitDataModule). AUCp label 0; a ``label`` they carry is ignored (never in ``val/auroc``).
- ``unannotated``: the unannotated pool, healthy and diseased mixed (image folders). AUCp label 1; its labels are
  never in the batch.
- ``unannotated_labelled``: a labelled val split standing in as the unannotated pool (a SplitDataModule's val split
  with ``aucp_holdout > 0``). AUCp label 1 and AUCp never reads its ``label``; ``val/auroc`` scores the ``label``
  (the selection rule that needs labels, exactly as without the option).
- ``labelled``: a labelled validation set (``label`` 0/1), scored as ``val/auroc`` only (not in AUCp).

Batches without ``pool``: rows with a ``label`` count as ``labelled``, the others as ``known_healthy``.
``meddiff.data.known_healthy`` / ``meddiff.data.modules.image_folder`` write these tags.

``val/aucp`` = ROC-AUC of the scores with pool membership as the target (``meddiff.metrics.aucp``), computed with
torchmetrics so it syncs across DDP processes. With ``aucp_rho`` (the share of healthy images in the unannotated
pool, if the user knows it) ``val/aucp_debiased`` = ``(AUCp - 0.5 rho) / (1 - rho)`` is logged too. Both are usable
as ``optimized_metric`` (checkpoint monitor, Optuna objective) by a user who has no labelled validation data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.errors import ConfigError
from meddiff.metrics.aucp import debiased_auc
from meddiff.utils.options import options_from

log_ = logging.getLogger(__name__)

KNOWN_HEALTHY, UNANNOTATED, LABELLED = "known_healthy", "unannotated", "labelled"
UNANNOTATED_LABELLED = "unannotated_labelled"
POOLS = (KNOWN_HEALTHY, UNANNOTATED, LABELLED, UNANNOTATED_LABELLED)
#: pools that are the unannotated side of AUCp (label 1), and pools whose ``label`` ``val/auroc`` scores
AUCP_POSITIVE = (UNANNOTATED, UNANNOTATED_LABELLED)
AUROC_POOLS = (LABELLED, UNANNOTATED_LABELLED)


def pool_names(batch: Mapping[str, Any]) -> list[str]:
    """The pool of each row of a dict batch (see the module docstring)."""
    n = batch["image"].shape[0]
    pools = batch.get("pool")
    if pools is None:
        if "label" in batch:
            return [LABELLED] * n
        return [KNOWN_HEALTHY] * n
    pools = [str(p) for p in pools]
    bad = sorted(set(pools) - set(POOLS))
    if bad or len(pools) != n:
        raise ConfigError(f"batch['pool'] holds {bad or pools[:3]}; each row must be one of {list(POOLS)}.")
    return pools


def auroc_rows(pools: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[B]``: the rows whose ``label`` ``val/auroc`` scores (``labelled`` and ``unannotated_labelled``)."""
    return torch.tensor([p in AUROC_POOLS for p in pools], dtype=torch.bool, device=device)


class RawScoreAUROC(Metric):
    """Binary ROC-AUC of raw scores of any range, exact (ties count 1/2), over all updates and DDP ranks.

    Not torchmetrics' ``BinaryAUROC``: that one passes each update's scores through a sigmoid when any of them lies
    outside ``[0, 1]``, so an epoch whose batches fall on both sides mixes raw and squashed scores and the AUC is
    wrong (e.g. known-healthy batches scored in ``[0, 1]`` and an unannotated batch with a score above 1).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds.detach().double().flatten())
        self.target.append(target.detach().long().flatten())

    def compute(self) -> torch.Tensor:
        """The AUC (float32 scalar); NaN with one class only or nothing accumulated (never raises: an exception
        inside torchmetrics' DDP sync context would leave the synced states behind)."""
        preds, target = _as_numpy(self.preds), _as_numpy(self.target)
        if preds.size == 0 or np.unique(target).size < 2:
            return torch.tensor(float("nan"))
        return torch.tensor(float(roc_auc_score(target, preds)), dtype=torch.float32)


def _as_numpy(state: list[torch.Tensor] | torch.Tensor) -> np.ndarray:
    """A list state (one tensor per update; one concatenated tensor after a DDP sync) as a flat numpy array."""
    if isinstance(state, list):
        if not state:
            return np.zeros(0)
        state = dim_zero_cat(state)
    return state.detach().cpu().numpy().reshape(-1)


LogFn = Callable[..., Any]  # LightningModule.log


def chosen_batches(count: int | None, n_batches: float | int | None, spread: bool) -> set[int] | None:
    """Indices of the validation batches (of one loader) that are scored: ``None`` = all of them.

    ``count`` None = all; 0 = none; k = the first k batches, or with ``spread`` k batches spread evenly over the
    loader's ``n_batches`` (first and last included; the first k when the size is unknown or <= k).
    """
    if count is None:
        return None
    k = int(count)
    if k <= 0:
        return set()
    n = int(n_batches) if n_batches is not None and math.isfinite(n_batches) else None
    if not spread or n is None or n <= k:
        return set(range(k))
    return {round(i * (n - 1) / (k - 1)) for i in range(k)} if k > 1 else {0}


class AnomalyValidation(nn.Module):
    """Validation scores of an anomaly model: ``val/aucp`` (+ ``val/aucp_debiased``) and ``val/auroc``.

    Args:
        scoring: :class:`~meddiff.anomaly.scoring.ScoringConfig` fields (``model.scoring``).
        aucp_rho: share of healthy images in the unannotated pool, if known (logs ``val/aucp_debiased``).
        label_free: the model selects without labels (refiner family): batches without ``pool`` and ``label`` are
            scored as known-healthy AUCp rows and ``val/aucp`` is logged every epoch (NaN with a warning when a
            pool is missing). Otherwise (diffusion anomaly models) only batches with ``label`` or ``pool`` are scored
            and ``val/aucp`` is logged in the epochs that saw AUCp pools.

    Use: :meth:`scores` (``[B]``) of a batch and its healthy estimate, :meth:`update` with them, :meth:`log_epoch`
    from ``on_validation_epoch_end``.
    """

    def __init__(self, scoring: Mapping[str, Any] | ScoringConfig | None = None, aucp_rho: float | None = None,
                 label_free: bool = False) -> None:
        super().__init__()
        if aucp_rho is not None and not 0.0 <= float(aucp_rho) < 1.0:
            raise ConfigError(
                f"model.aucp_rho={aucp_rho} must be in [0, 1) (the share of healthy images in the unannotated pool) "
                "or null when unknown."
            )
        self.scoring: ScoringConfig = options_from(ScoringConfig, scoring, "model.scoring")
        self.aucp_rho = None if aucp_rho is None else float(aucp_rho)
        self.label_free = bool(label_free)
        self.val_aucp = RawScoreAUROC()
        self.val_auroc = RawScoreAUROC()  # raw scores of any range (BinaryAUROC would squash some batches)
        self._pool_counts = {p: 0 for p in POOLS}
        self._warned_pools = False

    def wants(self, batch: Mapping[str, Any]) -> bool:
        """Whether ``batch`` is scored at all (label-free: always; else it must carry ``label`` or ``pool``)."""
        return self.label_free or "label" in batch or "pool" in batch

    def loss_rows(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Bool ``[B]``: the rows ``val/loss`` counts. Label-free: the known-healthy rows (the only images known to be
        healthy); else the healthy labelled rows outside the known-healthy pool (``val/loss`` as without pools)."""
        x = batch["image"]
        known = torch.tensor([p == KNOWN_HEALTHY for p in pool_names(batch)], dtype=torch.bool, device=x.device)
        if self.label_free:
            return known
        healthy = batch["label"] == 0 if "label" in batch else torch.ones_like(known)
        return healthy & ~known if "pool" in batch else healthy

    def step(self, model: Any, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0,
             spread: bool = False) -> None:
        """One validation step of a diffusion anomaly model: ``val/loss`` on :meth:`loss_rows`, then, on the
        batches :func:`chosen_batches` picks (``model.val_batches``, ``spread``), the healthy estimate
        (``model.validation_reconstruct``) scored and accumulated. ``model``: a ``DiffusionModule``."""
        model.log_val_loss(batch, batch_idx, self.loss_rows(batch))
        chosen = chosen_batches(model.val_batches, model.num_val_batches(dataloader_idx), spread)
        if (chosen is not None and batch_idx not in chosen) or not self.wants(batch):
            return
        self.update(batch, self.scores(batch, model.validation_reconstruct(batch)))

    def scores(self, batch: Mapping[str, Any], healthy: torch.Tensor) -> torch.Tensor:
        """``[B]`` anomaly scores of ``batch['image']`` against its healthy estimate (``model.scoring``; the region
        is ``batch['brain_mask']`` when present)."""
        x = batch["image"]
        return score_batch(x.float(), healthy.float(), batch.get("brain_mask"), self.scoring)["score"]

    def update(self, batch: Mapping[str, Any], scores: torch.Tensor) -> None:
        """Add one batch's scores ``[B]``: AUCp rows by pool membership (``known_healthy`` -> 0, ``unannotated`` and
        ``unannotated_labelled`` -> 1; no ``label`` read), ``val/auroc`` rows by their ``label``."""
        pools = pool_names(batch)
        scores = scores.detach().float()
        dev = scores.device
        is_known = torch.tensor([p == KNOWN_HEALTHY for p in pools], device=dev)
        is_unann = torch.tensor([p in AUCP_POSITIVE for p in pools], device=dev)
        aucp_rows = is_known | is_unann
        if aucp_rows.any():
            # the AUCp target is pool membership only: the unannotated pool's labels never enter here
            self.val_aucp.update(scores[aucp_rows], is_unann[aucp_rows].long())
        for p in POOLS:
            self._pool_counts[p] += sum(q == p for q in pools)
        is_lab = auroc_rows(pools, dev)
        if is_lab.any():
            labels = batch["label"].to(dev)[is_lab].long()
            self.val_auroc.update(scores[is_lab], labels)

    def aucp_seen(self) -> bool:
        """Whether this validation epoch scored any image of the AUCp pools (known-healthy or unannotated)."""
        return any(self._pool_counts[p] > 0 for p in (KNOWN_HEALTHY, *AUCP_POSITIVE))

    def log_epoch(self, log: LogFn) -> None:
        """Log ``val/aucp`` (+ ``val/aucp_debiased``) and ``val/auroc`` (when labelled rows were scored) with
        ``log`` (``LightningModule.log``), then reset. Computed on every process (a DDP gather is collective)."""
        counts = self._pool_counts
        n_labelled = sum(counts[p] for p in AUROC_POOLS)
        if self.label_free or self.aucp_seen():
            self._log_aucp(log)
        if n_labelled > 0:
            # NaN with one class in all processes
            log("val/auroc", _compute(self.val_auroc), prog_bar=True, sync_dist=False, add_dataloader_idx=False)
        self.val_aucp.reset()
        self.val_auroc.reset()
        self._pool_counts = {p: 0 for p in POOLS}

    def _log_aucp(self, log: LogFn) -> None:
        counts = self._pool_counts
        n_unann = sum(counts[p] for p in AUCP_POSITIVE)
        aucp = _compute(self.val_aucp)
        if not (counts[KNOWN_HEALTHY] > 0 and n_unann > 0) and not self._warned_pools:
            log_.warning("val/aucp is NaN: validation had %d known-healthy and %d unannotated images; AUCp needs both "
                         "(check data.val_fraction, data.aucp_holdout and the unannotated pool).",
                         counts[KNOWN_HEALTHY], n_unann)
            self._warned_pools = True
        log("val/aucp", aucp, prog_bar=True, sync_dist=False, add_dataloader_idx=False)
        if self.aucp_rho is not None:
            value = float(aucp)
            deb = debiased_auc(value, self.aucp_rho) if value == value else float("nan")
            log("val/aucp_debiased", torch.tensor(deb), sync_dist=False, add_dataloader_idx=False)


def _compute(metric: Metric) -> torch.Tensor:
    try:
        with _quiet_torchmetrics():
            value = metric.compute()
    except Exception:  # nothing accumulated, or one class only
        return torch.tensor(float("nan"))
    return value.float()


class _quiet_torchmetrics:
    """torchmetrics warns when compute() runs before update() (a rank or pool without images): expected here."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
