"""CT extras of the anomaly protocol (RSNA brain-CT hemorrhage): per-subtype detection and figures over the CT.

Called by the shared anomaly protocol when test batches carry ``subtypes`` (it computes the per-subtype numbers with
:func:`per_subtype_detection`; the report writer calls :func:`write_ct_outputs` for tables and figures). Figures go
through the public :mod:`meddiff.viz` helpers (:func:`~meddiff.viz.figures.save_figure` writes atomically).

- :func:`per_subtype_detection`: for each hemorrhage subtype ``k``, the *healthy* test slices (``label == 0`` and
  no subtype) against the slices that carry subtype ``k`` (whatever other subtypes they also carry), image AUROC
  and AUPRC with 95% CIs for the model and every baseline, on exactly the same slices. The CIs resample patients
  (cluster bootstrap, ``meddiff.metrics.detection.detection_ci``) when subject ids are given: slices of one patient
  are not independent, so a slice bootstrap would give intervals that are too narrow. Slices with other subtypes
  only are left out of that comparison. A subtype without positives (or without healthy
  slices) in the test split is listed with the reason instead of a number.
- :func:`save_ct_segmentation`: rows of test slices (hemorrhages of different subtypes first, then healthy ones),
  columns CT (first window channel) | healthy reconstruction | error map over the CT | segmentation at the
  *validation-chosen* pixel threshold over the CT (red), with the ground-truth outline (green) where lesion masks
  exist (synthetic data). Without a validation threshold (no lesion masks in validation, i.e. real RSNA data) the
  segmentation column is left out and the figure says so.
- :func:`save_subtype_auroc`: per-subtype AUROC with 95% CI, model beside every baseline (bar chart).
- :func:`write_ct_outputs`: the above plus ``per_subtype.csv``, ``test_scores.csv`` (one row per test slice:
  id, subject, label, subtypes, model score, mean-intensity ``baseline_score`` and the other baselines' scores) and
  a printed table.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from meddiff.errors import DataError
from meddiff.metrics.detection import detection_ci
from meddiff.utils.io import atomic_write_text
from meddiff.viz.figures import example_arrays, map_color_max, save_figure, to_numpy

__all__ = [
    "per_subtype_detection",
    "subtype_summary",
    "pick_example_rows",
    "overlay_error",
    "overlay_segmentation",
    "save_ct_segmentation",
    "save_subtype_auroc",
    "write_ct_outputs",
]

log = logging.getLogger(__name__)

METHOD_LABELS = {
    "model": "model",
    "baseline_mean_intensity": "baseline (mean intensity)",
    "baseline_nearest_healthy_image": "baseline (nearest healthy image)",
    "baseline_mean_healthy_image": "baseline (mean healthy image)",
}


# ------------------------------------------------------------------------------------------ per-subtype AUROC
def per_subtype_detection(
    scores: Mapping[str, Any],
    labels: Any,
    subtypes: Any,
    names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    subjects: Sequence[Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Image-level detection of each subtype against healthy slices.

    Args:
        scores: ``{method: [N] finite scores}`` (higher = more anomalous), e.g. ``{"model": ..., "baseline_mean_intensity": ...}``.
        labels: ``[N]`` 0 healthy / 1 hemorrhage (RSNA ``any``).
        subtypes: ``[N, K]`` 0/1 (float or int) per subtype, e.g. RSNA's five in
            :data:`meddiff.data.formats.rsna_labels.SUBTYPES` order.
        names: ``K`` subtype names (default ``subtype0..``).
        n_boot, seed: bootstrap replicates and seed of the CIs (:func:`meddiff.metrics.detection.detection_ci`).
        subjects: ``N`` patient ids: the CIs resample patients (each with all its kept slices); None = slices.

    Returns:
        ``{name: {"n_pos": int, "n_healthy": int, <method>: detection_ci dict, ...}}``; a subtype without positives
        or without healthy slices gets ``{"n_pos", "n_healthy", "skipped": reason}`` instead of method entries.
        Healthy = ``label == 0`` and no subtype set (inconsistent rows, label 0 with a subtype, are counted in
        ``n_inconsistent`` of every entry and left out of the negatives). With ``subjects`` each entry also has
        ``n_subjects`` (patients among the compared slices) and each method's dict ``"resampled": "subjects"``.
    """
    y = np.asarray(to_numpy(labels)).reshape(-1)
    sub = np.asarray(to_numpy(subtypes))
    if sub.ndim != 2 or sub.shape[0] != y.shape[0]:
        raise DataError(f"subtypes must be [N, K] with N = {y.shape[0]} labels; got shape {tuple(sub.shape)}.")
    k = sub.shape[1]
    subj = None
    if subjects is not None:
        subj = np.asarray([str(v) for v in subjects])
        if subj.shape != y.shape:
            raise DataError(f"subjects has {subj.size} ids for {y.size} labels; give one patient id per slice.")
    if names is None:
        names = [f"subtype{i}" for i in range(k)]
    names = [str(n) for n in names]
    if len(names) != k:
        raise DataError(f"{len(names)} subtype names {names} for {k} subtype columns; give one name per column.")
    arrays: dict[str, np.ndarray] = {}
    for method, s in scores.items():
        a = np.asarray(to_numpy(s), dtype=np.float64).reshape(-1)
        if a.shape != y.shape:
            raise DataError(f"scores[{method!r}] has {a.size} entries for {y.size} labels.")
        arrays[method] = a
    pos_any = sub > 0.5
    healthy = (y == 0) & ~pos_any.any(axis=1)
    n_inconsistent = int(((y == 0) & pos_any.any(axis=1)).sum())
    if n_inconsistent:
        log.warning("%d slice(s) have label 0 but a subtype set; left out of the healthy reference.", n_inconsistent)
    out: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(names):
        pos = pos_any[:, j]
        entry: dict[str, Any] = {"n_pos": int(pos.sum()), "n_healthy": int(healthy.sum())}
        if n_inconsistent:
            entry["n_inconsistent"] = n_inconsistent
        if not pos.any() or not healthy.any():
            entry["skipped"] = (f"no {name} slices in the test split" if not pos.any()
                                else "no healthy slices in the test split")
            out[name] = entry
            continue
        keep = pos | healthy
        yy = pos[keep].astype(np.int64)
        groups = None if subj is None else subj[keep]
        if groups is not None:
            entry["n_subjects"] = int(np.unique(groups).size)
        for method, a in arrays.items():
            entry[method] = detection_ci(a[keep], yy, subjects=groups, n_boot=n_boot, seed=seed)
        out[name] = entry
    return out


def subtype_summary(per_subtype: Mapping[str, Mapping[str, Any]], method: str = "model") -> dict[str, float]:
    """Headline floats ``{"subtype_auroc_<name>": auroc}`` of the evaluated subtypes (skipped ones left out)."""
    return {f"subtype_auroc_{name}": float(e[method]["auroc"]) for name, e in per_subtype.items() if method in e}


# ---------------------------------------------------------------------------------------------------- figures
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


def _methods(per_subtype: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The methods evaluated in ``per_subtype``: the known ones in :data:`METHOD_LABELS` order, then the others."""
    methods = [m for m in METHOD_LABELS if any(m in e for e in per_subtype.values())]
    methods += sorted({m for e in per_subtype.values() for m, v in e.items()
                       if isinstance(v, Mapping) and "auroc" in v and m not in methods})
    return methods


def save_subtype_auroc(
    path: str | os.PathLike, per_subtype: Mapping[str, Mapping[str, Any]], title: str | None = None
) -> Path:
    """Bar chart of per-subtype AUROC with 95% CI error bars, one bar per method (model, baselines).

    ``per_subtype``: :func:`per_subtype_detection`'s result; skipped subtypes are drawn as "n/a". Returns the path.
    """
    names = list(per_subtype)
    if not names:
        raise DataError("save_subtype_auroc: no subtypes given.")
    methods = _methods(per_subtype)
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
               label=METHOD_LABELS.get(m, m))
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


# ----------------------------------------------------------------------------------------------- all outputs
def _per_subtype_csv(per_subtype: Mapping[str, Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["subtype", "method", "n_pos", "n_healthy", "auroc", "auroc_lo", "auroc_hi", "auprc", "auprc_lo",
                "auprc_hi", "note"])
    for name, e in per_subtype.items():
        if "skipped" in e:
            w.writerow([name, "", e["n_pos"], e["n_healthy"], "", "", "", "", "", "", e["skipped"]])
            continue
        for m, v in e.items():
            if isinstance(v, Mapping) and "auroc" in v:
                w.writerow([name, m, e["n_pos"], e["n_healthy"], f"{v['auroc']:.6f}", *(f"{c:.6f}" for c in v["auroc_ci"]),
                            f"{v['auprc']:.6f}", *(f"{c:.6f}" for c in v["auprc_ci"]), ""])
    return buf.getvalue()


def _scores_csv(items: Mapping[str, Any], names: Sequence[str]) -> str:
    n = len(items["label"])
    sub = to_numpy(items["subtypes"]) if items.get("subtypes") is not None else np.zeros((n, 0))
    ids = items.get("id") if len(items.get("id") or []) == n else [""] * n
    subjects = items.get("subject") if len(items.get("subject") or []) == n else [""] * n
    buf = io.StringIO()
    w = csv.writer(buf)
    others = dict(items.get("baselines") or {})
    w.writerow(["id", "subject", "label", *names, "model_score", "baseline_score", *(f"{k}_score" for k in others)])
    for i in range(n):
        w.writerow([ids[i], subjects[i], int(items["label"][i]), *(int(v > 0.5) for v in sub[i]),
                    f"{float(items['model'][i]):.6g}", f"{float(items['baseline'][i]):.6g}",
                    *(f"{float(v[i]):.6g}" for v in others.values())])
    return buf.getvalue()


def print_subtype_table(per_subtype: Mapping[str, Mapping[str, Any]]) -> None:
    """A rich table: per-subtype AUROC [95% CI], model beside every baseline."""
    from rich.console import Console
    from rich.table import Table

    methods = _methods(per_subtype)
    resampled = next((v.get("resampled", "items") for e in per_subtype.values() for m, v in e.items()
                      if m in methods and isinstance(v, Mapping)), "items")
    table = Table(title="Per-subtype image AUROC (healthy slices vs slices with the subtype), test split; "
                        f"95% CIs resample {resampled}")
    for col in ("subtype", "n+", "n healthy", *(METHOD_LABELS.get(m, m) for m in methods)):
        table.add_column(col, justify="left" if col == "subtype" else "right")
    for name, e in per_subtype.items():
        cells = []
        for m in methods:
            v = e.get(m)
            cells.append("-" if v is None else f"{v['auroc']:.3f} [{v['auroc_ci'][0]:.3f}, {v['auroc_ci'][1]:.3f}]")
        table.add_row(name, str(e["n_pos"]), str(e["n_healthy"]), *cells)
    Console().print(table)


def write_ct_outputs(report: Mapping[str, Any], figures: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write the CT extras of an anomaly report into ``out_dir``; returns the written paths.

    ``report``: the protocol's report (``report["image"]["per_subtype"]``, ``report["selection"]["pixel_threshold"]``
    are used when present); ``figures``: its ``_figures`` (``examples`` with ``image``, ``recon``, ``map`` and
    optional ``mask``, ``label``, ``subtypes``, ``id``; optional ``items`` for ``test_scores.csv``). Writes
    ``ct_segmentation.png``, ``subtype_auroc.png``, ``per_subtype.csv``, ``test_scores.csv`` (each when its inputs
    exist) and prints the per-subtype table.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    per = report.get("image", {}).get("per_subtype") or {}
    names = list(per)
    ex = figures.get("examples") or {}
    if "image" in ex and len(ex["image"]):
        threshold = report.get("selection", {}).get("pixel_threshold")
        written.append(save_ct_segmentation(
            out_dir / "ct_segmentation.png", ex["image"], ex["recon"], ex["map"], threshold=threshold,
            masks=ex.get("mask"), labels=ex.get("label"), subtypes=ex.get("subtypes"), names=names or None,
            ids=ex.get("id"), n_rows=6,
        ))
    if per:
        written.append(save_subtype_auroc(out_dir / "subtype_auroc.png", per))
        written.append(atomic_write_text(out_dir / "per_subtype.csv", _per_subtype_csv(per)))
        print_subtype_table(per)
    items = figures.get("items")
    if items is not None and len(items.get("label", [])):
        k = 0 if items.get("subtypes") is None else to_numpy(items["subtypes"]).shape[1]
        cols = names if len(names) == k else [f"subtype{j}" for j in range(k)]
        written.append(atomic_write_text(out_dir / "test_scores.csv", _scores_csv(items, cols)))
    return written
