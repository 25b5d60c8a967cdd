"""Headless figures (matplotlib object API on the Agg canvas; pyplot and its global backend are never touched).

Every ``save_*`` writes through :func:`save_figure`, i.e. atomically with :func:`meddiff.utils.io.atomic_write`
(temporary file in the target folder, then ``os.replace``; mode 0644), so a reader never sees a half-written
image. The format follows the extension of ``path`` (``.png`` recommended; ``.pdf``/``.svg`` work too). Parent
folders are created.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from meddiff.errors import DataError
from meddiff.utils.io import atomic_write

__all__ = [
    "example_arrays",
    "map_color_max",
    "save_anomaly_grid",
    "save_roc_pr",
    "save_metric_curves",
    "roc_curve",
    "pr_curve",
    "save_figure",
    "to_numpy",
]


# ------------------------------------------------------------------------------------------------ helpers
def to_numpy(x: Any) -> np.ndarray:
    """torch tensor / array-like -> numpy (detached, on CPU, float32 unless bool)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    a = np.asarray(x)
    return a if a.dtype == bool else a.astype(np.float32)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically (format from the extension, default png; tight bounding box); returns
    the path."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    FigureCanvasAgg(fig)  # attach the Agg canvas: no pyplot, no global backend
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))


def _to_display(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``[C, H, W]`` in [-1, 1] -> (``[H, W]`` or ``[H, W, 3]`` in [0, 1], cmap)."""
    img = np.clip((img + 1.0) / 2.0, 0.0, 1.0)
    if img.shape[0] == 3:
        return np.transpose(img, (1, 2, 0)), None
    return img[0], "gray"


def example_arrays(
    caller: str, images: Any, recons: Any, maps: Any, masks: Any | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Numpy arrays of a figure of examples, checked: ``DataError`` naming ``caller`` when they do not fit.

    Args:
        images, recons: ``[B, C, H, W]`` of one shape; maps: ``[B, 1, H, W]`` or ``[B, H, W]`` of the images' ``H, W``;
            masks: optional ``[B, 1, H, W]`` or ``[B, H, W]``.

    Returns:
        ``(images, recons, maps [B, 1, H, W], masks [B, 1, H, W] or None)`` as ``to_numpy`` gives them.
    """
    imgs, recs, mps = to_numpy(images), to_numpy(recons), to_numpy(maps)
    if mps.ndim == 3:
        mps = mps[:, None]
    if imgs.ndim != 4 or recs.shape != imgs.shape or mps.ndim != 4 or mps.shape[0] != imgs.shape[0] \
            or mps.shape[-2:] != imgs.shape[-2:]:
        raise DataError(
            f"{caller} needs images and recons [B, C, H, W] of equal shape and maps [B, 1, H, W]; got "
            f"images {imgs.shape}, recons {recs.shape}, maps {mps.shape}."
        )
    msk = None
    if masks is not None:
        msk = to_numpy(masks)
        msk = msk[:, None] if msk.ndim == 3 else msk
        if msk.shape[0] != imgs.shape[0]:
            raise DataError(f"{caller}: masks has {msk.shape[0]} items for {imgs.shape[0]} images.")
    return imgs, recs, mps, msk


def map_color_max(shown: np.ndarray) -> float:
    """Top of the one colour scale of the shown maps (``0`` to it): their 99.5th percentile, 1.0 when that is not
    positive or no value is finite."""
    vmax = float(np.nanpercentile(shown, 99.5)) if np.isfinite(shown).any() else 1.0
    return vmax if vmax > 0 else 1.0


# ------------------------------------------------------------------------------------------- anomaly grid
def _pick_rows(labels: np.ndarray | None, b: int, n_rows: int) -> np.ndarray:
    n_rows = min(n_rows, b)
    if labels is None:
        return np.arange(n_rows)
    healthy, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)
    n_h = min(len(healthy), n_rows // 2)
    n_a = min(len(anomalous), n_rows - n_h)
    n_h = min(len(healthy), n_rows - n_a)  # fill with healthy if there are too few anomalous
    return np.concatenate([healthy[:n_h], anomalous[:n_a]]).astype(np.int64)


def save_anomaly_grid(
    path: str | os.PathLike,
    images: Any,
    recons: Any,
    maps: Any,
    masks: Any | None = None,
    labels: Any | None = None,
    n_rows: int = 8,
    title: str | None = None,
) -> Path:
    """Grid of examples: columns input | reconstruction | error map | ground-truth mask (if ``masks``).

    Args:
        images, recons: ``[B, C, H, W]`` (C = 1 or 3; other C show channel 0) in ``[-1, 1]``; torch or numpy.
        maps: ``[B, 1, H, W]`` (or ``[B, H, W]``) anomaly maps, >= 0; one colour scale shared by all rows
            (0 to the 99.5th percentile of the shown maps) so rows compare, with a colour bar.
        masks: optional bool ``[B, 1, H, W]`` ground truth; its column is omitted when None.
        labels: optional ``[B]`` 0 healthy / 1 anomalous; rows are then half healthy, half anomalous
            (first ones of each kind, filling from the other kind when one runs short).
        n_rows: maximum number of rows.
    Returns the written path.
    """
    imgs, recs, mps, msk = example_arrays("save_anomaly_grid", images, recons, maps, masks)
    b = imgs.shape[0]
    lab = None
    if labels is not None:
        lab = to_numpy(labels).reshape(-1)
        if lab.shape[0] != b:
            raise DataError(f"save_anomaly_grid: labels has {lab.shape[0]} entries for {b} images.")
    if n_rows < 1 or b == 0:
        raise DataError(f"save_anomaly_grid: nothing to draw (batch of {b}, n_rows={n_rows}); pass n_rows >= 1.")
    rows = _pick_rows(lab, b, n_rows)
    vmax = map_color_max(mps[rows, 0])

    cols = ["input", "reconstruction", "error map"] + (["ground truth"] if msk is not None else [])
    fig = Figure(figsize=(1.9 * len(cols) + 0.8, 1.9 * len(rows) + (0.5 if title else 0.2)), layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    heat = None
    for r, i in enumerate(rows):
        panels: list[tuple[np.ndarray, dict[str, Any]]] = []
        for arr in (imgs[i], recs[i]):
            disp, cmap = _to_display(arr)
            panels.append((disp, {"cmap": cmap, "vmin": 0.0, "vmax": 1.0}))
        panels.append((mps[i, 0], {"cmap": "inferno", "vmin": 0.0, "vmax": vmax}))
        if msk is not None:
            panels.append((msk[i, 0].astype(np.float32), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}))
        for c, (arr, kw) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(arr, interpolation="nearest", **kw)
            if c == 2:
                heat = im
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        if lab is not None:
            axes[r, 0].set_ylabel("anomalous" if lab[i] != 0 else "healthy", fontsize=8)
    if heat is not None:
        fig.colorbar(heat, ax=axes[:, -1].tolist(), shrink=min(1.0, 3.0 / len(rows)), label="error")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ ROC / PR
def _check_scores(name: str, scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = to_numpy(scores).astype(np.float64).reshape(-1)
    y = to_numpy(labels).reshape(-1)
    if s.shape != y.shape:
        raise DataError(f"curve {name!r}: {s.size} scores but {y.size} labels; pass one label per score.")
    if not np.isfinite(s).all():
        raise DataError(f"curve {name!r}: scores contain NaN or inf; drop or fix those items first.")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise DataError(
            f"curve {name!r}: labels are all {int(y[0]) if y.size else 'missing'}; ROC/PR need both healthy (0) "
            "and anomalous (1) items."
        )
    return s, y


def _sorted_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP and FP at each distinct threshold (descending), and the thresholds."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each run of tied scores
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    return tps, fps, s[last]


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of ``scores`` ([N], higher = more anomalous) vs ``labels`` ([N] 0/1): ``(fpr, tpr, auroc)``.

    Ties are handled as one threshold (AUROC equals the Mann-Whitney statistic, ties counting 1/2).
    """
    s, y = _check_scores("roc", scores, labels)
    tps, fps, _ = _sorted_counts(s, y)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr, float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def pr_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """Precision-recall of ``scores`` vs ``labels``: ``(recall, precision, average_precision)``.

    AP is the step-wise sum ``sum_k (R_k - R_{k-1}) P_k`` (no interpolation), as scikit-learn computes it.
    """
    s, y = _check_scores("pr", scores, labels)
    tps, fps, _ = _sorted_counts(s, y)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return np.r_[0.0, recall], np.r_[1.0, precision], ap


def save_roc_pr(
    path: str | os.PathLike,
    curves: Mapping[str, tuple[Any, Any]],
    title: str | None = None,
) -> dict[str, dict[str, float]]:
    """ROC (left) and precision-recall (right) curves of several methods on one figure.

    Args:
        curves: ``{method name: (scores [N], labels [N] 0/1)}``, higher score = more anomalous; methods may be
            evaluated on different items. The legend shows AUROC (ROC panel) and AP (PR panel).
    Returns ``{method: {"auroc": ..., "ap": ..., "prevalence": ...}}`` (the numbers in the legend).
    """
    if not curves:
        raise DataError("save_roc_pr: no curves given; pass {'method': (scores, labels), ...}.")
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax_roc, ax_pr = fig.subplots(1, 2)
    summary: dict[str, dict[str, float]] = {}
    for name, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DataError(f"save_roc_pr: curves[{name!r}] must be a (scores, labels) pair.")
        s, y = _check_scores(name, *pair)
        fpr, tpr, auroc = roc_curve(s, y)
        rec, prec, ap = pr_curve(s, y)
        prevalence = float(y.mean())
        summary[name] = {"auroc": auroc, "ap": ap, "prevalence": prevalence}
        line = ax_roc.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.3f})")[0]
        ax_pr.step(rec, prec, where="pre", color=line.get_color(), label=f"{name} (AP {ap:.3f})")
        ax_pr.axhline(prevalence, color=line.get_color(), lw=0.8, ls=":")
    ax_roc.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="chance")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title="ROC")
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01),
              title="Precision-recall (dotted: prevalence)")
    for ax in (ax_roc, ax_pr):
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    return summary


# ----------------------------------------------------------------------------------------- metric curves
def save_metric_curves(
    path: str | os.PathLike,
    x: Sequence[float] | Any,
    series: Mapping[str, Sequence[float] | Any],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logy: bool = False,
) -> Path:
    """Line plot of several named series over a shared ``x`` (e.g. AUROC vs noise level t, loss vs epoch).

    ``x``: ``[N]``; ``series``: ``{name: [N]}`` (NaN leaves a gap). Returns the written path.
    """
    xs = to_numpy(x).astype(np.float64).reshape(-1)
    if not series:
        raise DataError("save_metric_curves: no series given; pass {'name': values, ...}.")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, values in series.items():
        v = to_numpy(values).astype(np.float64).reshape(-1)
        if v.shape != xs.shape:
            raise DataError(f"save_metric_curves: series {name!r} has {v.size} values for {xs.size} x values.")
        ax.plot(xs, v, marker="o" if xs.size <= 30 else None, ms=3, label=str(name))
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
