"""The refiner-family protocol (``eval_protocol = "refiner"``): inductive, transductive and AUCp, honestly labelled.

For a ``RefinerDiffusion`` both of its estimates are scored from the same pass (``coarse`` = the frozen generator,
``refined`` = coarse + sampled residual); for a ``CoarseGenerator`` its one estimate (``coarse``); any other anomaly
model (``reconstruct`` + ``scoring_cfg``) as ``model``. Every score goes through the one scorer
(``meddiff.anomaly.scoring.score_batch`` with the model's ``scoring_cfg``).

- **AUCp** (label-free): known-healthy images (the held-out ``known_healthy_val`` pool) = 0 against every image
  of an unlabelled pool = 1 — the unannotated mixed set (*transductive*) and the test images (*inductive*), whose
  batches are read without labels. Optional debiasing with ``rho``.
- **Inductive**: ``test/`` (subjects disjoint from the mixed set), image AUROC/AUPRC with stratified bootstrap 95%
  CIs, and subject level (scores averaged per subject) where subjects have several images.
- **Transductive**: the unannotated mixed set the models trained on; its folder labels are read here, for scoring
  only (``mixed_labelled``).
- **Coarse vs refined**: paired bootstrap CI of the AUROC difference on the same images; the same against the best
  trivial baseline (mean intensity, nearest healthy training image, mean healthy image — ``meddiff.metrics``).
- **Refinement steps** (default 1, 4, 10, 50) vs inductive AUROC vs seconds per image: a measurement, not a choice
  (the headline uses the model's configured ``num_steps``).
- **Checkpoints**: which selection rule picked the evaluated weights (found by comparing them with the checkpoints the
  run's callbacks kept: ``aucp``, ``labelled_validation`` — needs labels — and ``last``) and each rule's numbers.

``run(model, datamodule, eval_cfg, out_dir, device) -> report`` (the registry in ``meddiff.protocols`` maps
``"refiner"`` here). The datamodule must offer pools (``ImageFolderAnomalyDataModule``): ``pool_loader(name)``,
``has_pool(name)``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.anomaly.scoring import score_batch
from meddiff.errors import ConfigError, DataError
from meddiff.metrics.aucp import aucp, debiased_auc
from meddiff.metrics.baselines import MeanHealthy, NearestHealthy, mean_intensity_score
from meddiff.metrics.detection import aggregate_by_subject, image_level, paired_difference
from meddiff.models.coarse_gan import CoarseGenerator
from meddiff.models.refiner import RefinerDiffusion
from meddiff.runs.checkpoint_selection import RULES_NEEDING_LABELS, load_weights_only, selection_checkpoints
from meddiff.utils.io import atomic_write_text
from meddiff.utils.options import options_from

log = logging.getLogger(__name__)

LABELS_NONE = "none: pool membership only (known-healthy = 0, unlabelled pool = 1)"
LABELS_TEST = "test/ folder labels (pos / Ungood = 1, neg / good = 0)"
LABELS_MIXED = ("folder labels of the unannotated mixed set (train/pos vs train/neg_mixed, or BMAD valid/), read "
                "only here, for scoring; never in training or selection")


@dataclass
class RefinerEvalOptions:
    """Options of the refiner protocol (``eval:`` in the configs)."""

    n_boot: int = 1000
    seed: int = 0
    steps: Sequence[int] = (1, 4, 10, 50)
    steps_max_images: int | None = None  # test images in the steps sweep (a fixed subset); None = all
    rho: float | None = None  # share of healthy images in the unannotated pool; None = the model's aucp_rho
    checkpoint_dir: str | None = None  # the run's checkpoints; None = <out_dir>/checkpoints
    compare_checkpoints: bool = True
    max_images: int | None = None  # per pool (quick looks); None = all
    baselines: bool = True
    baseline_max_train: int = 2000  # known-healthy training images the nearest-neighbour baseline searches
    subject_reduction: str = "mean"
    figures: bool = True
    progress: bool = False

    def validate(self) -> None:
        if isinstance(self.n_boot, bool) or int(self.n_boot) < 0:
            raise ConfigError(f"eval.n_boot={self.n_boot} must be an integer >= 0.")
        if self.rho is not None and not 0 <= float(self.rho) < 1:
            raise ConfigError(f"eval.rho={self.rho} must be in [0, 1) or null.")
        if self.subject_reduction not in ("mean", "max"):
            raise ConfigError(f"eval.subject_reduction={self.subject_reduction!r}: choose mean or max.")


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class Scored:
    """Scores of one pool: per estimate (``coarse``/``refined``) and per baseline, plus ids and subjects."""

    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def get(self, name: str) -> np.ndarray:
        return np.concatenate(self.scores[name]).astype(np.float64)

    @property
    def y(self) -> np.ndarray | None:
        return np.concatenate(self.labels).astype(np.int64) if self.labels else None


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def estimate_names(model: Any) -> list[str]:
    """The healthy estimates scored: a refiner's coarse and refined ones, a CoarseGenerator's coarse one, and any
    other anomaly model's ``reconstruct`` ("model")."""
    if isinstance(model, RefinerDiffusion):
        return ["coarse", "refined"]
    return ["coarse"] if isinstance(model, CoarseGenerator) else ["model"]


def primary_estimate(model: Any) -> str:
    return estimate_names(model)[-1]


@dataclass
class _Baselines:
    """Trivial baselines scored with the model's scorer (``meddiff.metrics.baselines``), both from the same
    known-healthy training images: the nearest one (L2 over the whole image) and their mean."""

    nearest: NearestHealthy
    mean: MeanHealthy


def _baseline_images(datamodule: Any, opts: RefinerEvalOptions, device: torch.device) -> _Baselines | None:
    """The baselines over ``baseline_max_train`` known-healthy training images (a seeded subset when more)."""
    if not opts.baselines:
        return None
    ds = datamodule.pool_dataset("known_healthy")
    idx = np.arange(len(ds))
    if len(idx) > opts.baseline_max_train:
        idx = np.sort(np.random.default_rng(opts.seed).choice(len(idx), opts.baseline_max_train, replace=False))
    images = torch.stack([ds[int(i)]["image"] for i in idx])
    return _Baselines(NearestHealthy(images, n_healthy_total=len(ds), device=device), MeanHealthy.from_images(images))


@torch.no_grad()
def score_pool(model: Any, loader: Iterable, device: torch.device, baselines: _Baselines | None,
               steps: int | None = None, max_images: int | None = None, desc: str = "",
               progress: bool = False, estimates: Sequence[str] | None = None) -> Scored:
    """Score every image of a loader with the model's estimates and the baselines (one pass)."""
    out = Scored()
    names = list(estimates or estimate_names(model))
    cfg = model.scoring_cfg
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        if max_images is not None and out.n >= max_images:
            break
        batch = _to(batch, device)
        x = batch["image"].float()
        region = batch.get("brain_mask")
        recon: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        first = model.coarse(batch) if isinstance(model, RefinerDiffusion) else model.reconstruct(batch)
        key = "coarse" if isinstance(model, RefinerDiffusion) else names[0]
        out.seconds[key] = out.seconds.get(key, 0.0) + time.perf_counter() - t0
        coarse = first
        if key in names:
            recon[key] = first
        if "refined" in names:
            t0 = time.perf_counter()
            recon["refined"] = model.refine(x, coarse, num_steps=steps, ids=batch.get("id"))
            out.seconds["refined"] = out.seconds.get("refined", 0.0) + time.perf_counter() - t0
        for name, r in recon.items():
            out.scores.setdefault(name, []).append(score_batch(x, r.float(), region, cfg)["score"].cpu().numpy())
        if baselines is not None:
            out.scores.setdefault("baseline_mean_intensity", []).append(mean_intensity_score(x, region).cpu().numpy())
            out.scores.setdefault("baseline_nearest_healthy", []).append(
                score_batch(x, baselines.nearest.reconstruct(x), region, cfg)["score"].cpu().numpy())
            out.scores.setdefault("baseline_mean_healthy", []).append(
                score_batch(x, baselines.mean.reconstruct(x), region, cfg)["score"].cpu().numpy())
        out.ids.extend(str(i) for i in batch["id"])
        out.subjects.extend(str(s) for s in batch.get("subject", batch["id"]))
        if "label" in batch:
            out.labels.append(batch["label"].cpu().numpy())
        out.n += x.shape[0]
    if max_images is not None and out.n > max_images:  # trim the last batch
        for k in out.scores:
            out.scores[k] = [out.get(k)[:max_images]]
        out.ids, out.subjects = out.ids[:max_images], out.subjects[:max_images]
        if out.labels:
            out.labels = [out.y[:max_images]]
        out.n = max_images
    return out


# ---------------------------------------------------------------------------------------------------- numbers
def paired_auroc_difference(scores_a: Any, scores_b: Any, labels: Any, n_boot: int = 1000, seed: int = 0,
                            ci: float = 0.95) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the same images with a paired stratified-bootstrap CI (one resample, both scores).

    ``meddiff.metrics.detection.paired_difference`` under this report's keys: ``{"difference", "ci": (lo, hi),
    "n"}`` plus ``"p_a_not_better"`` (share of replicates with a difference <= 0); ``n_boot=0``: no CI (nan, nan).
    """
    if n_boot == 0:  # no bootstrap asked for: the point difference only
        a, b = (image_level(v, labels, n_boot=0) for v in (scores_a, scores_b))
        return {"difference": a["auroc"] - b["auroc"], "ci": (float("nan"), float("nan")), "n": a["n"]}
    d = paired_difference(scores_a, scores_b, labels, n_boot=n_boot, seed=seed, ci=ci)
    return {"difference": d["auroc_diff"], "ci": d["auroc_diff_ci"], "n": d["n"], "p_a_not_better": d["frac_diff_le_0"]}


def aucp_entry(healthy: np.ndarray, unlabelled: np.ndarray, rho: float | None, healthy_pool: str,
               unlabelled_pool: str) -> dict[str, Any]:
    """AUCp of one estimate: scores of known-healthy vs an unlabelled pool. Takes scores only — no labels."""
    value = aucp(healthy, unlabelled)
    entry: dict[str, Any] = {"aucp": value, "n_known_healthy": int(healthy.size), "n_unlabelled": int(unlabelled.size),
                             "known_healthy_pool": healthy_pool, "unlabelled_pool": unlabelled_pool,
                             "labels_used": LABELS_NONE, "rho": rho}
    if rho is not None:
        entry["debiased_auc"] = debiased_auc(value, rho)
    return entry


def detection(scored: Scored, names: Sequence[str], opts: RefinerEvalOptions, labels_used: str) -> dict[str, Any]:
    """Image and subject level AUROC/AUPRC (CIs) of each scorer, plus paired differences."""
    y = scored.y
    if y is None:
        raise DataError("this pool carries no labels; it cannot be scored for AUROC.")
    res: dict[str, Any] = {"labels_used": labels_used, "n": int(y.size), "n_pos": int(y.sum()), "image": {}}
    for name in names:
        res["image"][name] = image_level(scored.get(name), y, n_boot=opts.n_boot, seed=opts.seed)
    if len(set(scored.subjects)) < len(scored.subjects):
        res["subject"] = {}
        for name in names:
            _, s, ys = aggregate_by_subject(scored.get(name), y, scored.subjects, opts.subject_reduction)
            if 0 < ys.sum() < ys.size:
                res["subject"][name] = image_level(s, ys, n_boot=opts.n_boot, seed=opts.seed)
    base = [n for n in names if n.startswith("baseline_")]
    model_names = [n for n in names if not n.startswith("baseline_")]
    if "refined" in model_names and "coarse" in model_names:
        res["refined_minus_coarse"] = paired_auroc_difference(scored.get("refined"), scored.get("coarse"), y,
                                                              opts.n_boot, opts.seed)
    if base:
        best = max(base, key=lambda n: res["image"][n]["auroc"])
        top = model_names[-1]
        res["model_minus_best_baseline"] = {"model": top, "baseline": best, **paired_auroc_difference(
            scored.get(top), scored.get(best), y, opts.n_boot, opts.seed)}
    return res


# ---------------------------------------------------------------------------------------------------- checkpoints
def _same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k].detach().cpu(), b[k].detach().cpu()) for k in a)


def _checkpoint_rules(model: Any, ckpt_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """The run's rule -> checkpoint map and the rules whose weights equal the model's."""
    try:
        rules = selection_checkpoints(ckpt_dir)
    except ConfigError as exc:
        log.warning("cannot read the run's checkpoints in %s: %s", ckpt_dir, exc)
        return {}, []
    own = model.state_dict()
    matched = []
    for rule, path in rules.items():
        try:
            if _same_weights(own, load_weights_only(path)["state_dict"]):
                matched.append(rule)
        except ConfigError as exc:
            log.warning("checkpoint %s (%s) not comparable: %s", path, rule, exc)
    return rules, matched


# ---------------------------------------------------------------------------------------------------- the protocol
def evaluate(model: Any, datamodule: Any, opts: RefinerEvalOptions, device: torch.device,
             baselines: _Baselines | None, full: bool = True) -> dict[str, Any]:
    """AUCp, inductive and transductive numbers of one model (``full=False``: primary estimate, no baselines)."""
    names = estimate_names(model) if full else [primary_estimate(model)]
    rho = opts.rho if opts.rho is not None else getattr(model, "aucp_rho", None)
    b = baselines if full else None
    kh_pool = "known_healthy_val" if datamodule.has_pool("known_healthy_val") else "known_healthy"
    p = opts.progress
    healthy = score_pool(model, datamodule.pool_loader(kh_pool), device, b, max_images=opts.max_images,
                         desc="known healthy", progress=p, estimates=names)
    # the unannotated pool is read WITHOUT labels ("mixed"); its labels come separately, for scoring only
    mixed = score_pool(model, datamodule.pool_loader("mixed"), device, b, max_images=opts.max_images,
                       desc="unannotated pool", progress=p, estimates=names)
    test = score_pool(model, datamodule.pool_loader("test"), device, b, max_images=opts.max_images,
                      desc="test", progress=p, estimates=names)
    scorers = list(names) + (sorted(k for k in test.scores if k.startswith("baseline_")) if b is not None else [])
    report: dict[str, Any] = {"aucp": {}}
    for name in scorers:
        report["aucp"][name] = {
            "transductive": aucp_entry(healthy.get(name), mixed.get(name), rho, kh_pool, "mixed (unannotated)"),
            "inductive": aucp_entry(healthy.get(name), test.get(name), rho, kh_pool, "test (read without labels)"),
        }
    if kh_pool == "known_healthy":
        report["aucp_note"] = ("data.val_fraction=0: the healthy side of AUCp is the known-healthy TRAINING set, "
                               "which the models fit; AUCp is then optimistic.")
    report["inductive"] = detection(test, scorers, opts, LABELS_TEST)
    mixed.labels = [_labels_by_id(datamodule, mixed.ids)]
    report["transductive"] = detection(mixed, scorers, opts, LABELS_MIXED)
    report["seconds_per_image"] = {k: v / max(1, healthy.n + mixed.n + test.n) for k, v in
                                   _sum_seconds(healthy, mixed, test).items()}
    report["_curves"] = {name: (test.get(name), test.y) for name in scorers}
    return report


def _sum_seconds(*pools: Scored) -> dict[str, float]:
    total: dict[str, float] = {}
    for p in pools:
        for k, v in p.seconds.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _labels_by_id(datamodule: Any, ids: Sequence[str]) -> np.ndarray:
    """Folder labels of the unannotated pool's images, in ``ids`` order (transductive scoring only)."""
    ds = datamodule.pool_dataset("mixed_labelled")
    by_id = {r.id: r.label for r in ds.records}
    return np.asarray([by_id[i] for i in ids], dtype=np.int64)


def steps_sweep(model: RefinerDiffusion, datamodule: Any, opts: RefinerEvalOptions, device: torch.device
                ) -> list[dict[str, Any]]:
    """Inductive AUROC and seconds per image of the coarse estimate and of refinements with each step count."""
    rows = []
    loader = datamodule.pool_loader("test")
    coarse = score_pool(model, loader, device, None, max_images=opts.steps_max_images, estimates=["coarse"],
                        desc="steps: coarse", progress=opts.progress)
    y = coarse.y
    rows.append({"estimate": "coarse", "steps": 0, "auroc": image_level(coarse.get("coarse"), y, n_boot=0)["auroc"],
                 "sec_per_image": coarse.seconds["coarse"] / coarse.n})
    for s in opts.steps:
        try:
            model.check_steps(int(s), model.t_start)
        except ConfigError as exc:
            rows.append({"estimate": "refined", "steps": int(s), "skipped": str(exc)})
            continue
        sc = score_pool(model, loader, device, None, steps=int(s), max_images=opts.steps_max_images,
                        estimates=["refined"], desc=f"steps: {s}", progress=opts.progress)
        rows.append({"estimate": "refined", "steps": int(s),
                     "auroc": image_level(sc.get("refined"), y, n_boot=0)["auroc"],
                     "sec_per_image": (sc.seconds["refined"] + sc.seconds["coarse"]) / sc.n})
    return rows


def _compact(rep: dict[str, Any], name: str) -> dict[str, Any]:
    ind, tra = rep["inductive"]["image"][name], rep["transductive"]["image"][name]
    return {"inductive_auroc": ind["auroc"], "inductive_auroc_ci": ind["auroc_ci"],
            "transductive_auroc": tra["auroc"], "aucp_transductive": rep["aucp"][name]["transductive"]["aucp"],
            "aucp_inductive": rep["aucp"][name]["inductive"]["aucp"]}


def run(model: Any, datamodule: Any, eval_cfg: Mapping[str, Any] | None, out_dir: str | Path,
        device: str | torch.device) -> dict[str, Any]:
    """Evaluate a coarse or refiner model; writes ``refiner_report.md`` (+ ``roc.png``) and returns the report
    (``eval.py`` writes it as ``report.json``)."""
    opts = options_from(RefinerEvalOptions, eval_cfg, "eval")
    device = torch.device(device)
    out_dir = Path(out_dir)
    for name in ("pool_loader", "pool_dataset", "has_pool"):
        if not callable(getattr(datamodule, name, None)):
            raise ConfigError("the refiner protocol needs a datamodule with pools (data=image_folder: "
                              "ImageFolderAnomalyDataModule).")
    model.eval()
    primary = primary_estimate(model)
    baselines = _baseline_images(datamodule, opts, device)
    report: dict[str, Any] = {"protocol": "refiner", "model": type(model).__name__, "primary_estimate": primary,
                              "options": asdict(opts), "scoring": model.scoring_cfg.as_dict()}
    if isinstance(model, RefinerDiffusion):
        report["refinement"] = {"sampler": model.sampler, "num_steps": model.num_steps, "t_start": model.t_start,
                                "eta": model.eta, "timestep_spacing": model.timestep_spacing,
                                "residual_scale": float(model.residual_std), "coarse_source": model.coarse_info}

    # which rule picked these weights: compared with the checkpoints the run kept (derived, not asserted)
    ckpt_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else out_dir / "checkpoints"
    rules, matched = _checkpoint_rules(model, ckpt_dir)
    rule = next((r for r in ("aucp", "aucp_debiased", "labelled_validation", "last") if r in matched), None)
    report["selection"] = {
        "rule": rule or "unknown (weights match no checkpoint of the run)",
        "matched_rules": matched, "needs_labels": rule in RULES_NEEDING_LABELS if rule else None,
        "available": {r: str(p) for r, p in rules.items()},
        "rules": {"aucp": "best val/aucp (label-free)", "labelled_validation": "best val/auroc (NEEDS LABELS)",
                  "last": "last checkpoint (no selection)"},
    }

    main = evaluate(model, datamodule, opts, device, baselines, full=True)
    curves = main.pop("_curves")
    report.update(main)
    if isinstance(model, RefinerDiffusion) and opts.steps:
        report["steps"] = steps_sweep(model, datamodule, opts, device)
        report["steps_note"] = (f"a measurement on test, not a choice: the headline uses model.num_steps="
                                f"{model.num_steps}")
    if opts.compare_checkpoints and rules:
        report["checkpoints"] = {}
        for r, path in rules.items():
            entry: dict[str, Any] = {"path": str(path), "needs_labels": r in RULES_NEEDING_LABELS,
                                     "is_evaluated_model": r in matched}
            if r in matched:
                entry.update(_compact(report, primary))
            else:
                try:
                    other = copy.deepcopy(model)
                    other.load_state_dict(load_weights_only(path)["state_dict"])
                    other.eval()
                    entry.update(_compact(evaluate(other, datamodule, opts, device, None, full=False), primary))
                    del other
                except ConfigError as exc:
                    entry["error"] = str(exc)
            report["checkpoints"][r] = entry
    report["summary"] = _summary(report, primary)
    if opts.figures:
        from meddiff.viz.figures import save_roc_pr

        save_roc_pr(out_dir / "roc.png", {k: v for k, v in curves.items()}, title="Inductive test set")
    atomic_write_text(out_dir / "refiner_report.md", render_markdown(report))
    return report


def _summary(report: dict[str, Any], primary: str) -> dict[str, float]:
    ind, tra = report["inductive"], report["transductive"]
    s = {
        "inductive_auroc": ind["image"][primary]["auroc"],
        "inductive_auprc": ind["image"][primary]["auprc"],
        "transductive_auroc": tra["image"][primary]["auroc"],
        "aucp_transductive": report["aucp"][primary]["transductive"]["aucp"],
        "aucp_inductive": report["aucp"][primary]["inductive"]["aucp"],
    }
    if "subject" in ind and primary in ind["subject"]:
        s["inductive_subject_auroc"] = ind["subject"][primary]["auroc"]
    if "refined_minus_coarse" in ind:
        s["coarse_inductive_auroc"] = ind["image"]["coarse"]["auroc"]
        s["refined_minus_coarse"] = ind["refined_minus_coarse"]["difference"]
    if "model_minus_best_baseline" in ind:
        s["best_baseline_inductive_auroc"] = ind["image"][ind["model_minus_best_baseline"]["baseline"]]["auroc"]
    return {k: float(v) for k, v in s.items()}


def _fmt(d: Mapping[str, Any], key: str = "auroc") -> str:
    lo, hi = d.get(f"{key}_ci", (float("nan"), float("nan")))
    return f"{d[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def render_markdown(report: dict[str, Any]) -> str:
    """A short human-readable version of the report."""
    sel = report["selection"]
    lines = [f"# Refiner protocol: {report['model']} (headline estimate: {report['primary_estimate']})", "",
             f"Checkpoint selection rule: **{sel['rule']}**" + (" (needs labels)" if sel["needs_labels"] else ""), ""]
    for part in ("inductive", "transductive"):
        r = report[part]
        lines += [f"## {part.capitalize()} (n={r['n']}, {r['n_pos']} anomalous)", f"Labels used: {r['labels_used']}", "",
                  "| scorer | image AUROC [95% CI] | AUPRC [95% CI] | subject AUROC |", "|---|---|---|---|"]
        for name, d in r["image"].items():
            subj = r.get("subject", {}).get(name)
            lines.append(f"| {name} | {_fmt(d)} | {_fmt(d, 'auprc')} | {_fmt(subj) if subj else '-'} |")
        if "refined_minus_coarse" in r:
            d = r["refined_minus_coarse"]
            lines.append(f"\nrefined - coarse AUROC: {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] "
                         "(paired bootstrap)")
        if "model_minus_best_baseline" in r:
            d = r["model_minus_best_baseline"]
            lines.append(f"\n{d['model']} - {d['baseline']} AUROC: {d['difference']:+.3f} "
                         f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (paired bootstrap)")
        lines.append("")
    lines += ["## AUCp (labels used: none)", "", "| scorer | transductive AUCp | inductive AUCp | debiased (rho) |",
              "|---|---|---|---|"]
    for name, d in report["aucp"].items():
        t = d["transductive"]
        deb = "-" if t.get("debiased_auc") is None else f"{t['debiased_auc']:.3f} ({t['rho']})"
        lines.append(f"| {name} | {t['aucp']:.3f} | {d['inductive']['aucp']:.3f} | {deb} |")
    if "steps" in report:
        lines += ["", "## Refinement steps (inductive test; a measurement, not a choice)", "",
                  "| estimate | steps | AUROC | s / image |", "|---|---|---|---|"]
        for row in report["steps"]:
            if "skipped" in row:
                lines.append(f"| {row['estimate']} | {row['steps']} | skipped | - |")
            else:
                lines.append(f"| {row['estimate']} | {row['steps']} | {row['auroc']:.3f} | {row['sec_per_image']:.4f} |")
    if "checkpoints" in report:
        lines += ["", "## Checkpoints by selection rule", "",
                  "| rule | needs labels | inductive AUROC | transductive AUROC | AUCp (transd.) |", "|---|---|---|---|---|"]
        for rule, e in report["checkpoints"].items():
            if "error" in e:
                lines.append(f"| {rule} | {e['needs_labels']} | error | | |")
            else:
                lines.append(f"| {rule} | {e['needs_labels']} | {_fmt(e, 'inductive_auroc')} | "
                             f"{e['transductive_auroc']:.3f} | {e['aucp_transductive']:.3f} |")
    return "\n".join(lines) + "\n"
