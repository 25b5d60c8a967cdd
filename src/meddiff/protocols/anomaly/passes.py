"""One pass over a split: every method reconstructs each batch once and is scored under each of its candidate
settings (image scores, pixel histograms), the mean-intensity baseline alongside; used by selection and by test."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.metrics.baselines import intensity_map, mean_intensity_score
from meddiff.metrics.pixel import PixelAccumulator
from meddiff.protocols.common import MODEL

from .interfaces import ReconFn
from .options import EvalOptions

__all__ = ["Collected", "MAP_MAX", "map_key", "matching_pixel_acc", "model_fn", "precision_name", "run_pass"]

#: largest value of each map kind (the pixel histograms' range)
MAP_MAX = {"l1": 2.0, "l2": 4.0, "ssim": 2.0}


def map_key(cfg: ScoringConfig) -> tuple:
    """What a pixel map depends on (not the reduction to an image score)."""
    return (cfg.map, cfg.sign, cfg.median_size, cfg.erode_iterations)


@dataclass
class Collected:
    """One pass over a split: per method (``model`` and each reconstruction baseline) and candidate setting, the
    image scores and pixel histograms; the mean-intensity baseline; labels, subjects and figure data."""

    scores: dict[str, dict[int, list[torch.Tensor]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    pixel: dict[str, dict[int, PixelAccumulator]] = field(default_factory=lambda: defaultdict(dict))
    intensity: list[torch.Tensor] = field(default_factory=list)
    pixel_intensity: PixelAccumulator | None = None
    labels: list[torch.Tensor] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    fields: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))  # add-on batch fields
    ids: list[str] = field(default_factory=list)  # item ids, when batches carry add-on fields
    examples: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    compute: dict[str, Any] | None = None  # what the model's network ran with (first batch; see _observe_compute)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # per method: reconstruct + score
    #: up to ``cache_healthy`` healthy (label 0) items of the pass, one dict per item (tensors on the CPU, the
    #: batch's other per-item values as they were), and their positions among the pass's items
    healthy: list[dict[str, Any]] = field(default_factory=list)
    healthy_index: list[int] = field(default_factory=list)

    def cat(self, method: str, j: int = 0) -> np.ndarray:
        return torch.cat(self.scores[method][j]).double().numpy()

    def y(self) -> np.ndarray:
        return torch.cat(self.labels).numpy() if self.labels else np.zeros(0, dtype=np.int64)

    def intensity_scores(self) -> np.ndarray:
        return torch.cat(self.intensity).double().numpy()

    def subject_ids(self) -> list[str] | None:
        """One subject id per item when every batch carried ``subject``; None otherwise."""
        return list(self.subjects) if self.subjects and len(self.subjects) == sum(len(t) for t in self.labels) else None


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _reconstruct(model: Any, batch: Mapping[str, Any], sampling: Any | None) -> torch.Tensor:
    """The model's healthy estimate; ``sampling`` None = the model's own ``model.sampling`` (models without one
    take no ``sampling`` argument)."""
    return model.reconstruct(batch) if sampling is None else model.reconstruct(batch, sampling)


def model_fn(model: Any, sampling: Any | None) -> ReconFn:
    """``batch -> the model's healthy estimate`` with ``sampling`` (a copy of ``model.sampling``; None = as is)."""
    return lambda batch: _reconstruct(model, batch, sampling)


_PRECISION_NAMES = {"float32": "32-true", "bfloat16": "bf16-true", "float16": "16-true", "float64": "64-true"}
_MIXED_NAMES = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}


@contextmanager
def _observe_compute(info: dict[str, Any]) -> Iterator[None]:
    """Record in ``info`` what the first module with parameters that runs inside the block computed with: its
    parameter dtype, its output dtype and the autocast state at that moment (a global forward hook, removed after)."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if info:
            return
        p = next(module.parameters(recurse=False), None)
        if p is None:
            return
        out = output if torch.is_tensor(output) else next(
            (o for o in (output if isinstance(output, (tuple, list)) else ()) if torch.is_tensor(o)), None)
        dev = p.device.type
        autocast = torch.is_autocast_enabled(dev)
        info.update(
            observed=f"{type(module).__name__} forward",
            param_dtype=str(p.dtype).removeprefix("torch."),
            output_dtype=None if out is None else str(out.dtype).removeprefix("torch."),
            autocast=str(torch.get_autocast_dtype(dev)).removeprefix("torch.") if autocast else None,
        )

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def precision_name(info: Mapping[str, Any]) -> str:
    """Lightning-style name of what was observed: ``bf16-mixed`` under bf16 autocast, ``32-true`` for float32, ..."""
    if info.get("autocast"):
        return _MIXED_NAMES.get(info["autocast"], f"{info['autocast']}-mixed")
    dtype = info.get("param_dtype") or info.get("output_dtype") or "unknown"
    return _PRECISION_NAMES.get(dtype, dtype)


@torch.no_grad()
def run_pass(
    loader: Iterable,
    methods: Mapping[str, tuple[ReconFn, list[ScoringConfig]]],
    opts: EvalOptions,
    device: torch.device,
    desc: str,
    keep_examples: int = 0,
    observe: bool = False,
    fields: Sequence[str] = (),
    cache_healthy: int = 0,
) -> Collected:
    """One pass: each method (``model`` first) reconstructs each batch once and its reconstruction is scored under
    every candidate of that method; pixel histograms per distinct map; the mean-intensity baseline alongside.
    ``observe``: record what the model's network computed with on the first batch (``out.compute``). ``fields``:
    batch keys of add-ons to collect per item (``out.fields``, with ``out.ids``, and in the kept examples).
    ``cache_healthy``: keep the first that many healthy items (``out.healthy``, for the generalisation check, so
    the split is not read again). ``out.seconds``: wall seconds per method (reconstruction + scoring)."""
    out = Collected()
    n_seen = 0
    n_batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if opts.max_batches is not None and n_batches is not None:
        n_batches = min(n_batches, opts.max_batches)
    for i, batch in enumerate(tqdm(loader, desc=desc, total=n_batches, leave=False)):
        if opts.max_batches is not None and i >= opts.max_batches:
            break
        batch = _to(batch, device)
        x = batch["image"]
        region = batch.get("brain_mask")
        labels = batch.get("label", torch.zeros(x.shape[0], dtype=torch.long, device=device))
        has_mask = "mask" in batch
        if cache_healthy > len(out.healthy):
            _cache_healthy(out, batch, labels, n_seen, cache_healthy)
        n_seen += x.shape[0]
        for name, (fn, candidates) in methods.items():
            t0 = time.perf_counter()
            if observe and name == MODEL and out.compute is None:
                info: dict[str, Any] = {}
                with _observe_compute(info):
                    healthy = fn(batch)
                if not info:  # no network ran (a stand-in model): say what its reconstruction was
                    info = {"observed": "reconstruction output", "param_dtype": None,
                            "output_dtype": str(healthy.dtype).removeprefix("torch."), "autocast": None}
                out.compute = info
            else:
                healthy = fn(batch)
            healthy = healthy.float()
            pixel_for = {}  # the first candidate of each distinct map gets the pixel histogram
            for j, cfg in enumerate(candidates):
                pixel_for.setdefault(map_key(cfg), j)
            for j, cfg in enumerate(candidates):
                res = score_batch(x.float(), healthy, region, cfg)
                out.scores[name][j].append(res["score"].cpu())
                if has_mask and pixel_for[map_key(cfg)] == j:
                    acc = out.pixel[name].setdefault(j, PixelAccumulator(opts.pixel_bins, MAP_MAX.get(cfg.map, 2.0)))
                    acc.update(res["map"], batch["mask"], res["region"])
                if name == MODEL and j == 0 and keep_examples \
                        and sum(len(e) for e in out.examples["image"]) < keep_examples:
                    out.examples["image"].append(x.cpu())
                    out.examples["recon"].append(healthy.cpu())
                    out.examples["map"].append(res["map"].cpu())
                    out.examples["label"].append(labels.cpu())
                    if has_mask:
                        out.examples["mask"].append(batch["mask"].cpu())
                    present = [f for f in fields if f in batch]
                    for f in present:
                        out.examples[f].append(batch[f].cpu())
                    if present:
                        out.examples["id"].append([str(v) for v in batch.get("id", [""] * x.shape[0])])
            out.seconds[name] += time.perf_counter() - t0
        out.intensity.append(mean_intensity_score(x.float(), region).cpu())
        if has_mask:
            if out.pixel_intensity is None:
                out.pixel_intensity = PixelAccumulator(opts.pixel_bins, 1.0)
            base_map = intensity_map(x.float())
            if region is not None:
                base_map = base_map * region
            out.pixel_intensity.update(base_map, batch["mask"], region)
        out.labels.append(labels.cpu())
        subj = batch.get("subject")
        if subj is not None:
            out.subjects.extend([str(s) for s in subj])
        present = [f for f in fields if f in batch]
        for f in present:
            out.fields[f].append(batch[f].cpu())
        if present:
            out.ids.extend(str(v) for v in batch.get("id", [""] * x.shape[0]))
    return out


def _cache_healthy(out: Collected, batch: Mapping[str, Any], labels: torch.Tensor, offset: int, cap: int) -> None:
    """Append the batch's healthy items to ``out.healthy`` (at most ``cap`` in all): per-item slices of every
    batch value with one entry per item (tensors detached to the CPU), everything else dropped."""
    b = labels.shape[0]
    for i in (labels.reshape(b, -1)[:, 0] == 0).nonzero().flatten().tolist():
        if len(out.healthy) >= cap:
            return
        item: dict[str, Any] = {}
        for k, v in batch.items():
            if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == b:
                item[k] = v[i].detach().cpu()
            elif isinstance(v, (list, tuple)) and len(v) == b:
                item[k] = v[i]
        out.healthy.append(item)
        out.healthy_index.append(offset + i)


def matching_pixel_acc(accs: Mapping[int, PixelAccumulator], candidates: list[ScoringConfig],
                        chosen: int) -> PixelAccumulator | None:
    """The validation pixel accumulator with the chosen map and filter (pixel maps do not depend on reduction)."""
    for j, acc in accs.items():
        if map_key(candidates[j]) == map_key(candidates[chosen]):
            return acc
    return None
