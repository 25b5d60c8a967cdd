"""Label-free model selection in validation: ``val/aucp`` (Brainomaly's AUCp) beside the labelled ``val/auroc``.

A mixin for LightningModules that score anomalies (``score(batch) -> [B]``, larger = more anomalous): the refiner
family (``refiner``, ``coarse_gan``) and every diffusion anomaly model (``meddiff.models.anomaly.AnomalyScoring``).
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
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from meddiff.errors import ConfigError
from meddiff.metrics.aucp import debiased_auc

log = logging.getLogger(__name__)

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


class AUCpValidation:
    """Mixin: accumulate validation scores per pool and log ``val/aucp`` (+ ``val/aucp_debiased``) and ``val/auroc``.

    Call :meth:`init_aucp` in ``__init__``, :meth:`update_pools` from ``validation_step`` with the batch's scores
    ``[B]``, and :meth:`log_pools` from ``on_validation_epoch_end``. A model with its own labelled ``val/auroc``
    (``AnomalyScoring``) calls the AUCp half only: :meth:`update_aucp` and :meth:`log_aucp`.
    """

    def init_aucp(self, aucp_rho: float | None = None) -> None:
        if aucp_rho is not None and not 0.0 <= float(aucp_rho) < 1.0:
            raise ConfigError(
                f"model.aucp_rho={aucp_rho} must be in [0, 1) (the share of healthy images in the unannotated pool) "
                "or null when unknown."
            )
        self.aucp_rho = None if aucp_rho is None else float(aucp_rho)
        self.val_aucp = RawScoreAUROC()
        self.val_auroc = RawScoreAUROC()  # raw scores of any range (BinaryAUROC would squash some batches)
        self._pool_counts = {p: 0 for p in POOLS}
        self._warned_pools = False

    def update_aucp(self, batch: Mapping[str, Any], scores: torch.Tensor, pools: list[str] | None = None) -> None:
        """Add one batch's scores ``[B]`` to the AUCp accumulator (``known_healthy`` rows -> 0, ``unannotated`` and
        ``unannotated_labelled`` rows -> 1; no ``label`` is read). ``pools``: :func:`pool_names` of the batch."""
        pools = pool_names(batch) if pools is None else pools
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

    def update_pools(self, batch: Mapping[str, Any], scores: torch.Tensor) -> None:
        """Add one batch's scores ``[B]`` to the AUCp and labelled-AUROC accumulators."""
        pools = pool_names(batch)
        self.update_aucp(batch, scores, pools)
        scores = scores.detach().float()
        is_lab = auroc_rows(pools, scores.device)
        if is_lab.any():
            labels = batch["label"].to(scores.device)[is_lab].long()
            self.val_auroc.update(scores[is_lab], labels)

    def aucp_seen(self) -> bool:
        """Whether this validation epoch scored any image of the AUCp pools (known-healthy or unannotated)."""
        return any(self._pool_counts[p] > 0 for p in (KNOWN_HEALTHY, *AUCP_POSITIVE))

    def log_aucp(self) -> None:
        """Log ``val/aucp`` (NaN when a pool is missing) and ``val/aucp_debiased`` (with ``aucp_rho``); reset."""
        counts = self._pool_counts
        n_unann = sum(counts[p] for p in AUCP_POSITIVE)
        both_pools = counts[KNOWN_HEALTHY] > 0 and n_unann > 0
        # computed on every process (a DDP sync is collective); NaN when a pool is missing from all of them
        aucp = self._compute(self.val_aucp)
        if not both_pools and not self._warned_pools:
            log.warning("val/aucp is NaN: validation had %d known-healthy and %d unannotated images; AUCp needs both "
                        "(check data.val_fraction, data.aucp_holdout and the unannotated pool).",
                        counts[KNOWN_HEALTHY], n_unann)
            self._warned_pools = True
        self.log("val/aucp", aucp, prog_bar=True, sync_dist=False)
        if self.aucp_rho is not None:
            value = float(aucp)
            deb = debiased_auc(value, self.aucp_rho) if value == value else float("nan")
            self.log("val/aucp_debiased", torch.tensor(deb), sync_dist=False)
        self.val_aucp.reset()
        self._pool_counts = {p: 0 for p in POOLS}

    def log_pools(self) -> None:
        """Log ``val/aucp`` (NaN when a pool is missing), ``val/aucp_debiased`` (with ``aucp_rho``), ``val/auroc``."""
        n_labelled = sum(self._pool_counts[p] for p in AUROC_POOLS)
        self.log_aucp()
        if n_labelled > 0:
            # computed whatever this process saw (the DDP gather is collective); NaN with one class in all of them
            self.log("val/auroc", self._compute(self.val_auroc), prog_bar=True, sync_dist=False)
        self.val_auroc.reset()

    @staticmethod
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
