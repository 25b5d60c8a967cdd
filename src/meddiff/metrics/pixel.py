"""Pixel-level segmentation metrics in bounded memory: AUROC, AUPRC and Dice over millions of pixels.

``PixelAccumulator`` keeps two integer histograms over fixed bins (lesion pixels and non-lesion pixels), so
its memory is ``O(num_bins)`` whatever the number of pixels, updates are exact integer additions (updating in
chunks gives exactly the same state as one big update, and accumulators merge by adding), and every metric is
computed from the same state. It does not use torchmetrics' binned curves: those hold an equivalent state
but their vectorised update materialises an ``N x num_thresholds`` comparison, and they do not give Dice at
every threshold.

Binning: ``edges = linspace(min_value, max_value, num_bins + 1)``; a pixel with value ``v`` falls in bin ``k``
when ``edges[k] <= v < edges[k+1]`` (the last bin also holds ``v == max_value``). Values outside
``[min_value, max_value]`` are clipped into the first/last bin and counted (a warning at ``compute``). The
candidate thresholds are the edges: "positive" means ``v >= edges[k]``. All metrics are then exact for the
scores quantised to their bin's lower edge: AUROC (trapezoid, ties one half) and AUPRC (average precision,
step rule) equal scikit-learn's on the quantised scores; against the raw scores they differ by at most the
share of pairs that fall in one bin (tests: within 1e-2 with 1000 bins).

Evaluation protocol: ``choose_threshold(val_acc)`` picks the Dice-maximising threshold on *validation*; apply
it to the test accumulator with ``test_acc.dice_at(thr)``. ``compute()["oracle_dice"]`` is the best Dice on
the data itself (an optimistic bound): report it labelled as oracle.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from meddiff.errors import ConfigError, DataError

DICE_REDUCTIONS = ("none", "pooled", "mean")


def _as_bool(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bool else t != 0


class PixelAccumulator:
    """Streaming, mergeable histograms of lesion / non-lesion pixel scores.

    Args:
        num_bins: number of histogram bins (``>= 2``); resolution of thresholds is ``(max - min) / num_bins``.
        max_value: upper end of the binned range (2.0 covers an L1 or SSIM map of ``[-1, 1]`` images; use 4.0
            for L2 maps, or a smaller value for finer resolution when maps are known to be small).
        min_value: lower end (0.0 for non-negative anomaly maps).
    """

    def __init__(self, num_bins: int = 1000, max_value: float = 2.0, min_value: float = 0.0) -> None:
        if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 2:
            raise ConfigError(f"num_bins={num_bins!r} must be an integer >= 2 (e.g. 1000).")
        if not (np.isfinite(min_value) and np.isfinite(max_value)) or max_value <= min_value:
            raise ConfigError(
                f"need finite min_value < max_value for the score bins; got min_value={min_value}, "
                f"max_value={max_value}."
            )
        self.num_bins = num_bins
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        self.edges = torch.linspace(self.min_value, self.max_value, num_bins + 1, dtype=torch.float64)
        self.reset()

    def reset(self) -> None:
        """Forget all pixels."""
        self.pos_hist = torch.zeros(self.num_bins, dtype=torch.int64)
        self.neg_hist = torch.zeros(self.num_bins, dtype=torch.int64)
        self.n_clipped = 0

    @property
    def thresholds(self) -> np.ndarray:
        """Candidate thresholds ``[num_bins + 1]`` (the bin edges, ascending)."""
        return self.edges.numpy()

    def update(self, maps: torch.Tensor, masks: torch.Tensor, region: torch.Tensor | None = None) -> None:
        """Add a batch of pixels.

        Args:
            maps: ``[B, 1, H, W]`` float anomaly maps (any device).
            masks: bool ``[B, 1, H, W]`` lesion ground truth.
            region: optional bool ``[B, 1, H, W]``: only these pixels count (e.g. the brain mask).
        """
        if not isinstance(maps, torch.Tensor) or maps.ndim != 4:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise DataError(f"maps must be a [B, 1, H, W] tensor; got {shape}.")
        if not isinstance(masks, torch.Tensor) or masks.shape != maps.shape:
            shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise DataError(f"masks shape {shape} must equal maps shape {tuple(maps.shape)}.")
        if region is not None and (not isinstance(region, torch.Tensor) or region.shape != maps.shape):
            shape = tuple(region.shape) if isinstance(region, torch.Tensor) else type(region).__name__
            raise DataError(f"region shape {shape} must equal maps shape {tuple(maps.shape)}.")
        v = maps.detach().reshape(-1).to(torch.float64)
        t = _as_bool(masks).to(v.device).reshape(-1)
        keep = None if region is None else _as_bool(region).to(v.device).reshape(-1)
        nan = torch.isnan(v)
        if keep is not None:
            nan &= keep
        if nan.any():
            raise DataError(f"maps contain {int(nan.sum())} NaN pixels inside the region; fix the maps.")
        v = v.nan_to_num(nan=self.min_value)  # NaN outside the region: any bin, it is dropped below
        K = self.num_bins
        clipped = (v < self.min_value) | (v > self.max_value)
        if keep is not None:
            clipped &= keep
        self.n_clipped += int(clipped.sum())
        # Bin index with edges[k] <= v < edges[k+1]: arithmetic guess, then a one-step correction against the
        # stored edges so that the bins agree exactly with the thresholds "v >= edges[k]".
        edges = self.edges.to(v.device)
        scale = K / (self.max_value - self.min_value)
        idx = ((v - self.min_value) * scale).floor_().clamp_(0, K - 1).long()
        idx -= (v < edges[idx]).long()
        idx.clamp_(0, K - 1)
        idx += ((v >= edges[idx + 1]) & (idx < K - 1)).long()
        code = idx * 2 + t.long()  # 2k: non-lesion pixel in bin k, 2k+1: lesion pixel in bin k
        if keep is not None:
            code = torch.where(keep, code, torch.full_like(code, 2 * K))  # out of region: a dropped slot
        if code.is_cuda:
            counts = torch.bincount(code, minlength=2 * K + 1)[: 2 * K].cpu()
        else:
            counts = torch.from_numpy(np.bincount(code.numpy(), minlength=2 * K + 1)[: 2 * K])
        counts = counts.view(K, 2).to(torch.int64)
        self.neg_hist += counts[:, 0]
        self.pos_hist += counts[:, 1]

    def merge(self, other: PixelAccumulator) -> PixelAccumulator:
        """Add another accumulator's pixels (same bins) into this one; returns self."""
        if not isinstance(other, PixelAccumulator) or not torch.equal(other.edges, self.edges):
            raise ConfigError(
                "can only merge PixelAccumulators with identical num_bins, min_value and max_value."
            )
        self.pos_hist += other.pos_hist
        self.neg_hist += other.neg_hist
        self.n_clipped += other.n_clipped
        return self

    def _counts(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        """``tp[k], fp[k]`` for ``v >= edges[k]``, ``k = 0..num_bins`` (``[num_bins + 1]``), and totals."""
        pos = self.pos_hist.numpy().astype(np.float64)
        neg = self.neg_hist.numpy().astype(np.float64)
        tp = np.r_[np.cumsum(pos[::-1])[::-1], 0.0]
        fp = np.r_[np.cumsum(neg[::-1])[::-1], 0.0]
        return tp, fp, float(pos.sum()), float(neg.sum())

    def curves(self) -> dict[str, np.ndarray]:
        """Per-threshold curves ``[num_bins + 1]``: thresholds, tpr, fpr, precision, dice (pooled)."""
        tp, fp, P, N = self._counts()
        pred = tp + fp
        return {
            "thresholds": self.thresholds.copy(),
            "tpr": tp / P if P > 0 else np.full_like(tp, np.nan),
            "fpr": fp / N if N > 0 else np.full_like(fp, np.nan),
            "precision": np.divide(tp, pred, out=np.ones_like(tp), where=pred > 0),
            "dice": _pooled_dice_from_counts(tp, fp, P),
        }

    def compute(self) -> dict[str, Any]:
        """Pixel AUROC, AUPRC and the oracle (best-on-this-data) pooled Dice.

        Returns:
            ``{"auroc", "auprc", "oracle_dice", "oracle_threshold", "n_pos_pixels", "n_neg_pixels",
            "n_clipped"}``; the oracle threshold is the lowest edge reaching the best Dice.

        Raises:
            DataError: no lesion pixels or no non-lesion pixels were seen.
        """
        tp, fp, P, N = self._counts()
        if P == 0 or N == 0:
            raise DataError(
                f"pixel metrics need lesion and non-lesion pixels; seen {int(P)} lesion and {int(N)} other pixels "
                "(is the mask empty, or the region excluding every lesion?)."
            )
        if self.n_clipped:
            warnings.warn(
                f"{self.n_clipped} pixel scores fell outside [{self.min_value}, {self.max_value}] and were "
                "clipped into the edge bins; widen min_value/max_value of PixelAccumulator.",
                stacklevel=2,
            )
        tpr, fpr = tp / P, fp / N
        auroc = float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) * 0.5))
        pred = tp + fp
        precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
        auprc = float(np.sum((tpr[:-1] - tpr[1:]) * precision[:-1]))
        dice = _pooled_dice_from_counts(tp, fp, P)
        k = int(np.argmax(dice))
        return {
            "auroc": auroc,
            "auprc": auprc,
            "oracle_dice": float(dice[k]),
            "oracle_threshold": float(self.edges[k]),
            "n_pos_pixels": int(P),
            "n_neg_pixels": int(N),
            "n_clipped": int(self.n_clipped),
        }

    def dice_at(self, threshold: float) -> float:
        """Pooled Dice of the segmentation ``map >= threshold`` over all pixels seen.

        ``threshold`` is snapped to the nearest bin edge (exact for thresholds from ``choose_threshold`` on an
        accumulator with the same bins). Below ``min_value`` everything is positive; above ``max_value``
        nothing is. If there are neither lesion pixels nor predicted pixels the Dice is 1.0.
        """
        if not np.isfinite(threshold):
            raise ConfigError(f"threshold={threshold} must be finite.")
        tp, fp, P, _ = self._counts()
        k = int(np.argmin(np.abs(self.thresholds - float(threshold))))
        return float(_pooled_dice_from_counts(tp[k : k + 1], fp[k : k + 1], P)[0])


def _pooled_dice_from_counts(tp: np.ndarray, fp: np.ndarray, P: float) -> np.ndarray:
    den = tp + fp + P  # = 2 TP + FP + FN
    return np.divide(2.0 * tp, den, out=np.ones_like(tp), where=den > 0)


def choose_threshold(val_accumulator: PixelAccumulator) -> float:
    """The threshold maximising pooled Dice on validation pixels (lowest such bin edge).

    Use it on the test set with ``test_acc.dice_at(thr)`` (or ``maps >= thr``).
    """
    if not isinstance(val_accumulator, PixelAccumulator):
        raise ConfigError(
            f"choose_threshold needs a PixelAccumulator filled with validation pixels, got "
            f"{type(val_accumulator).__name__}."
        )
    return float(val_accumulator.compute()["oracle_threshold"])


def dice_score(
    pred: torch.Tensor, target: torch.Tensor, reduction: str = "none", empty_value: float = 1.0
) -> torch.Tensor:
    """Dice ``2|A & B| / (|A| + |B|)`` of binary segmentations.

    Args:
        pred, target: bool ``[B, ...]`` (e.g. ``[B, 1, H, W]``) of the same shape.
        reduction: ``"none"`` -> ``[B]`` per image; ``"pooled"`` -> scalar over all pixels of the batch;
            ``"mean"`` -> scalar mean of the per-image values.
        empty_value: Dice when both prediction and target are empty (per image, or overall when pooled).

    Returns:
        float64 tensor ``[B]`` or 0-dim, values in ``[0, 1]``.
    """
    if reduction not in DICE_REDUCTIONS:
        raise ConfigError(f"unknown dice reduction {reduction!r}; choose one of {list(DICE_REDUCTIONS)}.")
    if (
        not isinstance(pred, torch.Tensor)
        or not isinstance(target, torch.Tensor)
        or pred.shape != target.shape
    ):
        ps = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        ts = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise DataError(f"pred and target must be tensors of the same shape; got pred {ps} and target {ts}.")
    if pred.ndim < 1:
        raise DataError("pred and target need a batch dimension: [B, ...].")
    p = _as_bool(pred).reshape(pred.shape[0], -1)
    t = _as_bool(target).to(p.device).reshape(pred.shape[0], -1)
    inter = (p & t).sum(dim=1).to(torch.float64)
    total = (p.sum(dim=1) + t.sum(dim=1)).to(torch.float64)
    if reduction == "pooled":
        inter, total = inter.sum(), total.sum()
    d = torch.where(total > 0, 2.0 * inter / total.clamp_min(1), torch.full_like(total, float(empty_value)))
    return d.mean() if reduction == "mean" else d
