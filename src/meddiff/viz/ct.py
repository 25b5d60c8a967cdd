"""CT figures (RSNA brain CT): example rows with the error map and the validation-threshold segmentation over the
CT, and per-subtype AUROC bars. Headless (matplotlib's Agg canvas); files written atomically by ``save_figure``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from meddiff.errors import DataError
from meddiff.viz.figures import example_arrays, map_color_max, save_figure, to_numpy

__all__ = ["overlay_error", "overlay_segmentation", "pick_example_rows", "save_ct_segmentation", "save_subtype_auroc"]


def pick_example_rows(labels: Any | None, subtypes: Any | None, n: int, n_rows: int) -> np.ndarray:
    """Indices of the rows to show: hemorrhages first (round-robin over subtypes, so different kinds appear),
    about two thirds of ``n_rows``, then healthy slices; fills from the other kind when one runs short.

    Args:
        labels: ``[n]`` 0/1 or None; subtypes: ``[n, K]`` 0/1 or None; n: number of examples; n_rows: rows wanted.
    """
    n_rows = max(0, min(int(n_rows), n))
    if labels is None:
        return np.arange(n_rows)
    y = np.asarray(to_numpy(labels)).reshape(-1)
    anomalous = [int(i) for i in np.flatnonzero(y != 0)]
    healthy = [int(i) for i in np.flatnonzero(y == 0)]
    if subtypes is not None and anomalous:
        sub = np.asarray(to_numpy(subtypes)) > 0.5
        queues = [[i for i in anomalous if sub[i, j]] for j in range(sub.shape[1])]
        queues.append([i for i in anomalous if not sub[i].any()])
        ordered: list[int] = []
        seen: set[int] = set()
        while any(queues):
            for q in queues:
                while q and q[0] in seen:
                    q.pop(0)
                if q:
                    seen.add(q[0])
                    ordered.append(q.pop(0))
        anomalous = ordered
    n_a = min(len(anomalous), math.ceil(2 * n_rows / 3))
    n_h = min(len(healthy), n_rows - n_a)
    n_a = min(len(anomalous), n_rows - n_h)
    return np.asarray(anomalous[:n_a] + healthy[:n_h], dtype=np.int64)


def _gray(img: np.ndarray, channel: int) -> np.ndarray:
    """``[C, H, W]`` in ``[-1, 1]`` -> ``[H, W]`` in ``[0, 1]`` (one window channel)."""
    c = min(int(channel), img.shape[0] - 1)
    return np.clip((img[c] + 1.0) / 2.0, 0.0, 1.0)


def overlay_error(ct: np.ndarray, err: np.ndarray, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """Error map blended over a gray CT: ``[H, W, 3]`` in ``[0, 1]``.

    ``ct``: ``[H, W]`` in ``[0, 1]``; ``err``: ``[H, W]`` >= 0. Opacity grows linearly with ``err / vmax`` (0 at no
    error, 0.85 at ``vmax`` and above), so small errors leave the anatomy visible.
    """
    from matplotlib import colormaps

    a = np.clip(np.nan_to_num(err / max(float(vmax), 1e-12)), 0.0, 1.0)
    rgb = colormaps[cmap](a)[..., :3]
    alpha = (0.85 * a)[..., None]
    return (1.0 - alpha) * np.repeat(ct[..., None], 3, axis=2) + alpha * rgb


def overlay_segmentation(ct: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """Predicted segmentation (red, half transparent) and ground-truth outline (green) over a gray CT.

    ``ct``: ``[H, W]`` in ``[0, 1]``; ``pred``, ``truth``: bool ``[H, W]``. Returns ``[H, W, 3]`` in ``[0, 1]``;
    the outline is the mask minus its erosion (so it is drawn over the prediction).
    """
    out = np.repeat(ct[..., None], 3, axis=2).astype(np.float64)
    red = np.array([1.0, 0.1, 0.1])
    p = np.asarray(pred, dtype=bool)
    out[p] = 0.45 * out[p] + 0.55 * red
    if truth is not None:
        t = np.asarray(truth, dtype=bool)
        edge = t & ~ndimage.binary_erosion(t)
        out[edge] = np.array([0.1, 1.0, 0.2])
    return np.clip(out, 0.0, 1.0)


def _row_title(i: int, labels: np.ndarray | None, subtypes: np.ndarray | None, names: Sequence[str] | None,
               ids: Sequence[str] | None) -> str:
    if labels is None:
        kind = ""
    elif labels[i] == 0:
        kind = "healthy"
    elif subtypes is not None:
        found = [names[j] if names and j < len(names) else f"subtype{j}" for j in np.flatnonzero(subtypes[i] > 0.5)]
        kind = "+".join(found) or "hemorrhage"
    else:
        kind = "hemorrhage"
    sid = f"{ids[i]}\n" if ids is not None and i < len(ids) else ""
    return f"{sid}{kind}"


def save_ct_segmentation(
    path: str | os.PathLike,
    images: Any,
    recons: Any,
    maps: Any,
    threshold: float | None = None,
    masks: Any | None = None,
    labels: Any | None = None,
    subtypes: Any | None = None,
    names: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    n_rows: int = 6,
    window_channel: int = 0,
    title: str | None = None,
) -> Path:
    """Figure of test slices: CT | reconstruction | error map over the CT | segmentation at ``threshold``.

    Args:
        images, recons: ``[B, C, H, W]`` in ``[-1, 1]`` (channel ``window_channel`` is shown, e.g. the brain window).
        maps: ``[B, 1, H, W]`` (or ``[B, H, W]``) anomaly maps >= 0 (post-processed, zero outside the brain); one
            colour scale for all rows (0 to the 99.5th percentile of the shown maps).
        threshold: pixel threshold chosen on *validation* (``report["selection"]["pixel_threshold"]``); pixels with
            ``map >= threshold`` are segmented. None: the segmentation column is left out.
        masks: optional bool ``[B, 1, H, W]`` ground truth, outlined in green.
        labels: ``[B]`` 0/1; subtypes: ``[B, K]``; names: ``K`` subtype names; ids: ``B`` slice ids (row titles).
        n_rows: maximum rows (hemorrhages first, see :func:`pick_example_rows`).
    Returns the written path (atomic write, format from the extension).
    """
    imgs, recs, mps, msk = example_arrays("save_ct_segmentation", images, recons, maps, masks)
    msk = None if msk is None else msk.astype(bool)
    b = imgs.shape[0]
    lab = None if labels is None else to_numpy(labels).reshape(-1)
    sub = None if subtypes is None else to_numpy(subtypes)
    for name, arr in (("labels", lab), ("subtypes", sub)):
        if arr is not None and arr.shape[0] != b:
            raise DataError(f"save_ct_segmentation: {name} has {arr.shape[0]} entries for {b} images.")
    rows = pick_example_rows(lab, sub, b, n_rows)
    if rows.size == 0:
        raise DataError(f"save_ct_segmentation: nothing to draw (batch of {b}, n_rows={n_rows}); pass n_rows >= 1.")
    vmax = map_color_max(mps[rows, 0])

    cols = ["CT", "reconstruction", "error map"]
    if threshold is not None:
        cols.append(f"segmentation (map ≥ {threshold:.3g}, val)" + (" / truth" if msk is not None else ""))
    fig = Figure(figsize=(2.2 * len(cols) + 1.0, 2.2 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for r, i in enumerate(rows):
        ct = _gray(imgs[i], window_channel)
        panels = [np.repeat(ct[..., None], 3, axis=2),
                  np.repeat(_gray(recs[i], window_channel)[..., None], 3, axis=2),
                  overlay_error(ct, mps[i, 0], vmax)]
        if threshold is not None:
            panels.append(overlay_segmentation(ct, mps[i, 0] >= threshold, None if msk is None else msk[i, 0]))
        for c, arr in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(arr, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        axes[r, 0].set_ylabel(_row_title(int(i), lab, sub, names, ids), fontsize=7)
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig.colorbar(ScalarMappable(Normalize(0.0, vmax), colormaps["inferno"]), ax=axes[:, 2].tolist(),
                 shrink=min(1.0, 3.0 / len(rows)), label="error")
    note = title or "Test slices: error map and segmentation at the validation-chosen threshold"
    if threshold is None:
        note += "\n(no validation pixel threshold: validation has no lesion masks; segmentation not shown)"
    fig.suptitle(note, fontsize=9)
    return save_figure(fig, path)


def subtype_methods(per_subtype: Mapping[str, Mapping[str, Any]], order: Sequence[str] = ()) -> list[str]:
    """The methods evaluated in ``per_subtype``: those of ``order`` first (in that order), then the others sorted."""
    methods = [m for m in order if any(m in e for e in per_subtype.values())]
    methods += sorted({m for e in per_subtype.values() for m, v in e.items()
                       if isinstance(v, Mapping) and "auroc" in v and m not in methods})
    return methods


def save_subtype_auroc(
    path: str | os.PathLike, per_subtype: Mapping[str, Mapping[str, Any]], title: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Bar chart of per-subtype AUROC with 95% CI error bars, one bar per method (model, baselines).

    ``per_subtype``: ``{subtype: {"n_pos", "n_healthy", <method>: {"auroc", "auroc_ci"}, ...}}`` (skipped subtypes,
    with ``"skipped"``, are drawn as "n/a"); ``labels``: method -> legend text (its order orders the bars).
    Returns the path.
    """
    labels = dict(labels or {})
    names = list(per_subtype)
    if not names:
        raise DataError("save_subtype_auroc: no subtypes given.")
    methods = subtype_methods(per_subtype, list(labels))
    fig = Figure(figsize=(1.4 * len(names) + 2.5, 4.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(names))
    for k, m in enumerate(methods):
        vals, lo, hi = [], [], []
        for n in names:
            e = per_subtype[n].get(m)
            if e is None:
                vals.append(np.nan)
                lo.append(0.0)
                hi.append(0.0)
                continue
            a = float(e["auroc"])
            ci = [float(v) for v in e.get("auroc_ci", (np.nan, np.nan))]
            vals.append(a)
            lo.append(max(0.0, a - ci[0]) if np.isfinite(ci[0]) else 0.0)
            hi.append(max(0.0, ci[1] - a) if np.isfinite(ci[1]) else 0.0)
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=3,
               label=labels.get(m, m))
    for j, n in enumerate(names):
        if "skipped" in per_subtype[n]:
            ax.text(j, 0.52, "n/a", ha="center", fontsize=8, color="0.4")
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ticks = [f"{n}\n{per_subtype[n].get('n_pos', 0)} vs {per_subtype[n].get('n_healthy', 0)}" for n in names]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_xlabel("subtype (slices with it vs healthy slices)", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="AUROC (healthy vs subtype) [95% CI]",
           title=title or "Per-subtype image AUROC on the test split")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
