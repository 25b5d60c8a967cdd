"""The generalisation check: anomaly kinds no choice ever saw, scored with the settings chosen on validation.

After the test pass, the healthy test images it cached (the first ``eval.generalisation_max_items`` label-0 items,
so the test split is still read once) are split round-robin into one share per kind of
:mod:`.unseen_kinds` (dark holes, a texture patch, an intensity ramp); each share gets its kind pasted in. Per kind,
the image AUROC separates all cached healthy images (their scores from the test pass) from the changed ones (scored
now), for the model at its validation-chosen setting and for every baseline at its own validation-chosen setting:
nothing is selected here. The paired bootstrap margin of the model over the best baseline (the best by
*validation* AUROC, as on test: :func:`meddiff.protocols.common.auroc_margin`) resamples source images, so a
healthy image and its changed copy stay together. Pixel AUPRC over the changed images (their exact masks).

A method that only beats the baselines on the anomaly kind it was tuned on shows it here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from meddiff.errors import DataError
from meddiff.metrics.detection import detection_ci
from meddiff.protocols.common import LABELS, MEAN_INTENSITY, MODEL, auroc_margin

from .options import EvalOptions
from .passes import Collected, model_fn, run_pass
from .select import AnomalySelection
from .unseen_kinds import DESCRIPTIONS, KINDS, make_unseen

__all__ = ["GENERALISATION_NOTE", "evaluate_generalisation", "generalisation_summary", "print_generalisation"]

GENERALISATION_NOTE = (
    "Anomaly kinds no choice ever saw, pasted into healthy TEST images cached during the test pass (never "
    "validation or training images); scored with the settings chosen on validation (model and each baseline), "
    "nothing re-selected. Per kind: image AUROC of all cached healthy images vs the changed ones; paired bootstrap "
    "margin over the best baseline by validation AUROC, resampling source images; pixel AUPRC over the changed images."
)
_BATCH = 32


def _stack(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-item dicts (one key set) -> one batch (tensors stacked, other values as lists)."""
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if torch.is_tensor(vals[0]) else vals
    return out


def _batches(healthy: list[dict[str, Any]], share: list[int], kind: str, seed: int) -> list[dict[str, Any]]:
    """The changed copies of ``healthy[share]`` as batches (``label`` 1, ``mask`` the changed pixels)."""
    out = []
    for s in range(0, len(share), _BATCH):
        idx = share[s:s + _BATCH]
        batch = _stack([healthy[i] for i in idx])
        region = batch.get("brain_mask")
        changed, mask = make_unseen(batch["image"], kind, seed, idx, region)
        batch["image"] = changed.to(batch["image"].dtype)
        batch["mask"] = mask
        batch["label"] = torch.ones(len(idx), dtype=torch.long)
        out.append(batch)
    return out


def _sources(healthy: list[dict[str, Any]]) -> list[str]:
    """One resampling unit per cached image: its subject where items carry one, else the image itself."""
    return [str(it["subject"]) if "subject" in it else f"item{i}" for i, it in enumerate(healthy)]


def _pixel_auprc(col: Collected, name: str) -> float | None:
    acc = col.pixel_intensity if name == MEAN_INTENSITY else col.pixel.get(name, {}).get(0)
    try:
        return None if acc is None else float(acc.compute()["auprc"])
    except DataError:  # no changed pixel inside the region (blank images): no pixel metric
        return None


def evaluate_generalisation(
    model: Any,
    test: Collected,
    test_scores: Mapping[str, np.ndarray],
    selection: AnomalySelection,
    val_auroc: Mapping[str, float | None],
    opts: EvalOptions,
    device: torch.device,
) -> dict[str, Any]:
    """``report["generalisation"]`` from the test pass ``test`` (its cached healthy items) and its scores
    (``{method: [N]}`` over all test items, model and every baseline incl. mean intensity).

    Scores with ``selection`` as it is: the model's ``selection.scoring`` / ``selection.sampling``, each baseline's
    ``scoring``; the best baseline of the margin by ``val_auroc`` (validation AUROCs).
    """
    healthy = test.healthy
    if not healthy:
        return {"skipped": "no healthy (label 0) test image to paste the unseen kinds into", "note": GENERALISATION_NOTE}
    idx = np.asarray(test.healthy_index)
    neg = {name: np.asarray(s)[idx] for name, s in test_scores.items()}
    sources = _sources(healthy)
    chosen = selection.scoring
    methods = {MODEL: (model_fn(model, selection.sampling), [chosen])}  # the chosen setting only: no re-selection
    methods.update({name: (b.reconstruct, [b.scoring]) for name, b in selection.baselines.items()})
    one_pass = dataclasses.replace(opts, max_batches=None)
    settings = {MODEL: chosen.as_dict(), **{name: b.scoring.as_dict() for name, b in selection.baselines.items()}}
    report: dict[str, Any] = {
        "note": GENERALISATION_NOTE,
        "settings_chosen_on": selection.record.get("chosen_on", "config"),
        "settings": settings,
        "n_healthy": len(healthy),
        "kinds": {},
    }
    for k, kind in enumerate(KINDS):
        share = list(range(k, len(healthy), len(KINDS)))
        if not share:
            continue
        col = run_pass(_batches(healthy, share, kind, opts.seed), methods, one_pass, device,
                       f"generalisation {kind}: reconstruct + score")
        pos = {MODEL: col.cat(MODEL), MEAN_INTENSITY: col.intensity_scores(),
               **{name: col.cat(name) for name in selection.baselines}}
        y = np.concatenate([np.zeros(len(healthy), dtype=np.int64), np.ones(len(share), dtype=np.int64)])
        subjects = sources + [sources[i] for i in share]
        scores = {name: np.concatenate([neg[name], pos[name]]) for name in pos}
        image = {name: detection_ci(s, y, subjects=subjects, n_boot=opts.n_boot, seed=opts.seed)
                 for name, s in scores.items()}
        margin = auroc_margin(scores[MODEL], {n: s for n, s in scores.items() if n != MODEL}, y, val_auroc,
                              subjects=subjects, n_boot=opts.n_boot, seed=opts.seed,
                              what=f"{kind} image AUROC margin")
        report["kinds"][kind] = {
            "description": DESCRIPTIONS[kind],
            "n_anomalous": len(share),
            "image": image,
            "margin_over_best_baseline": margin,
            "pixel_auprc": {name: _pixel_auprc(col, name) for name in pos},
        }
    margins = [e["margin_over_best_baseline"] for e in report["kinds"].values()]
    report["mean_margin"] = float(np.mean([m["auroc_diff"] for m in margins])) if margins else None
    with_ci = [m for m in margins if "auroc_diff_ci" in m]
    report["beats_kinds"] = int(sum(float(m["auroc_diff_ci"][0]) > 0 for m in with_ci))
    report["n_kinds"] = len(margins)
    report["verdict"] = (f"The model beats the best baseline (chosen on validation) on {report['beats_kinds']} of "
                         f"{len(margins)} unseen kinds (paired 95% CI above 0); mean margin "
                         f"{report['mean_margin']:+.3f}." if margins else "No unseen kind was scored.")
    return report


def generalisation_summary(gen: Mapping[str, Any] | None) -> dict[str, float]:
    """Summary floats: ``gen_<kind>_image_auroc`` / ``_margin`` per kind, ``gen_mean_margin``, ``gen_beats_kinds``."""
    if not gen or "kinds" not in gen:
        return {}
    s: dict[str, float] = {}
    for kind, e in gen["kinds"].items():
        s[f"gen_{kind}_image_auroc"] = float(e["image"][MODEL]["auroc"])
        s[f"gen_{kind}_margin"] = float(e["margin_over_best_baseline"]["auroc_diff"])
    if gen.get("mean_margin") is not None:
        s["gen_mean_margin"] = float(gen["mean_margin"])
        s["gen_beats_kinds"] = float(gen["beats_kinds"])
    return s


def print_generalisation(gen: Mapping[str, Any] | None, console: Any) -> None:
    """One line per unseen kind: model and best-baseline AUROC, the margin with its CI and verdict word."""
    if not gen:
        return
    if "kinds" not in gen:
        console.print(f"generalisation check skipped: {gen.get('skipped')}")
        return
    console.print(f"Generalisation to unseen anomaly kinds ({gen['n_healthy']} healthy test images; settings chosen "
                  f"on {gen['settings_chosen_on']}, not re-selected):")
    for kind, e in gen["kinds"].items():
        m = e["margin_over_best_baseline"]
        ci = m.get("auroc_diff_ci")
        word = "no CI" if ci is None else "beats" if ci[0] > 0 else "WORSE" if ci[1] < 0 else "does not beat"
        ci_s = "" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        console.print(f"  {kind} (n={e['n_anomalous']}): model AUROC {e['image'][MODEL]['auroc']:.3f}, "
                      f"{LABELS.get(m['baseline'], m['baseline'])} {m['auroc_baseline']:.3f}, margin "
                      f"{m['auroc_diff']:+.3f}{ci_s}: {word}")
    console.print(f"  {gen['verdict']}")
