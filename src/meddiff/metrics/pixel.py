"""Pixel-level segmentation metrics in bounded memory: AUROC, AUPRC, Dice, AUPRO and F1-max over millions of pixels.

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

AUPRO (MVTec AD, Bergmann et al. 2021; anomalib's ``AUPRO``): the ground-truth lesion pixels of each 2D map
(inside the region) are split into connected components (``scipy.ndimage.label``, 8-connectivity as MVTec and
anomalib); at a threshold the per-region overlap (PRO) is the mean over components of the share of the component's
pixels with ``v >= threshold``, the FPR the share of normal pixels above it; the PRO-vs-FPR curve is integrated
(trapezoid, linearly interpolated at the limit) from FPR 0 to ``AUPRO_FPR_LIMIT = 0.3`` and divided by 0.3, so a
perfect map gives 1.0 and a constant one 0.15. Memory stays bounded: the thresholds are the same ``num_bins + 1``
edges, and each component adds its cumulative overlap per bin (in exact int64 fixed point, ``2**32`` = a whole
component) into one ``[num_bins]`` histogram, so updates in chunks and merges give the very same state. Components
are per 2D map (a 3D lesion evaluated slice by slice is one component per slice). F1-max is the best pixel F1 =
``2PR / (P + R)`` over the edges; for pixels this is the pooled Dice, so it equals ``oracle_dice`` (reported under
anomalib's name for comparison).

Evaluation protocol: ``choose_threshold(val_acc)`` picks the Dice-maximising threshold on *validation*; apply
it to the test accumulator with ``test_acc.dice_at(thr)``. ``compute()["oracle_dice"]`` is the best Dice on
the data itself (an optimistic bound): report it labelled as oracle.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from meddiff.errors import ConfigError, DataError

DICE_REDUCTIONS = ("none", "pooled", "mean")
#: AUPRO integrates the PRO curve from FPR 0 up to this FPR (MVTec AD / anomalib default)
AUPRO_FPR_LIMIT = 0.3
#: fixed-point unit of the per-region overlap histogram: one whole component
_PRO_UNIT = 2**32
#: components whose ``[num_bins]`` counts are built at once (bounds the update's temporary memory)
_REGION_CELLS = 2_000_000
_CONNECTIVITY_8 = np.ones((3, 3), dtype=int)


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
        self.pro_hist = torch.zeros(self.num_bins, dtype=torch.int64)  # per-region overlap, units of _PRO_UNIT
        self.n_regions = 0
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
        lesion = t if keep is None else t & keep
        if lesion.any():
            self._add_regions(lesion.view(maps.shape).cpu().numpy(), idx.view(maps.shape).cpu().numpy())

    def _add_regions(self, lesion: np.ndarray, idx: np.ndarray) -> None:
        """Each connected lesion component of each 2D map ``[B, C, H, W]`` adds its cumulative overlap per bin."""
        K = self.num_bins
        region_of = np.zeros(lesion.shape, dtype=np.int64)  # 0 = no lesion; components numbered across maps
        n = 0
        for b in range(lesion.shape[0]):
            for c in range(lesion.shape[1]):
                if lesion[b, c].any():
                    lab, k = ndimage.label(lesion[b, c], structure=_CONNECTIVITY_8)
                    region_of[b, c] = np.where(lab > 0, lab + n, 0)
                    n += k
        sel = region_of > 0
        rid, bins = region_of[sel] - 1, idx[sel]
        order = np.argsort(rid, kind="stable")
        rid, bins = rid[order], bins[order]
        starts = np.searchsorted(rid, np.arange(0, n + 1))
        step = max(1, _REGION_CELLS // K)
        total = np.zeros(K, dtype=np.int64)
        for r0 in range(0, n, step):  # a block of components at a time: temporary memory O(step * K)
            r1 = min(n, r0 + step)
            lo, hi = starts[r0], starts[r1]
            counts = np.bincount((rid[lo:hi] - r0) * K + bins[lo:hi], minlength=(r1 - r0) * K).reshape(r1 - r0, K)
            cum = np.concatenate([np.cumsum(counts[:, ::-1], axis=1)[:, ::-1], np.zeros((r1 - r0, 1))], axis=1)
            # rounded cumulative overlap, then per-bin increments: each component sums to exactly one unit
            fixed = np.floor(cum * (_PRO_UNIT / cum[:, :1]) + 0.5).astype(np.int64)
            total += (fixed[:, :-1] - fixed[:, 1:]).sum(axis=0)
        self.pro_hist += torch.from_numpy(total)
        self.n_regions += n

    def merge(self, other: PixelAccumulator) -> PixelAccumulator:
        """Add another accumulator's pixels (same bins) into this one; returns self."""
        if not isinstance(other, PixelAccumulator) or not torch.equal(other.edges, self.edges):
            raise ConfigError(
                "can only merge PixelAccumulators with identical num_bins, min_value and max_value."
            )
        self.pos_hist += other.pos_hist
        self.neg_hist += other.neg_hist
        self.pro_hist += other.pro_hist
        self.n_regions += other.n_regions
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
        """Per-threshold curves ``[num_bins + 1]``: thresholds, tpr, fpr, precision, dice (pooled), pro (mean
        per-region overlap)."""
        tp, fp, P, N = self._counts()
        pred = tp + fp
        return {
            "thresholds": self.thresholds.copy(),
            "tpr": tp / P if P > 0 else np.full_like(tp, np.nan),
            "fpr": fp / N if N > 0 else np.full_like(fp, np.nan),
            "precision": np.divide(tp, pred, out=np.ones_like(tp), where=pred > 0),
            "dice": _pooled_dice_from_counts(tp, fp, P),
            "pro": self._pro(),
        }

    def _pro(self) -> np.ndarray:
        """Mean per-region overlap at each edge ``[num_bins + 1]`` (NaN without lesion components)."""
        if self.n_regions == 0:
            return np.full(self.num_bins + 1, np.nan)
        cum = np.r_[np.cumsum(self.pro_hist.numpy()[::-1])[::-1], 0]  # exact integers
        return cum.astype(np.float64) / (float(_PRO_UNIT) * self.n_regions)

    def compute(self) -> dict[str, Any]:
        """Pixel AUROC, AUPRC and the oracle (best-on-this-data) pooled Dice.

        Returns:
            ``{"auroc", "auprc", "oracle_dice", "oracle_threshold", "aupro", "f1_max", "n_pos_pixels",
            "n_neg_pixels", "n_regions", "n_clipped"}``; the oracle threshold is the lowest edge reaching the best
            Dice; ``aupro`` up to FPR :data:`AUPRO_FPR_LIMIT` (normalised to ``[0, 1]``), ``f1_max`` the best pixel F1.

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
        recall = tpr
        pr = precision + recall
        f1 = np.divide(2.0 * precision * recall, pr, out=np.zeros_like(pr), where=pr > 0)
        return {
            "auroc": auroc,
            "auprc": auprc,
            "oracle_dice": float(dice[k]),
            "oracle_threshold": float(self.edges[k]),
            "aupro": area_up_to(fpr, self._pro(), AUPRO_FPR_LIMIT) / AUPRO_FPR_LIMIT,
            "f1_max": float(f1.max()),
            "n_pos_pixels": int(P),
            "n_neg_pixels": int(N),
            "n_regions": int(self.n_regions),
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


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the curve ``(x, y)`` from its smallest ``x`` up to ``x_max``, ``y`` linearly interpolated
    at ``x_max`` when no point lies there.

    ``x`` must be monotone (either direction, ties allowed: vertical steps add no area) and span ``x_max``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size and x[0] > x[-1]:
        x, y = x[::-1], y[::-1]
    if x.size < 2 or not (x[0] <= x_max <= x[-1]):
        raise DataError(f"the curve must span x_max={x_max}; its x runs over [{x.min() if x.size else 'nan'}, "
                        f"{x.max() if x.size else 'nan'}].")
    i = int(np.searchsorted(x, x_max, side="right"))  # x[:i] <= x_max < x[i:]
    area = float(np.sum((x[1:i] - x[: i - 1]) * (y[1:i] + y[: i - 1]) * 0.5))
    if i < x.size and x[i - 1] < x_max:
        y_max = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        area += (x_max - x[i - 1]) * (y[i - 1] + y_max) * 0.5
    return area


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
