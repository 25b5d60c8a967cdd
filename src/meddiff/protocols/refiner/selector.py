"""Is AUCp a checkpoint selector you can trust? A measurement over every saved checkpoint of a run (never a choice:
the evaluated checkpoint and every headline number stay what the run selected).

For each saved checkpoint (its primary estimate): its label-free **AUCp** (known-healthy hold-out = 0 vs the
unannotated pool = 1, what ``val/aucp`` selects by), its **labelled-validation AUROC** and its **test AUROC** (from
the protocol's one test pass). Then:

- **Spearman** correlation of AUCp vs labelled-validation AUROC across the checkpoints, with a 95% bootstrap CI that
  resamples the validation *subjects* of the three pools (known-healthy hold-out, unannotated pool, labelled
  validation) and recomputes every checkpoint's two numbers: how sure the ranking agreement is, given the data;
- **regret** of a selection rule: test AUROC of the best checkpoint (an oracle) minus that of the checkpoint the rule
  picks (AUCp: the highest AUCp; AUCp smoothed: the highest mean AUCp of a checkpoint and its neighbours in step
  order, label-free and less swayed by one noisy validation; labelled validation: the highest validation AUROC;
  last: the latest step). Ties go to the earliest checkpoint, as Lightning's ``ModelCheckpoint`` keeps the first
  best. The rho-corrected AUCp, ``(AUCp - rho/2) / (1 - rho)``, is a monotone map of AUCp: it picks the same one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meddiff.metrics.aucp import aucp

NAN = float("nan")


@dataclass
class PoolScores:
    """One pool's scores of every checkpoint: ``scores[key]`` ``[n]``, ``labels`` ``[n]`` (None: unlabelled) and the
    subject of every image (resampled by the bootstrap)."""

    scores: dict[str, np.ndarray]
    subjects: Sequence[str]
    labels: np.ndarray | None = None


def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count 1/2); nan when a class is missing."""
    if not 0 < int(y.sum()) < y.size:
        return NAN
    return aucp(s[y == 0], s[y == 1])  # P(positive > negative): the same statistic as AUCp


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan with < 2 finite pairs or a constant side."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2:
        return NAN
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return NAN
    return float(np.corrcoef(rx, ry)[0, 1])


def _subject_draw(subjects: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Indices of one cluster-bootstrap replicate: subjects drawn with replacement, all their images."""
    names, inverse = np.unique(np.asarray([str(s) for s in subjects]), return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(names.size)]
    picked = rng.integers(0, names.size, names.size)
    return np.concatenate([members[k] for k in picked])


def spearman_ci(keys: Sequence[str], healthy: PoolScores, mixed: PoolScores, val: PoolScores, n_boot: int,
                seed: int, ci: float = 0.95) -> tuple[tuple[float, float], int]:
    """Percentile CI of the AUCp-vs-validation-AUROC Spearman over ``n_boot`` replicates that resample the subjects
    of each pool independently; returns ``((lo, hi), replicates used)`` (replicates with an undefined correlation,
    e.g. a constant side, are dropped; none: nan)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_boot)):
        ih, im, iv = (_subject_draw(p.subjects, rng) for p in (healthy, mixed, val))
        yv = val.labels[iv]
        a = [aucp(healthy.scores[k][ih], mixed.scores[k][im]) for k in keys]
        b = [_auroc(val.scores[k][iv], yv) for k in keys]
        r = spearman(a, b)
        if np.isfinite(r):
            values.append(r)
    if not values:
        return (NAN, NAN), 0
    lo, hi = np.quantile(values, [(1 - ci) / 2, (1 + ci) / 2])
    return (float(lo), float(hi)), len(values)


def _pick(rows: Sequence[Mapping[str, Any]], field: str) -> str | None:
    """Key of the row with the highest finite ``field`` (the earliest on ties), None when there is none."""
    best, key = -np.inf, None
    for row in rows:
        v = row.get(field)
        if v is not None and np.isfinite(v) and v > best:
            best, key = v, row["key"]
    return key


def smoothed(values: Sequence[float | None]) -> list[float]:
    """Each value averaged with its neighbours (a centred window of 3; 2 at the ends); None / nan are skipped."""
    v = np.asarray([NAN if x is None else x for x in values], dtype=np.float64)
    out = []
    for i in range(v.size):
        w = v[max(0, i - 1): i + 2]
        w = w[np.isfinite(w)]
        out.append(float(w.mean()) if w.size else NAN)
    return out


def measure(rows: list[dict[str, Any]], healthy: PoolScores, mixed: PoolScores, val: PoolScores | None,
            n_boot: int, seed: int) -> dict[str, Any]:
    """The selector measurement of ``rows`` (one per checkpoint, in step order, each with ``key``, ``aucp``,
    ``val_auroc`` (None without a labelled validation pool) and ``test_auroc``): the picks, their regrets and the
    Spearman correlation with its CI."""
    test = {r["key"]: r["test_auroc"] for r in rows}
    best = _pick(rows, "test_auroc")
    smooth = [{"key": r["key"], "s": v} for r, v in zip(rows, smoothed([r["aucp"] for r in rows]))]
    picks = {"aucp": _pick(rows, "aucp"), "aucp_smoothed": _pick(smooth, "s"),
             "labelled_validation": _pick(rows, "val_auroc"), "last": rows[-1]["key"] if rows else None}
    out: dict[str, Any] = {"n_checkpoints": len(rows), "best_on_test": best,
                           "best_test_auroc": test[best] if best else None, "picked": picks, "regret": {}}
    for rule, key in picks.items():
        out["regret"][rule] = None if key is None or best is None else float(test[best] - test[key])
    a = [r["aucp"] for r in rows]
    b = [r["val_auroc"] if r["val_auroc"] is not None else NAN for r in rows]
    rho = spearman(a, b)
    entry: dict[str, Any] = {"rho": None if not np.isfinite(rho) else rho, "ci": (NAN, NAN), "n_boot_used": 0,
                             "resampled": "subjects of known_healthy_val, mixed and labelled_val"}
    if val is not None and np.isfinite(rho) and n_boot > 0:
        keys = [r["key"] for r in rows]
        entry["ci"], entry["n_boot_used"] = spearman_ci(keys, healthy, mixed, val, n_boot, seed)
    if val is None:
        entry["why_not"] = "no labelled validation pool: AUCp cannot be compared with a labelled validation AUROC"
    elif not np.isfinite(rho):
        entry["why_not"] = "fewer than 2 checkpoints, or a constant AUCp / validation AUROC across them"
    out["spearman_aucp_vs_val_auroc"] = entry
    return out


def verdict(m: Mapping[str, Any]) -> str:
    """One sentence for the report: how AUCp selection fared against the labelled-validation rule and the oracle."""
    reg = m["regret"]
    if reg.get("aucp") is None:
        return "AUCp selection: not measured (no checkpoint with a test AUROC)."
    text = (f"AUCp picked {m['picked']['aucp']} (test-AUROC regret {reg['aucp']:+.3f} vs the best checkpoint "
            f"{m['best_on_test']}, an oracle); smoothed AUCp {m['picked']['aucp_smoothed']} (regret "
            f"{reg['aucp_smoothed']:+.3f})")
    if reg.get("labelled_validation") is not None:
        text += (f"; labelled validation picked {m['picked']['labelled_validation']} (regret "
                 f"{reg['labelled_validation']:+.3f})")
    rho = m["spearman_aucp_vs_val_auroc"]
    if rho["rho"] is not None:
        lo, hi = rho["ci"]
        text += f"; Spearman(AUCp, labelled-validation AUROC) = {rho['rho']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    return text + "."
