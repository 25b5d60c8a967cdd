"""One pass over a pool: every scorer (the model's estimates, the trivial baselines, the steps sweep, other
checkpoints) scores each batch as it comes, so a pool — the test split above all — is read once.

A scorer is ``scorer(batch, start) -> {name: scores [b] (numpy)}`` with ``start`` the index of the batch's first
image in the pool; it may return fewer rows than the batch (the first ones: a capped sweep) or nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.metrics.baselines import mean_intensity_score
from meddiff.metrics.pixel import PixelAccumulator
from meddiff.protocols.common import MEAN_INTENSITY, HealthyBaseline
from meddiff.protocols.refiner.interfaces import estimates_of, with_steps

#: upper end of the pixel-score bins per map kind (an L2 map of [-1, 1] images reaches 4)
MAP_MAX = {"l1": 2.0, "l2": 4.0, "ssim": 2.0}
PIXEL_BINS = 1000

Scorer = Callable[[Mapping[str, Any], int], "dict[str, np.ndarray]"]
#: score-name prefix of a saved checkpoint's copy: ``ckpt/<key>/<estimate>``
CKPT = "ckpt/"


@dataclass
class Scored:
    """Scores of one pool: per scorer name, plus ids, subjects, labels (where the pool has them) and seconds."""

    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    has_subjects: bool = True  # every item carried ``subject``
    n: int = 0

    def get(self, name: str) -> np.ndarray:
        """``[n]`` float64 scores of ``name`` (fewer for a capped scorer: its first images)."""
        return np.concatenate(self.scores[name]).astype(np.float64)

    @property
    def y(self) -> np.ndarray | None:
        """``[n]`` int64 labels, or None for an unlabelled pool."""
        return np.concatenate(self.labels).astype(np.int64) if self.labels else None

    @property
    def clusters(self) -> list[str] | None:
        """The subject of every image when the pool knows them (the bootstrap then resamples subjects)."""
        return list(self.subjects) if self.has_subjects else None


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def head(batch: Mapping[str, Any], keep: int) -> dict[str, Any]:
    """The first ``keep`` items of a batch (per-item tensors and lists cut, anything else kept)."""
    b = int(batch["image"].shape[0])
    return {k: (v[:keep] if (torch.is_tensor(v) or isinstance(v, list | tuple)) and len(v) == b else v)
            for k, v in batch.items()}


@torch.no_grad()
def score_pool(loader: Iterable, scorers: Mapping[str, Scorer], device: torch.device,
               max_images: int | None = None, desc: str = "", progress: bool = False) -> Scored:
    """Run every scorer over each batch of ``loader`` once (``max_images``: the first ones only).

    ``seconds`` holds each scorer's time (key = its name in ``scorers``).
    """
    out = Scored()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        if max_images is not None and out.n >= max_images:
            break
        batch = to_device(batch, device)
        b = int(batch["image"].shape[0])
        keep = b if max_images is None else min(b, max_images - out.n)
        if keep < b:  # trim the last batch before scoring (no work on images that are not reported)
            batch = head(batch, keep)
        for key, scorer in scorers.items():
            t0 = time.perf_counter()
            for name, s in scorer(batch, out.n).items():
                out.scores.setdefault(name, []).append(np.asarray(s, dtype=np.float64).reshape(-1))
            out.seconds[key] = out.seconds.get(key, 0.0) + time.perf_counter() - t0
        out.ids.extend(str(i) for i in batch["id"])
        if "subject" in batch:
            out.subjects.extend(str(s) for s in batch["subject"])
        else:
            out.has_subjects = False
            out.subjects.extend(str(i) for i in batch["id"])
        if "label" in batch:
            out.labels.append(batch["label"].cpu().numpy().reshape(-1))
        out.n += keep
    return out


def _scores(x: torch.Tensor, recon: torch.Tensor, region: torch.Tensor | None, cfg: ScoringConfig,
            mask: torch.Tensor | None, pixel: dict[str, PixelAccumulator] | None, name: str) -> np.ndarray:
    """Image scores ``[B]`` of one estimate (the one scorer); its maps into ``pixel[name]`` when masks exist."""
    res = score_batch(x, recon.float(), region, cfg)
    if pixel is not None and mask is not None:
        acc = pixel.setdefault(name, PixelAccumulator(PIXEL_BINS, MAP_MAX.get(cfg.map, 2.0)))
        acc.update(res["map"], mask, res["region"])
    return res["score"].cpu().numpy()


def model_scorer(model: Any, names: Sequence[str] | None = None, prefix: str = "",
                 pixel: dict[str, PixelAccumulator] | None = None) -> Scorer:
    """Scores of the model's estimates (``names``: a subset, e.g. the primary one) under ``prefix + name``."""
    cfg = model.anomaly_val.scoring

    def scorer(batch: Mapping[str, Any], start: int) -> dict[str, np.ndarray]:
        x = batch["image"].float()
        est = estimates_of(model, batch)
        return {prefix + n: _scores(x, est[n], batch.get("brain_mask"), cfg, batch.get("mask"), pixel, n)
                for n in (names or list(est))}

    return scorer


@dataclass
class Baselines:
    """The trivial baselines (``meddiff.protocols.common``), scored with the model's scorer: the healthy-set ones
    (nearest healthy training image by L2 over the whole image, mean healthy image; ``{report key:
    HealthyBaseline}``) from the same known-healthy *training* images, plus the mean intensity (no reference)."""

    healthy: dict[str, HealthyBaseline]
    built_from: str  # the pool the reference images came from
    n_images: int  # images in the reference (a seeded subset when the pool is larger)
    n_pool: int

    @property
    def names(self) -> list[str]:
        return [MEAN_INTENSITY, *self.healthy]


def baseline_scorer(baselines: Baselines, cfg: ScoringConfig,
                    pixel: dict[str, PixelAccumulator] | None = None) -> Scorer:
    """Scores of the trivial baselines (``baselines.names``)."""

    def scorer(batch: Mapping[str, Any], start: int) -> dict[str, np.ndarray]:
        x, region, mask = batch["image"].float(), batch.get("brain_mask"), batch.get("mask")
        out = {MEAN_INTENSITY: mean_intensity_score(x, region).cpu().numpy()}
        for name, b in baselines.healthy.items():  # the reference is searched over the whole image (region=None)
            out[name] = _scores(x, b.reconstruct(x, None), region, cfg, mask, pixel, name)
        return out

    return scorer


def steps_scorer(model: Any, steps: Sequence[int], max_images: int | None,
                 seconds: dict[str, float]) -> Scorer:
    """The steps sweep (a measurement): the coarse estimate and refinements with each step count (``model.sampling``
    with ``steps`` replaced), on the first
    ``max_images`` images; each one's time into ``seconds`` (``"coarse"``, ``"refined@<s>"``)."""
    cfg = model.anomaly_val.scoring

    def scorer(batch: Mapping[str, Any], start: int) -> dict[str, np.ndarray]:
        b = int(batch["image"].shape[0])
        keep = b if max_images is None else max(0, min(b, max_images - start))
        if keep == 0:
            return {}
        part = head(batch, keep)
        x, region = part["image"].float(), part.get("brain_mask")
        t0 = time.perf_counter()
        coarse = model.coarse(part)
        seconds["coarse"] = seconds.get("coarse", 0.0) + time.perf_counter() - t0
        out = {"steps/coarse": _scores(x, coarse, region, cfg, None, None, "")}
        for s in steps:
            t0 = time.perf_counter()
            refined = model.refine_with(x, coarse, with_steps(model, s), ids=part.get("id"))
            seconds[f"refined@{s}"] = seconds.get(f"refined@{s}", 0.0) + time.perf_counter() - t0
            out[f"steps/{s}"] = _scores(x, refined, region, cfg, None, None, "")
        return out

    return scorer
