"""Denoising evaluation protocol (``eval_protocol = "denoise"``; CDM4MI).

For each noise level (default: the level(s) the model was trained on) the test patches get deterministic
Gaussian noise and are denoised by every method:

- ``noisy``: the noisy input itself (clipped to ``[-1, 1]``, like every method's output) - the trivial baseline;
- ``nlm``: non-local means (``skimage.restoration.denoise_nl_means``, ``sigma`` = the true noise std, ``h`` =
  factor x sigma with the factor chosen from a small grid on *validation* patches at that noise level);
- ``supervised``: a U-Net of the model's family trained on the same training pairs
  (:mod:`meddiff.protocols.denoise_baseline`, cached in the run dir);
- ``ddim_<n>``: the conditional diffusion model, DDIM with ``n`` steps (``eta`` from the options);
- ``ddpm``: the conditional diffusion model, the full ancestral chain (every timestep).

Metrics (``meddiff.metrics.image_quality.image_scores``, explicit dynamic range, default 2.0 for ``[-1, 1]``):
PSNR (dB), SSIM, MAE per test patch, reported as mean and std over patches (``psnr``, ``psnr_std``, ...), and
per stitched slice (``slice_psnr``, ...; the patches of each selected slice are put back with
the one stitcher of ``meddiff.patches``, overlaps averaged, pixels outside the covered region excluded). With
``mask: foreground`` only pixels whose clean value is above ``foreground_threshold`` count (NaN for an empty mask;
averages skip them). Speed: wall seconds per patch of each method at the evaluation batch size.

Outputs in ``out_dir``: ``report.json`` (``summary`` = flat floats), ``metrics.csv``, ``speed.csv``,
``{psnr,ssim,mae}_vs_noise.png``, ``denoise_examples.png``, and for ``n_slices_out`` slices per noise level
``images/sigma<level>/`` TIFF hyperstacks (one per slice, pages = clean, noisy, each method; ImageJ labels) and
NIfTI stacks (one per method and volume, ``[H, W, slices]``); all written atomically. A rich table is printed.
Nothing is chosen on test: the NLM parameter is chosen on validation, and ``max_patches`` picks whole slices
evenly spread over the test split, independent of any result.

The DataModule is read through a public API only (:class:`DenoiseData`; ``HDF5PatchDataModule`` provides it),
and the model is never changed: it is put in eval mode on ``device`` for the run and restored afterwards.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.image_quality import image_scores
from meddiff.patches import stitch_canvases
from meddiff.protocols.base import evaluating
from meddiff.utils.io import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text
from meddiff.utils.options import options_from

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "mae")
MASKS = (None, "none", "foreground")


@dataclass
class SupervisedOptions:
    """The supervised U-Net baseline (``eval.supervised``)."""

    enabled: bool = True
    steps: int = 500
    lr: float = 1e-3
    loss: str = "l1"
    residual: bool = True
    net: dict | None = None  # net config; null = the experiment's net (stored in the checkpoint)
    cache_dir: str | None = None  # null = <out_dir>/baselines


@dataclass
class DenoiseEvalOptions:
    """Options of the denoising protocol (``configs/eval/denoise.yaml``)."""

    noise_levels: list[float] | None = None  # null = trained level(s): the fixed std, or low/mid/high of a range
    ddpm: bool = True  # the full ancestral chain (T network calls per patch)
    ddim_steps: list[int] = field(default_factory=lambda: [10, 25, 50])
    eta: float = 0.0
    num_samples: int | None = None  # samples averaged per patch; null = the model's num_samples
    batch_size: int = 64
    max_patches: int | None = None  # cap on test patches (whole slices, evenly spread); null = all
    dynamic_range: float = 2.0
    mask: str | None = None  # null | foreground
    foreground_threshold: float = -0.9
    nlm: bool = True
    nlm_h_factors: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2])
    nlm_patch_size: int = 5
    nlm_patch_distance: int = 6
    nlm_val_patches: int = 64
    supervised: SupervisedOptions = field(default_factory=SupervisedOptions)
    n_slices_out: int = 3
    write_tiff: bool = True
    write_nifti: bool = True
    figures: bool = True  # metric-vs-noise plots and the example grid (PNG)
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Normalise list fields and reject bad values (ConfigError naming the ``eval.<option>``)."""
        if self.noise_levels is not None:
            if isinstance(self.noise_levels, (int, float)):
                self.noise_levels = [float(self.noise_levels)]
            self.noise_levels = [float(s) for s in self.noise_levels]
            if not self.noise_levels or any(not (s >= 0 and math.isfinite(s)) for s in self.noise_levels):
                raise ConfigError(f"eval.noise_levels={self.noise_levels} must be a non-empty list of stds >= 0.")
        self.ddim_steps = [int(n) for n in (self.ddim_steps or [])]
        if any(n < 1 for n in self.ddim_steps):
            raise ConfigError(f"eval.ddim_steps={self.ddim_steps} must be positive step counts.")
        if not self.ddpm and not self.ddim_steps:
            raise ConfigError("eval.ddpm=false and eval.ddim_steps=[] leave no diffusion method to evaluate.")
        if self.batch_size < 1 or (self.max_patches is not None and self.max_patches < 1):
            raise ConfigError(
                f"eval.batch_size={self.batch_size} and eval.max_patches={self.max_patches} must be >= 1 (or null)."
            )
        if self.mask not in MASKS:
            raise ConfigError(f"eval.mask={self.mask!r} is unknown; use null or 'foreground'.")
        if not self.dynamic_range > 0:
            raise ConfigError(f"eval.dynamic_range={self.dynamic_range} must be > 0 (2.0 for [-1, 1] images).")
        if self.nlm and (not self.nlm_h_factors or any(h <= 0 for h in self.nlm_h_factors)):
            raise ConfigError(f"eval.nlm_h_factors={self.nlm_h_factors} must be a non-empty list of values > 0.")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"eval.num_samples={self.num_samples} must be >= 1 or null.")


# ------------------------------------------------------------------------------------------------ helpers
def trained_noise_levels(noise_std: float | Sequence[float]) -> list[float]:
    """Evaluation levels for a model trained at ``noise_std``: ``[std]``, or ``[low, mid, high]`` of a range."""
    if isinstance(noise_std, (int, float)):
        return [float(noise_std)]
    lo, hi = (float(v) for v in noise_std)
    return [lo] if lo == hi else [lo, round((lo + hi) / 2, 6), hi]


def select_slices(coords: np.ndarray, max_patches: int | None) -> np.ndarray:
    """Positions (into ``coords``, ``[N, 4]`` rows ``(volume, slice, y, x)``) of whole slices, at most ``max_patches``.

    The (volume, slice) list is cut into ``k`` equal bins and the middle slice of each bin is taken, with the
    largest ``k`` whose slices hold at most ``max_patches`` patches: a capped run still sees the whole split, and
    no edge slice is favoured. If even one slice has more than ``max_patches`` patches, the first ``max_patches``
    patches of the middle slice are used. ``None`` keeps everything.
    """
    n = len(coords)
    if max_patches is None or n <= max_patches:
        return np.arange(n, dtype=np.int64)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (v, s) in enumerate(coords[:, :2]):
        groups[(int(v), int(s))].append(i)
    order = sorted(groups)
    sizes = np.asarray([len(groups[k]) for k in order])
    for k in range(min(len(order), max_patches // max(1, int(sizes.min()))), 0, -1):
        idx = ((np.arange(k) + 0.5) * len(order) / k).astype(int)
        if sizes[idx].sum() <= max_patches:
            return np.asarray(sorted(i for j in idx for i in groups[order[j]]), dtype=np.int64)
    return np.asarray(groups[order[len(order) // 2]][:max_patches], dtype=np.int64)


def nlm_denoise(noisy: np.ndarray, sigma: float, h_factor: float, patch_size: int = 5,
                patch_distance: int = 6) -> np.ndarray:
    """Non-local means of each image of ``noisy [N, C, H, W]`` (float, ``[-1, 1]`` units); same shape, clipped.

    ``sigma`` is the noise std (same units), ``h = h_factor * sigma`` the filter strength (scikit-image's
    recommended setting is ``h ~ 0.8 sigma`` with ``fast_mode``).
    """
    from skimage.restoration import denoise_nl_means

    out = np.empty_like(noisy, dtype=np.float32)
    s = max(float(sigma), 1e-6)
    for i in range(noisy.shape[0]):
        for c in range(noisy.shape[1]):
            out[i, c] = denoise_nl_means(noisy[i, c].astype(np.float64), h=h_factor * s, sigma=s, fast_mode=True,
                                         patch_size=patch_size, patch_distance=patch_distance)
    return np.clip(out, -1.0, 1.0)


def _mask_for(clean: torch.Tensor, opts: DenoiseEvalOptions) -> torch.Tensor | None:
    if opts.mask in (None, "none"):
        return None
    return clean > opts.foreground_threshold


def _scores(clean: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None, dr: float) -> dict[str, np.ndarray]:
    s = image_scores(clean.float().cpu(), pred.float().cpu(), None if mask is None else mask.cpu(), dynamic_range=dr,
                     max_psnr=100.0)
    return {k: v.numpy().astype(np.float64) for k, v in s.items()}


def _agg(values: list[np.ndarray]) -> tuple[float, float]:
    v = np.concatenate(values) if values else np.zeros(0)
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _SliceStitcher:
    """Collects the patches of each selected slice; when a slice is complete, stitches and scores it.

    Memory holds only the slices still incomplete plus the ``keep`` slices written out as images.
    """

    def __init__(self, coords: np.ndarray, slice_shapes: np.ndarray, keep: set[tuple[int, int]]):
        self.expected = defaultdict(int)
        for v, s in coords[:, :2]:
            self.expected[(int(v), int(s))] += 1
        self.slice_shapes = slice_shapes
        self.keep = keep
        self.buf: dict[tuple[int, int], list[tuple[np.ndarray, dict[str, np.ndarray]]]] = defaultdict(list)
        self.kept: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def add(self, coords: np.ndarray, images: dict[str, np.ndarray], opts: DenoiseEvalOptions) -> None:
        for i, c in enumerate(coords):
            key = (int(c[0]), int(c[1]))
            self.buf[key].append((c, {k: v[i] for k, v in images.items()}))
            if len(self.buf[key]) == self.expected[key]:
                self._finish(key, opts)

    def _finish(self, key: tuple[int, int], opts: DenoiseEvalOptions) -> None:
        items = self.buf.pop(key)
        cs = np.stack([c for c, _ in items])
        names = list(items[0][1])
        # all images of the slice at once: the images of each patch stacked on the channel axis [n, M, P, P]
        canvas = stitch_canvases(np.stack([np.stack([d[n] for n in names]) for _, d in items]), cs,
                                 self.slice_shapes[key[0]])[key]
        stitched = canvas.mean(fill=-1.0)[0].to(torch.float32).numpy()  # [M, H, W]
        slices = {n: stitched[i] for i, n in enumerate(names)}
        clean = torch.from_numpy(slices["clean"])[None, None]
        region = canvas.covered()  # [1, 1, H, W]
        fg = _mask_for(clean, opts)
        mask = region if fg is None else (region & fg)
        for name, img in slices.items():
            if name == "clean":
                continue
            s = _scores(clean, torch.from_numpy(img)[None, None], mask, opts.dynamic_range)
            for m in METRICS:
                self.scores[name][m].append(float(s[m][0]))
        if key in self.keep:
            self.kept[key] = slices


# ------------------------------------------------------------------------------------------------ what it reads
class DenoiseData(Protocol):
    """What the denoise protocol needs from a DataModule (``HDF5PatchDataModule`` provides it)."""

    noise_std: float | Sequence[float]  # the training noise level: a std, or a [low, high] range

    def noisy_dataset(self, split: str, noise_std: float | Sequence[float] | None = None) -> Any:
        """(noisy, clean) patch pairs of ``split`` at ``noise_std`` (val/test: deterministic noise). Items carry
        ``image``, ``cond`` ``[C, P, P]`` and ``coords`` ``[4]``; the dataset has ``coords`` ``[N, 4]`` rows
        ``(volume, slice, y, x)``, ``volumes`` (volume rows) and ``info`` (``path``, ``sha256``, ``slice_shapes``)."""
        ...

    def split_names(self) -> dict[str, list[str]]:
        """Volume names per split."""
        ...

    def train_dataloader(self) -> Any:
        """The training pairs (the supervised baseline trains on them)."""
        ...


DATA_API: tuple[str, ...] = ("noise_std", "noisy_dataset", "split_names", "train_dataloader")


def _check_data(datamodule: Any) -> None:
    """ConfigError naming what a DataModule must provide (:class:`DenoiseData`) when ``datamodule`` lacks it."""
    missing = [name for name in DATA_API if not hasattr(datamodule, name)]
    if missing:
        raise ConfigError(
            f"the denoise protocol reads its data through noise_std, noisy_dataset(split, noise_std), split_names() "
            f"and train_dataloader() (see meddiff.protocols.denoise.DenoiseData); {type(datamodule).__name__} lacks "
            f"{missing}. Use data=hdf5_patches (HDF5PatchDataModule) or give the DataModule these members."
        )


# ------------------------------------------------------------------------------------------------ protocol
def run(model: Any, datamodule: Any, eval_cfg: Mapping[str, Any] | None, out_dir: str | Path,
        device: str | torch.device = "cpu") -> dict[str, Any]:
    """Evaluate a conditional denoising model against the noisy input, NLM and a supervised U-Net.

    Args:
        model: a module with ``denoise(cond, sampler, steps, eta, num_samples, generator, progress)`` returning
            ``[B, C, H, W]`` in ``[-1, 1]`` (``ConditionalDiffusion``), ``schedule``, ``image_channels`` and
            ``cond_channels``.
        datamodule: provides :class:`DenoiseData` (``noise_std``, ``noisy_dataset(split, noise_std)``,
            ``split_names()``, ``train_dataloader()``), e.g. ``HDF5PatchDataModule``.
        eval_cfg: ``DenoiseEvalOptions`` fields as a dict (``configs/eval/denoise.yaml``).
        out_dir: where report, tables, figures and images go.
        device: where the networks run.

    Returns:
        The report (JSON-ready) with ``summary``: ``{"<metric>/<method>@<level>": float}`` plus the quality-bar
        flags; also written to ``out_dir/report.json``.

    Raises:
        ConfigError: bad options, a model without ``denoise``, a DataModule without :class:`DenoiseData`.
        DataError: an empty test split.
    """
    opts = options_from(DenoiseEvalOptions, eval_cfg, "eval")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    if not hasattr(model, "denoise"):
        raise ConfigError(
            f"{type(model).__name__} has no denoise(); the denoise protocol needs a ConditionalDiffusion model."
        )
    _check_data(datamodule)
    with evaluating(model, device):
        return _run(model, datamodule, opts, out_dir, device)


def _run(model: Any, datamodule: DenoiseData, opts: DenoiseEvalOptions, out_dir: Path, device: torch.device
         ) -> dict[str, Any]:
    """:func:`run` after the checks, with ``model`` in eval mode on ``device``."""
    from tqdm.auto import tqdm

    T = int(model.schedule.num_train_timesteps)
    bad = [n for n in opts.ddim_steps if n > T]
    if bad:
        raise ConfigError(f"eval.ddim_steps {bad} exceed the model's T={T} timesteps; use steps <= {T}.")
    trained = trained_noise_levels(datamodule.noise_std)
    levels = opts.noise_levels or trained

    # ---- test patches (whole slices; independent of any result)
    base_test = datamodule.noisy_dataset("test")
    if len(base_test) == 0:
        raise DataError("the test split is empty; set data.test_fraction > 0 so some volumes are held out.")
    info = base_test.info
    test_coords = base_test.coords
    positions = select_slices(test_coords, opts.max_patches)
    sel_coords = test_coords[positions]
    slice_keys = sorted({(int(v), int(s)) for v, s in sel_coords[:, :2]})
    keep_idx = np.unique(np.linspace(0, len(slice_keys) - 1, min(opts.n_slices_out, len(slice_keys))).round())
    keep = {slice_keys[int(i)] for i in keep_idx} if opts.n_slices_out > 0 else set()

    methods = ["noisy"] + (["nlm"] if opts.nlm else []) + (["supervised"] if opts.supervised.enabled else [])
    methods += [f"ddim_{n}" for n in opts.ddim_steps] + (["ddpm"] if opts.ddpm else [])

    # ---- supervised baseline (trained on the training pairs, cached)
    supervised_info: dict[str, Any] | None = None
    sup_model = None
    if opts.supervised.enabled:
        from meddiff.protocols.denoise_baseline import load_or_train_supervised

        net_cfg = opts.supervised.net
        if not net_cfg:
            raise ConfigError(
                "eval.supervised.net is not set: give the supervised U-Net's net config (configs/eval/denoise.yaml "
                "uses ${net}, the experiment's net), or set eval.supervised.enabled=false."
            )
        data_id = {"path": str(Path(info.path).resolve()), "sha256": list(info.sha256),
                   "train_volumes": list(datamodule.noisy_dataset("train").volumes), "noise_std": datamodule.noise_std,
                   "batch_size": getattr(datamodule, "batch_size", None)}
        sup_model, supervised_info = load_or_train_supervised(
            opts.supervised.cache_dir or out_dir / "baselines", net_cfg, datamodule.train_dataloader(), data_id,
            in_channels=int(getattr(model, "cond_channels", 1)), out_channels=int(getattr(model, "image_channels", 1)),
            steps=opts.supervised.steps, lr=opts.supervised.lr, loss=opts.supervised.loss,
            residual=opts.supervised.residual, device=device, seed=opts.seed, progress=opts.progress,
        )

    results: dict[str, dict[str, dict[str, float]]] = {}
    nlm_choice: dict[str, Any] = {}
    speed: list[dict[str, Any]] = []
    spreads: dict[str, dict[str, Any]] = {}
    kept_images: dict[str, dict[tuple[int, int], dict[str, np.ndarray]]] = {}
    for li, level in enumerate(levels):
        lkey = f"{level:g}"
        # ---- NLM strength chosen on validation patches at this noise level
        h_factor = None
        if opts.nlm:
            h_factor, grid = _choose_nlm_h(datamodule, level, opts)
            nlm_choice[lkey] = {"h_factor": h_factor, "h": h_factor * level, "val_psnr_by_h_factor": grid,
                                "chosen_on": "validation"}
        ds = Subset(datamodule.noisy_dataset("test", noise_std=level), positions.tolist())
        loader = DataLoader(ds, batch_size=opts.batch_size, shuffle=False, num_workers=0)
        per_patch: dict[str, dict[str, list[np.ndarray]]] = {m: defaultdict(list) for m in methods}
        spread: dict[str, list[float]] = defaultdict(list)  # mean |method - first diffusion method| per batch
        seconds: dict[str, float] = defaultdict(float)
        stitcher = _SliceStitcher(sel_coords, info.slice_shapes, keep)
        bar = tqdm(total=len(loader) * len(methods), desc=f"denoise sigma={level:g}", unit="method x batch",
                   leave=False, disable=not opts.progress)
        for bi, batch in enumerate(loader):
            clean = batch["image"].to(device)
            cond = batch["cond"].to(device)
            mask = _mask_for(clean, opts)
            preds: dict[str, torch.Tensor] = {}
            for m in methods:
                if opts.progress:
                    bar.set_postfix(method=m)
                _sync(device)
                t0 = time.perf_counter()
                if m == "noisy":
                    pred = cond.clamp(-1.0, 1.0)
                elif m == "nlm":
                    pred = torch.from_numpy(nlm_denoise(cond.cpu().numpy(), level, h_factor, opts.nlm_patch_size,
                                                        opts.nlm_patch_distance)).to(device)
                elif m == "supervised":
                    with torch.no_grad():
                        pred = sup_model(cond)
                else:
                    gen = torch.Generator(device=device).manual_seed(opts.seed * 1_000_003 + li * 10_007 + bi)
                    sampler, steps = ("ddpm", None) if m == "ddpm" else ("ddim", int(m.split("_")[1]))
                    pred = model.denoise(cond, sampler=sampler, steps=steps, eta=opts.eta,
                                         num_samples=opts.num_samples, generator=gen,
                                         progress=opts.progress and m == "ddpm")
                _sync(device)
                seconds[m] += time.perf_counter() - t0
                bar.update(1)
                preds[m] = pred
                for k, v in _scores(clean, pred, mask, opts.dynamic_range).items():
                    per_patch[m][k].append(v)
            diffusion = [m for m in methods if m.startswith("ddim_") or m == "ddpm"]
            for m in diffusion[1:]:
                spread[m].append(float((preds[m] - preds[diffusion[0]]).abs().mean()) * clean.shape[0])
            images = {"clean": clean.cpu().numpy()[:, 0], **{m: p.cpu().numpy()[:, 0] for m, p in preds.items()}}
            stitcher.add(batch["coords"].numpy(), images, opts)
        bar.close()
        n = len(ds)
        res: dict[str, dict[str, float]] = {}
        for m in methods:
            row: dict[str, float] = {}
            for k in METRICS:
                row[k], row[f"{k}_std"] = _agg(per_patch[m][k])
                sv = np.asarray(stitcher.scores[m][k], dtype=np.float64)
                sv = sv[np.isfinite(sv)]
                row[f"slice_{k}"] = float(sv.mean()) if sv.size else float("nan")
            row["sec_per_patch"] = seconds[m] / max(n, 1)
            res[m] = row
        results[lkey] = res
        ref_m = next(m for m in methods if m.startswith("ddim_") or m == "ddpm")
        spreads[lkey] = {"reference": ref_m, **{m: sum(v) / max(n, 1) for m, v in spread.items()},
                         "mae_of_reference": res[ref_m]["mae"]}
        kept_images[lkey] = stitcher.kept
        for m in methods:
            if m.startswith("ddim_") or m == "ddpm":
                steps = T if m == "ddpm" else int(m.split("_")[1])
                speed.append({"noise_std": level, "method": m, "sampler": m.split("_")[0], "steps": steps,
                              "sec_per_patch": res[m]["sec_per_patch"], "psnr": res[m]["psnr"],
                              "ssim": res[m]["ssim"]})

    quality = _quality_bar(results, levels, trained)
    report: dict[str, Any] = {
        "protocol": "denoise",
        "settings": asdict(opts),
        "model": {"class": type(model).__name__, "T": T, "prediction_type": model.schedule.prediction_type,
                  "timestep_spacing": getattr(model, "timestep_spacing", None),
                  "clip_sample": getattr(model, "clip_sample", None),
                  "num_samples": opts.num_samples or getattr(model, "num_samples", 1)},
        "data": {"path": str(info.path), "test_volumes": datamodule.split_names()["test"],
                 "val_volumes": datamodule.split_names()["val"], "trained_noise_levels": trained},
        "n_patches": int(len(positions)),
        "n_slices": len(slice_keys),
        "batch_size": opts.batch_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "noise_levels": [float(x) for x in levels],
        "methods": methods,
        "results": results,
        "nlm": nlm_choice,
        "supervised": supervised_info,
        "speed": speed,
        # mean |x - x_ref| between the diffusion methods' outputs (same seeds): ~0 means the samples hardly depend
        # on the sampler / starting noise (the model acts as a posterior-mean regressor); compare with the MAE
        "sampler_spread": spreads,
        "quality_bar": quality,
        "summary": _summary(results, quality),
    }
    _write_outputs(report, kept_images, out_dir, opts)
    return report


def _choose_nlm_h(datamodule: DenoiseData, level: float, opts: DenoiseEvalOptions) -> tuple[float, dict[str, float]]:
    """The NLM ``h`` factor with the best mean PSNR on (up to ``nlm_val_patches``) validation patches."""
    val = datamodule.noisy_dataset("val", noise_std=level)
    if len(val) == 0:
        log.warning("no validation patches: NLM uses h = 0.8 sigma (scikit-image's recommendation)")
        return 0.8, {}
    idx = np.unique(np.linspace(0, len(val) - 1, min(opts.nlm_val_patches, len(val))).round().astype(int))
    items = [val[int(i)] for i in idx]
    clean = torch.stack([it["image"] for it in items])
    noisy = torch.stack([it["cond"] for it in items]).numpy()
    mask = _mask_for(clean, opts)
    grid: dict[str, float] = {}
    for h in opts.nlm_h_factors:
        pred = torch.from_numpy(nlm_denoise(noisy, level, h, opts.nlm_patch_size, opts.nlm_patch_distance))
        grid[f"{h:g}"] = _agg([_scores(clean, pred, mask, opts.dynamic_range)["psnr"]])[0]
    best = max(grid, key=lambda k: -math.inf if math.isnan(grid[k]) else grid[k])
    return float(best), grid


def _quality_bar(results: dict[str, dict[str, dict[str, float]]], levels: Sequence[float],
                 trained: Sequence[float]) -> dict[str, Any]:
    """The issue's bar at each trained level that was evaluated: DDPM vs NLM, DDIM (<= 50 steps) vs DDPM."""
    lo, hi = min(trained), max(trained)
    out: dict[str, Any] = {}
    for level in levels:
        if not lo - 1e-9 <= level <= hi + 1e-9:
            continue
        r = results[f"{level:g}"]
        entry: dict[str, Any] = {}
        if "ddpm" in r and "nlm" in r:
            entry["ddpm_beats_nlm_psnr"] = bool(r["ddpm"]["psnr"] > r["nlm"]["psnr"])
            entry["ddpm_beats_nlm_ssim"] = bool(r["ddpm"]["ssim"] > r["nlm"]["ssim"])
            entry["ddpm_minus_nlm_psnr_db"] = r["ddpm"]["psnr"] - r["nlm"]["psnr"]
            entry["ddpm_minus_nlm_ssim"] = r["ddpm"]["ssim"] - r["nlm"]["ssim"]
        ddims = {m: v for m, v in r.items() if m.startswith("ddim_") and int(m.split("_")[1]) <= 50}
        if ddims and "ddpm" in r:
            best = max(ddims, key=lambda m: ddims[m]["psnr"])
            gap = r["ddpm"]["psnr"] - ddims[best]["psnr"]
            entry["best_ddim_le_50"] = best
            entry["ddpm_minus_best_ddim_psnr_db"] = gap
            entry["ddim_within_0.5db_of_ddpm"] = bool(gap <= 0.5)
        out[f"{level:g}"] = entry
    return out


def _summary(results: dict[str, dict[str, dict[str, float]]], quality: dict[str, Any]) -> dict[str, float]:
    summary: dict[str, float] = {}
    for lkey, res in results.items():
        for m, row in res.items():
            for k in (*METRICS, "sec_per_patch"):
                summary[f"{k}/{m}@{lkey}"] = float(row[k])
    for lkey, entry in quality.items():
        for k, v in entry.items():
            if isinstance(v, (bool, int, float)):
                summary[f"bar/{k}@{lkey}"] = float(v)
    return summary


# ------------------------------------------------------------------------------------------------ outputs
def _write_outputs(report: dict[str, Any], kept: dict[str, dict[tuple[int, int], dict[str, np.ndarray]]],
                   out_dir: Path, opts: DenoiseEvalOptions) -> None:
    atomic_write_json(out_dir / "report.json", report)
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["psnr", "psnr_std", "ssim", "ssim_std", "mae", "mae_std", "slice_psnr", "slice_ssim", "slice_mae",
            "sec_per_patch"]
    w.writerow(["noise_std", "method", *cols])
    for lkey, res in report["results"].items():
        for m, row in res.items():
            w.writerow([lkey, m, *(f"{row[c]:.6f}" for c in cols)])
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["noise_std", "method", "steps", "sec_per_patch", "psnr", "ssim"])
    for r in report["speed"]:
        w.writerow([f"{r['noise_std']:g}", r["method"], r["steps"], f"{r['sec_per_patch']:.6f}", f"{r['psnr']:.4f}",
                    f"{r['ssim']:.5f}"])
    atomic_write_text(out_dir / "speed.csv", buf.getvalue())

    names = ["clean", *report["methods"]]
    _write_images(kept, names, out_dir, opts)
    if opts.figures:
        _write_figures(report, kept, names, out_dir)
    print_report(report)


def _write_figures(report: dict[str, Any], kept: dict[str, dict[tuple[int, int], dict[str, np.ndarray]]],
                   names: list[str], out_dir: Path) -> None:
    from meddiff.viz.figures import save_metric_curves

    levels = report["noise_levels"]
    for k, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("mae", "MAE")):
        series = {m: [report["results"][f"{s:g}"][m][k] for s in levels] for m in report["methods"]}
        save_metric_curves(out_dir / f"{k}_vs_noise.png", levels, series, "noise std ([-1, 1] units)", label,
                           title=f"{label} vs noise level (test patches, mean)")
    ref = _reference_level(report)
    if ref in kept and kept[ref]:
        _save_examples(out_dir / "denoise_examples.png", kept[ref], names, report["results"][ref], ref)


def _write_images(kept: dict[str, dict[tuple[int, int], dict[str, np.ndarray]]], names: list[str], out_dir: Path,
                  opts: DenoiseEvalOptions) -> None:
    """TIFF hyperstacks per slice and NIfTI stacks per method/volume of the kept slices, per noise level."""
    for lkey, slices in kept.items():
        folder = out_dir / "images" / f"sigma{lkey}"
        if opts.write_tiff:
            import tifffile

            for (v, s), imgs in slices.items():
                stack = np.stack([imgs[n] for n in names]).astype(np.float32)
                atomic_write(folder / f"vol{v:03d}_slice{s:03d}.tif",
                             lambda p, stack=stack: tifffile.imwrite(p, stack, imagej=True,
                                                                     metadata={"Labels": names, "axes": "ZYX"}))
        if opts.write_nifti:
            import nibabel as nib

            by_vol: dict[int, list[tuple[int, dict[str, np.ndarray]]]] = defaultdict(list)
            for (v, s), imgs in sorted(slices.items()):
                by_vol[v].append((s, imgs))
            for v, items in by_vol.items():
                for n in names:
                    vol = np.stack([imgs[n] for _, imgs in items], axis=-1).astype(np.float32)  # [H, W, k]
                    img = nib.Nifti1Image(vol, np.eye(4))
                    img.header["descrip"] = f"{n} slices {[s for s, _ in items]}"[:79].encode()
                    # serialised in memory: nibabel picks the format from the file name, the temporary's ends .tmp
                    atomic_write_bytes(folder / f"vol{v:03d}_{n}.nii.gz", gzip.compress(img.to_bytes()))


def _reference_level(report: dict[str, Any]) -> str:
    """The level the headline tables use: the first evaluated level the model was trained on (else the first)."""
    return next(iter(report["quality_bar"]), f"{report['noise_levels'][0]:g}")


def _save_examples(path: Path, slices: dict[tuple[int, int], dict[str, np.ndarray]], names: list[str],
                   res: dict[str, dict[str, float]], level: str) -> None:
    from matplotlib.figure import Figure

    keys = sorted(slices)
    fig = Figure(figsize=(1.8 * len(names), 1.9 * len(keys)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(keys), len(names), squeeze=False))
    for r, key in enumerate(keys):
        for c, n in enumerate(names):
            ax = axes[r, c]
            ax.imshow(slices[key][n], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(n if n == "clean" else f"{n}\n{res[n]['psnr']:.1f} dB", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"vol {key[0]} sl {key[1]}", fontsize=7)
    fig.suptitle(f"noise std {level} (titles: mean patch PSNR)", fontsize=9)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))


def print_report(report: dict[str, Any]) -> None:
    """Rich tables: metrics per noise level and method; the speed/quality table; the quality bar."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for lkey, res in report["results"].items():
        table = Table(title=f"Denoising, noise std {lkey} ({report['n_patches']} test patches, mean ± std; "
                            f"NLM h chosen on validation)")
        for col in ("method", "PSNR dB", "SSIM", "MAE", "slice PSNR", "s / patch"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for m, r in res.items():
            table.add_row(m, f"{r['psnr']:.2f} ± {r['psnr_std']:.2f}", f"{r['ssim']:.4f} ± {r['ssim_std']:.4f}",
                          f"{r['mae']:.4f}", f"{r['slice_psnr']:.2f}", f"{r['sec_per_patch']:.4f}")
        console.print(table)
    ref = _reference_level(report)
    table = Table(title=f"Sampling speed vs quality (noise std {ref}, batch {report['batch_size']}, {report['device']})")
    for col in ("sampler", "steps", "s / patch", "PSNR dB", "SSIM"):
        table.add_column(col, justify="right")
    for r in report["speed"]:
        if f"{r['noise_std']:g}" == ref:
            table.add_row(r["sampler"], str(r["steps"]), f"{r['sec_per_patch']:.4f}", f"{r['psnr']:.2f}",
                          f"{r['ssim']:.4f}")
    console.print(table)
    for lkey, entry in report["quality_bar"].items():
        console.print(f"quality bar @ {lkey}: " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
