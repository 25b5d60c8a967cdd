"""Label-free model selection in validation: ``val/aucp`` (Brainomaly's AUCp) beside the labelled ``val/auroc``.

A mixin for LightningModules that score anomalies (``score(batch) -> [B]``, larger = more anomalous). Validation
batches say which *pool* each image comes from (batch key ``pool``, one string per image, see
``meddiff.data.image_folder``):

- ``known_healthy``: images known to be healthy (held out from training); AUCp label 0;
- ``unannotated``: the unannotated pool (healthy and diseased mixed; its labels are never in the batch); AUCp
  label 1;
- ``labelled``: a labelled validation set (``label`` 0/1 in the batch), scored as ``val/auroc`` — the selection
  rule that needs labels.

``val/aucp`` = ROC-AUC of the scores with pool membership as the target (``meddiff.metrics.aucp``), computed with
torchmetrics so it syncs across DDP processes. With ``aucp_rho`` (the share of healthy images in the unannotated
pool, if the user knows it) ``val/aucp_debiased`` = ``(AUCp - 0.5 rho) / (1 - rho)`` is logged too. Both are usable
as ``optimized_metric`` (checkpoint monitor, Optuna objective) by a user who has no labelled validation data.

Batches without ``pool``: rows with a ``label`` count as ``labelled``, the others as ``known_healthy``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics.classification import BinaryAUROC

from meddiff.errors import ConfigError
from meddiff.metrics.aucp import debiased_auc

log = logging.getLogger(__name__)

KNOWN_HEALTHY, UNANNOTATED, LABELLED = "known_healthy", "unannotated", "labelled"
POOLS = (KNOWN_HEALTHY, UNANNOTATED, LABELLED)


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


class AUCpValidation:
    """Mixin: accumulate validation scores per pool and log ``val/aucp`` (+ ``val/aucp_debiased``) and ``val/auroc``.

    Call :meth:`init_aucp` in ``__init__``, :meth:`update_pools` from ``validation_step`` with the batch's scores
    ``[B]``, and :meth:`log_pools` from ``on_validation_epoch_end``.
    """

    def init_aucp(self, aucp_rho: float | None = None) -> None:
        if aucp_rho is not None and not 0.0 <= float(aucp_rho) < 1.0:
            raise ConfigError(
                f"model.aucp_rho={aucp_rho} must be in [0, 1) (the share of healthy images in the unannotated pool) "
                "or null when unknown."
            )
        self.aucp_rho = None if aucp_rho is None else float(aucp_rho)
        self.val_aucp = BinaryAUROC()
        self.val_auroc = BinaryAUROC()
        self._pool_counts = {p: 0 for p in POOLS}
        self._labelled_pos = 0
        self._warned_pools = False

    def update_pools(self, batch: Mapping[str, Any], scores: torch.Tensor) -> None:
        """Add one batch's scores ``[B]`` to the AUCp and labelled-AUROC accumulators."""
        pools = pool_names(batch)
        scores = scores.detach().float()
        dev = scores.device
        is_known = torch.tensor([p == KNOWN_HEALTHY for p in pools], device=dev)
        is_unann = torch.tensor([p == UNANNOTATED for p in pools], device=dev)
        is_lab = torch.tensor([p == LABELLED for p in pools], device=dev)
        aucp_rows = is_known | is_unann
        if aucp_rows.any():
            # the AUCp target is pool membership only: the unannotated pool's labels never enter here
            self.val_aucp.update(scores[aucp_rows], is_unann[aucp_rows].long())
        if is_lab.any():
            labels = batch["label"].to(dev)[is_lab].long()
            self.val_auroc.update(scores[is_lab], labels)
            self._labelled_pos += int(labels.sum())
        for p in POOLS:
            self._pool_counts[p] += sum(q == p for q in pools)

    def log_pools(self) -> None:
        """Log ``val/aucp`` (NaN when a pool is missing), ``val/aucp_debiased`` (with ``aucp_rho``), ``val/auroc``."""
        counts = self._pool_counts
        nan = torch.tensor(float("nan"))
        both_pools = counts[KNOWN_HEALTHY] > 0 and counts[UNANNOTATED] > 0
        aucp = self._compute(self.val_aucp) if both_pools else nan
        if not both_pools and not self._warned_pools:
            log.warning("val/aucp is NaN: validation had %d known-healthy and %d unannotated images; AUCp needs both "
                        "(check data.val_fraction and the unannotated pool).", counts[KNOWN_HEALTHY], counts[UNANNOTATED])
            self._warned_pools = True
        self.log("val/aucp", aucp, prog_bar=True, sync_dist=False)
        if self.aucp_rho is not None:
            value = float(aucp)
            deb = debiased_auc(value, self.aucp_rho) if value == value else float("nan")
            self.log("val/aucp_debiased", torch.tensor(deb), sync_dist=False)
        if counts[LABELLED] > 0:
            both_classes = 0 < self._labelled_pos < counts[LABELLED]
            self.log("val/auroc", self._compute(self.val_auroc) if both_classes else nan, prog_bar=True,
                     sync_dist=False)
        self.val_aucp.reset()
        self.val_auroc.reset()
        self._pool_counts = {p: 0 for p in POOLS}
        self._labelled_pos = 0

    @staticmethod
    def _compute(metric: BinaryAUROC) -> torch.Tensor:
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
