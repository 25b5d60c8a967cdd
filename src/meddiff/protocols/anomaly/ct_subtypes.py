"""CT add-on of the anomaly protocol (RSNA brain-CT hemorrhage), switched on by test batches carrying ``subtypes``.

:class:`CTSubtypes` is the add-on (``meddiff.protocols.anomaly.addons``): it adds ``report["image"]["per_subtype"]``
and ``summary["subtype_auroc_<name>"]`` and writes the CT outputs; the figures are drawn by :mod:`meddiff.viz.ct`.

- :func:`per_subtype_detection`: for each hemorrhage subtype ``k``, the *healthy* test slices (``label == 0`` and
  no subtype) against the slices that carry subtype ``k`` (whatever other subtypes they also carry), image AUROC
  and AUPRC with 95% CIs for the model and every baseline, on exactly the same slices. The CIs resample patients
  (cluster bootstrap, ``meddiff.metrics.detection.detection_ci``) when subject ids are given: slices of one patient
  are not independent, so a slice bootstrap would give intervals that are too narrow. Slices with other subtypes
  only are left out of that comparison. A subtype without positives (or without healthy
  slices) in the test split is listed with the reason instead of a number.
- :func:`write_ct_outputs`: ``ct_segmentation.png`` (rows of test slices, hemorrhages of different subtypes first:
  CT | healthy reconstruction | error map over the CT | segmentation at the *validation-chosen* pixel threshold,
  with the ground-truth outline where lesion masks exist), ``subtype_auroc.png`` (per-subtype AUROC with 95% CI,
  model beside every baseline), ``per_subtype.csv``, ``test_scores.csv`` (one row per test slice: id, subject,
  label, subtypes, model score, mean-intensity ``baseline_score`` and the other baselines' scores) and a printed
  table.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.errors import DataError
from meddiff.metrics.detection import detection_ci
from meddiff.protocols.common import LABELS, MEAN_INTENSITY, MODEL
from meddiff.utils.io import atomic_write_text
from meddiff.viz.ct import save_ct_segmentation, save_subtype_auroc, subtype_methods
from meddiff.viz.figures import to_numpy

__all__ = ["CTSubtypes", "METHOD_LABELS", "per_subtype_detection", "print_subtype_table", "subtype_summary",
           "write_ct_outputs"]

log = logging.getLogger(__name__)

#: report key -> label in the CT table, bars and CSVs
METHOD_LABELS = {k: (LABELS[k] if k == MODEL else f"baseline ({LABELS[k]})") for k in LABELS}


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

    methods = subtype_methods(per_subtype, list(METHOD_LABELS))
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
        written.append(save_subtype_auroc(out_dir / "subtype_auroc.png", per, labels=METHOD_LABELS))
        written.append(atomic_write_text(out_dir / "per_subtype.csv", _per_subtype_csv(per)))
        print_subtype_table(per)
    items = figures.get("items")
    if items is not None and len(items.get("label", [])):
        k = 0 if items.get("subtypes") is None else to_numpy(items["subtypes"]).shape[1]
        cols = names if len(names) == k else [f"subtype{j}" for j in range(k)]
        written.append(atomic_write_text(out_dir / "test_scores.csv", _scores_csv(items, cols)))
    return written


class CTSubtypes:
    """The ``subtypes`` add-on: per-subtype detection in the report, CT tables and figures on disk."""

    def extend(self, report: dict[str, Any], scores: Mapping[str, np.ndarray], labels: np.ndarray,
               subjects: Sequence[str] | None, values: np.ndarray, ids: Sequence[str],
               names: Sequence[str] | None, opts: Any) -> dict[str, Any]:
        per = per_subtype_detection(scores, labels, values, names, n_boot=opts.n_boot, seed=opts.seed,
                                    subjects=subjects)
        report["image"]["per_subtype"] = per
        report["summary"].update(subtype_summary(per))
        return {"items": {"id": list(ids), "subject": list(subjects or []), "label": labels, "subtypes": values,
                          "model": scores[MODEL], "baseline": scores[MEAN_INTENSITY],
                          "baselines": {k: v for k, v in scores.items() if k not in (MODEL, MEAN_INTENSITY)}}}

    def write(self, report: Mapping[str, Any], figures: Mapping[str, Any], out_dir: Path) -> None:
        write_ct_outputs(report, figures, out_dir)
