"""Denoising evaluation protocol (``eval_protocol = "denoise"``; CDM4MI).

For each noise level (default: the level(s) the model was trained on) the test patches get deterministic
Gaussian noise and are denoised by every method:

- ``noisy``: the noisy input itself (clipped to ``[-1, 1]``, like every method's output) - the trivial baseline;
- ``nlm``: non-local means (``skimage.restoration.denoise_nl_means``, ``sigma`` = the true noise std, ``h`` =
  factor x sigma with the factor chosen from a small grid on *validation* patches at that noise level);
- ``bm3d``: BM3D (``meddiff.metrics.denoisers``; an optional extra with a non-commercial licence: used when
  installed, reported as absent otherwise), ``sigma`` = the known noise std (or estimated per patch with
  ``bm3d_sigma: estimate``). At ~1 s per patch it can be capped to ``bm3d_max_slices`` of the test slices (evenly
  spread over the selected ones, deterministic, independent of any result); its rows then cover those slices and
  every paired comparison with it uses exactly those slices for both methods;
- ``supervised``: a U-Net of the model's family trained on the same training pairs
  (:mod:`meddiff.protocols.denoise_baseline`, cached in the run dir);
- ``ddim_<n>``: the conditional diffusion model, DDIM with ``n`` steps (``eta`` from the options);
- ``ddpm``: the conditional diffusion model, the full ancestral chain (every timestep).

Metrics (``meddiff.metrics.image_quality.image_scores``, explicit dynamic range, default 2.0 for ``[-1, 1]``):
PSNR (dB), SSIM, MAE and VSI per test patch, reported as mean and std over patches (``psnr``, ``psnr_std``, ...),
and per stitched slice (``slice_psnr``, ...; the patches of each selected slice are put back with
the one stitcher of ``meddiff.patches``, overlaps averaged, pixels outside the covered region excluded). With
``mask: foreground`` only pixels whose clean value is above ``foreground_threshold`` count (NaN for an empty mask;
averages skip them). Speed: wall seconds per patch of every method at the evaluation batch size.

Choices and verdicts (all on validation; the test split is read once per level, after them): at each level the
selection step sees the DataModule through :class:`meddiff.protocols.base.ValidationView` (asking it for test data
raises) and reads ``val_patches`` validation patches (evenly spread): the NLM factor is chosen on them; at the
trained level(s) every method is also scored on them, and from those validation means come the best DDIM with
<= 50 steps, the verdict "DDIM within 0.5 dB of DDPM", the model's sampler for the comparisons (the DDPM chain,
else the best DDIM) and the best classical baseline (``noisy`` / ``nlm`` / ``bm3d``, by PSNR). Each records
``chosen_on``, derived from the splits the selection step read. On test the model's margin over that baseline
(and over the supervised U-Net) gets a paired bootstrap CI across test slices (resampling volumes when the slices
come from several), per metric; the test gap between DDPM and the chosen DDIM is reported beside the validation one.

Outputs in ``out_dir``: ``report.json`` (``summary`` = flat floats), ``metrics.csv``, ``speed.csv``,
``{psnr,ssim,mae,vsi}_vs_noise.png``, ``denoise_examples.png``, and for ``n_slices_out`` slices per noise level
``images/sigma<level>/`` TIFF hyperstacks (one per slice, pages = clean, noisy, each method; ImageJ labels; a
method that did not run on a slice, e.g. a capped BM3D, is NaN there) and NIfTI stacks (one per method and
volume, ``[H, W, slices]``); all written atomically. Rich tables are printed. ``max_patches`` picks whole slices
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
from meddiff.metrics import denoisers
from meddiff.metrics.image_quality import image_scores
from meddiff.metrics.paired import paired_mean_difference
from meddiff.patches import stitch_canvases
from meddiff.protocols.base import ValidationView, evaluating
from meddiff.utils.io import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text
from meddiff.utils.options import options_from

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "mae", "vsi")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mae": False, "vsi": True}
MASKS = (None, "none", "foreground")
BM3D_SIGMA = ("known", "estimate")
CLASSICAL = ("noisy", "nlm", "bm3d")  # the candidates for "the best classical baseline"
DDIM_BUDGET = 50  # the quality bar's "DDIM with at most this many steps"
DDIM_TOLERANCE_DB = 0.5  # ... "within this many dB of the DDPM chain"
_SPLIT_WORD = {"train": "train", "val": "validation", "test": "test"}


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
    nlm_val_patches: int | None = None  # deprecated: use val_patches (kept so older checkpoints' configs load)
    bm3d: bool = True  # used when the optional extra is installed, reported as absent otherwise
    bm3d_sigma: str = "known"  # known (the level added) | estimate (per patch, Donoho's wavelet estimator)
    bm3d_profile: str = "np"
    bm3d_max_slices: int | None = None  # BM3D on at most this many of the test slices (evenly spread); null = all
    val_patches: int = 64  # validation patches (evenly spread) for every choice and verdict
    n_boot: int = 1000  # bootstrap replicates of the paired CIs
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
        if self.nlm_val_patches is not None:
            log.warning("eval.nlm_val_patches is deprecated: it now sets eval.val_patches (every validation choice).")
            self.val_patches = int(self.nlm_val_patches)
            self.nlm_val_patches = None
        if self.val_patches < 1:
            raise ConfigError(f"eval.val_patches={self.val_patches} must be >= 1.")
        if self.bm3d_sigma not in BM3D_SIGMA:
            raise ConfigError(f"eval.bm3d_sigma={self.bm3d_sigma!r} is unknown; use one of {list(BM3D_SIGMA)}.")
        if self.bm3d_max_slices is not None and self.bm3d_max_slices < 1:
            raise ConfigError(f"eval.bm3d_max_slices={self.bm3d_max_slices} must be >= 1 or null (all slices).")
        if self.n_boot < 1:
            raise ConfigError(f"eval.n_boot={self.n_boot} must be >= 1 (e.g. 1000).")


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

    Memory holds only the slices still incomplete plus the ``keep`` slices written out as images. A method that did
    not run on a slice (a capped BM3D: NaN estimates) scores NaN there.
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
        covered = region[0, 0].numpy()
        for name, img in slices.items():
            if name == "clean":
                continue
            if not np.isfinite(img[covered]).all():  # the method did not run on this slice (a capped BM3D)
                for m in METRICS:
                    self.scores[name][m].append(float("nan"))
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
    T = int(model.schedule.num_train_timesteps)
    bad = [n for n in opts.ddim_steps if n > T]
    if bad:
        raise ConfigError(f"eval.ddim_steps {bad} exceed the model's T={T} timesteps; use steps <= {T}.")
    trained = trained_noise_levels(datamodule.noise_std)
    levels = opts.noise_levels or trained
    lo, hi = min(trained), max(trained)

    # ---- test patches (whole slices; independent of any result); only coordinates are read here
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

    # ---- BM3D: an optional extra; used when installed, reported as absent otherwise
    use_bm3d = opts.bm3d and denoisers.available()
    bm3d_slices = _spread(slice_keys, opts.bm3d_max_slices) if use_bm3d else []
    bm3d_info: dict[str, Any] = {"status": "used" if use_bm3d else (
        "absent: optional extra bm3d not installed (pip install meddiff[denoise])" if opts.bm3d
        else "disabled (eval.bm3d=false)")}
    if use_bm3d:
        bm3d_info.update(sigma=opts.bm3d_sigma, profile=opts.bm3d_profile, n_slices=len(bm3d_slices),
                         of_slices=len(slice_keys), slices=[list(k) for k in bm3d_slices])
    else:
        log.warning("BM3D %s", bm3d_info["status"])

    methods = ["noisy"] + (["nlm"] if opts.nlm else []) + (["bm3d"] if use_bm3d else [])
    methods += ["supervised"] if opts.supervised.enabled else []
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
    validation: dict[str, Any] = {}
    quality: dict[str, Any] = {}
    speed: list[dict[str, Any]] = []
    spreads: dict[str, dict[str, Any]] = {}
    kept_images: dict[str, dict[tuple[int, int], dict[str, np.ndarray]]] = {}
    for li, level in enumerate(levels):
        lkey = f"{level:g}"
        in_bar = lo - 1e-9 <= level <= hi + 1e-9
        ctx = _Context(model, opts, level, li, device, sup_model)
        # ---- every choice at this level, on validation patches only (the view refuses test data)
        sel = _select(ValidationView(datamodule), ctx, methods if in_bar else [])
        ctx.h_factor = sel.h_factor
        if opts.nlm:
            nlm_choice[lkey] = sel.nlm
        if in_bar:
            validation[lkey] = {"chosen_on": sel.chosen_on, "n_patches": sel.n_patches, "means": sel.means}
        # ---- the one pass over the test patches at this level
        test = _test_pass(datamodule, ctx, methods, positions, sel_coords, info.slice_shapes, keep,
                          set(bm3d_slices))
        results[lkey] = test.results
        if use_bm3d and len(bm3d_slices) < len(slice_keys):
            # a capped BM3D is compared with every method on its own slices (mean over those slices)
            on = [test.slices.index(k) for k in bm3d_slices]
            bm3d_info.setdefault("on_its_slices", {})[lkey] = {
                m: {k: _agg([test.per_slice[m][k][on]])[0] for k in METRICS} for m in methods}
        spreads[lkey] = test.spread
        kept_images[lkey] = test.kept
        for m in methods:
            diffusion = m.startswith("ddim_") or m == "ddpm"
            row = test.results[m]
            speed.append({"noise_std": level, "method": m, "sampler": m.split("_")[0] if diffusion else "baseline",
                          "steps": (T if m == "ddpm" else int(m.split("_")[1])) if diffusion else None,
                          "sec_per_patch": row["sec_per_patch"], "n_patches": row["n_patches"],
                          "psnr": row["psnr"], "ssim": row["ssim"], "vsi": row["vsi"]})
        if in_bar:
            quality[lkey] = _verdicts(sel, test, opts)

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
        "bm3d": bm3d_info,
        "supervised": supervised_info,
        # the validation means behind every choice and verdict of the quality bar (trained levels)
        "validation": validation,
        "speed": speed,
        # mean |x - x_ref| between the diffusion methods' outputs (same seeds): ~0 means the samples hardly depend
        # on the sampler / starting noise (the model acts as a posterior-mean regressor); compare with the MAE
        "sampler_spread": spreads,
        "quality_bar": quality,
        "summary": _summary(results, quality),
    }
    _write_outputs(report, kept_images, out_dir, opts)
    return report


def _spread(keys: Sequence[tuple[int, int]], k: int | None) -> list[tuple[int, int]]:
    """At most ``k`` of ``keys`` (sorted), the middle one of each of ``k`` equal bins; ``None`` keeps all."""
    keys = sorted(keys)
    if k is None or k >= len(keys):
        return list(keys)
    return [keys[int(i)] for i in ((np.arange(k) + 0.5) * len(keys) / k).astype(int)]


@dataclass
class _Context:
    """What applying a method needs at one noise level (``h_factor`` is set once chosen on validation)."""

    model: Any
    opts: DenoiseEvalOptions
    level: float
    li: int
    device: torch.device
    sup_model: Any = None
    h_factor: float | None = None


#: generator seeds of the validation pass are offset so they never coincide with the test pass's
_VAL_SEED_OFFSET = 500_009


def _apply(m: str, cond: torch.Tensor, ctx: _Context, seed: int) -> torch.Tensor:
    """Method ``m`` on the noisy patches ``cond [B, C', P, P]`` -> estimates ``[B, C, P, P]`` in ``[-1, 1]``."""
    opts = ctx.opts
    if m == "noisy":
        return cond.clamp(-1.0, 1.0)
    if m == "nlm":
        return torch.from_numpy(nlm_denoise(cond.cpu().numpy(), ctx.level, ctx.h_factor, opts.nlm_patch_size,
                                            opts.nlm_patch_distance)).to(cond.device)
    if m == "bm3d":
        sigma = ctx.level if opts.bm3d_sigma == "known" else None
        return torch.from_numpy(denoisers.bm3d_denoise_batch(cond.cpu().numpy(), sigma, opts.bm3d_profile)
                                ).to(cond.device)
    if m == "supervised":
        with torch.no_grad():
            return ctx.sup_model(cond)
    gen = torch.Generator(device=cond.device).manual_seed(seed)
    sampler, steps = ("ddpm", None) if m == "ddpm" else ("ddim", int(m.split("_")[1]))
    return ctx.model.denoise(cond, sampler=sampler, steps=steps, eta=opts.eta, num_samples=opts.num_samples,
                             generator=gen, progress=opts.progress and m == "ddpm")


def _batch_seed(ctx: _Context, bi: int) -> int:
    return ctx.opts.seed * 1_000_003 + ctx.li * 10_007 + bi


# ------------------------------------------------------------------------------------------------ selection
@dataclass
class _Selection:
    """Everything chosen at one noise level, on validation patches (what :func:`_select` returns)."""

    chosen_on: str | None  # derived from the splits the selection step read ("validation"); None = read nothing
    n_patches: int
    h_factor: float | None
    nlm: dict[str, Any]
    means: dict[str, dict[str, float]]  # method -> metric -> mean over the validation patches


def _select(view: ValidationView, ctx: _Context, methods: Sequence[str]) -> _Selection:
    """Choose the NLM factor and score ``methods`` on (up to ``val_patches``) validation patches.

    ``view`` is the DataModule as :class:`ValidationView`: asking it for the test split raises, and what it read
    (``view.splits_read``) is what ``chosen_on`` reports.
    """
    opts, level = ctx.opts, ctx.level
    if not opts.nlm and not methods:
        return _Selection(None, 0, None, {}, {})  # nothing to choose at this level
    val = view.noisy_dataset("val", noise_std=level)
    clean = cond = None
    if len(val) > 0:
        idx = np.unique(np.linspace(0, len(val) - 1, min(opts.val_patches, len(val))).round().astype(int))
        items = [val[int(i)] for i in idx]
        clean = torch.stack([it["image"] for it in items])
        cond = torch.stack([it["cond"] for it in items])
    chosen_on = ("+".join(_SPLIT_WORD[s] for s in view.splits_read) or None) if clean is not None else None
    nlm: dict[str, Any] = {}
    h_factor = None
    if opts.nlm:
        if clean is None:
            log.warning("no validation patches: NLM uses h = 0.8 sigma (scikit-image's recommendation)")
            h_factor, grid = 0.8, {}
        else:
            h_factor, grid = _choose_nlm_h(clean, cond.numpy(), level, opts)
        nlm = {"h_factor": h_factor, "h": h_factor * level, "val_psnr_by_h_factor": grid, "chosen_on": chosen_on}
    means: dict[str, dict[str, float]] = {}
    if clean is not None and methods:
        ctx.h_factor = h_factor
        means = _score_patches(clean, cond, methods, ctx, seed_offset=_VAL_SEED_OFFSET,
                               desc=f"validation sigma={level:g}")
    return _Selection(chosen_on, 0 if clean is None else len(clean), h_factor, nlm, means)


def _choose_nlm_h(clean: torch.Tensor, noisy: np.ndarray, level: float, opts: DenoiseEvalOptions
                  ) -> tuple[float, dict[str, float]]:
    """The NLM ``h`` factor with the best mean PSNR on the validation patches ``clean``/``noisy [N, C, P, P]``."""
    mask = _mask_for(clean, opts)
    grid: dict[str, float] = {}
    for h in opts.nlm_h_factors:
        pred = torch.from_numpy(nlm_denoise(noisy, level, h, opts.nlm_patch_size, opts.nlm_patch_distance))
        grid[f"{h:g}"] = _agg([_scores(clean, pred, mask, opts.dynamic_range)["psnr"]])[0]
    best = max(grid, key=lambda k: -math.inf if math.isnan(grid[k]) else grid[k])
    return float(best), grid


def _score_patches(clean: torch.Tensor, cond: torch.Tensor, methods: Sequence[str], ctx: _Context,
                   seed_offset: int, desc: str) -> dict[str, dict[str, float]]:
    """Mean of each metric of each method over the patches ``clean``/``cond [N, C, P, P]`` (in batches)."""
    from tqdm.auto import tqdm

    opts = ctx.opts
    per: dict[str, dict[str, list[np.ndarray]]] = {m: defaultdict(list) for m in methods}
    starts = range(0, len(clean), opts.batch_size)
    bar = tqdm(total=len(starts) * len(methods), desc=desc, unit="method x batch", leave=False,
               disable=not opts.progress)
    for bi, start in enumerate(starts):
        c = clean[start:start + opts.batch_size].to(ctx.device)
        x = cond[start:start + opts.batch_size].to(ctx.device)
        mask = _mask_for(c, opts)
        for m in methods:
            pred = _apply(m, x, ctx, seed_offset + _batch_seed(ctx, bi))
            for k, v in _scores(c, pred, mask, opts.dynamic_range).items():
                per[m][k].append(v)
            bar.update(1)
    bar.close()
    return {m: {k: _agg(per[m][k])[0] for k in METRICS} for m in methods}


#: validation means closer than this (dB of PSNR) are a tie, won by the earlier (cheaper) candidate: a choice
#: must not hinge on float noise (e.g. DDIM samplers that agree to 1e-5 dB)
TIE_DB = 1e-3


def _best(means: Mapping[str, Mapping[str, float]], candidates: Sequence[str], metric: str = "psnr") -> str | None:
    """The candidate with the best finite ``metric`` mean, the first within ``TIE_DB`` of it; None if none."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    vals = {m: sign * means[m][metric] for m in candidates if m in means and math.isfinite(means[m][metric])}
    if not vals:
        return None
    top = max(vals.values())
    return next(m for m in vals if vals[m] >= top - TIE_DB)


def _by_steps(methods: Sequence[str]) -> list[str]:
    """The DDIM methods of ``methods``, fewest steps first."""
    return sorted((m for m in methods if m.startswith("ddim_")), key=lambda m: int(m.split("_")[1]))


# ------------------------------------------------------------------------------------------------ test pass
@dataclass
class _TestScores:
    """The test pass at one noise level."""

    results: dict[str, dict[str, float]]  # method -> row of the metric table
    slices: list[tuple[int, int]]  # the selected test slices, in the order of ``per_slice``
    # method -> metric -> [n_slices]: the mean over each slice's patches (NaN: not run there / empty masks)
    per_slice: dict[str, dict[str, np.ndarray]]
    spread: dict[str, Any]
    kept: dict[tuple[int, int], dict[str, np.ndarray]]


def _test_pass(datamodule: DenoiseData, ctx: _Context, methods: Sequence[str], positions: np.ndarray,
               sel_coords: np.ndarray, slice_shapes: np.ndarray, keep: set[tuple[int, int]],
               bm3d_slices: set[tuple[int, int]]) -> _TestScores:
    """Every method on the selected test patches at ``ctx.level``: each patch is read once."""
    from tqdm.auto import tqdm

    opts, device, level = ctx.opts, ctx.device, ctx.level
    ds = Subset(datamodule.noisy_dataset("test", noise_std=level), positions.tolist())
    loader = DataLoader(ds, batch_size=opts.batch_size, shuffle=False, num_workers=0)
    per_patch: dict[str, dict[str, list[np.ndarray]]] = {m: defaultdict(list) for m in methods}
    patch_slice: dict[str, list[np.ndarray]] = defaultdict(list)  # method -> slice index of each scored patch
    slices = sorted({(int(v), int(s)) for v, s in sel_coords[:, :2]})
    slice_index = {k: i for i, k in enumerate(slices)}
    spread: dict[str, list[float]] = defaultdict(list)  # mean |method - first diffusion method| per batch
    seconds: dict[str, float] = defaultdict(float)
    stitcher = _SliceStitcher(sel_coords, slice_shapes, keep)
    bar = tqdm(total=len(loader) * len(methods), desc=f"denoise sigma={level:g}", unit="method x batch",
               leave=False, disable=not opts.progress)
    diffusion = [m for m in methods if m.startswith("ddim_") or m == "ddpm"]
    for bi, batch in enumerate(loader):
        clean = batch["image"].to(device)
        cond = batch["cond"].to(device)
        coords = batch["coords"].numpy()
        where = np.asarray([slice_index[(int(v), int(s))] for v, s in coords[:, :2]], dtype=np.int64)
        mask = _mask_for(clean, opts)
        preds: dict[str, torch.Tensor] = {}
        for m in methods:
            if opts.progress:
                bar.set_postfix(method=m)
            # a capped BM3D runs on the patches of its slices only; elsewhere its estimate is NaN (not run)
            rows = (torch.as_tensor([(int(v), int(s)) in bm3d_slices for v, s in coords[:, :2]], device=device)
                    if m == "bm3d" else None)
            _sync(device)
            t0 = time.perf_counter()
            if rows is None:
                pred = _apply(m, cond, ctx, _batch_seed(ctx, bi))
            else:
                pred = torch.full_like(clean, float("nan"))
                if bool(rows.any()):
                    pred[rows] = _apply(m, cond[rows], ctx, _batch_seed(ctx, bi))
            _sync(device)
            seconds[m] += time.perf_counter() - t0
            bar.update(1)
            preds[m] = pred
            if rows is None:
                scored = _scores(clean, pred, mask, opts.dynamic_range)
                patch_slice[m].append(where)
            elif bool(rows.any()):
                scored = _scores(clean[rows], pred[rows], None if mask is None else mask[rows], opts.dynamic_range)
                patch_slice[m].append(where[rows.cpu().numpy()])
            else:
                continue
            for k, v in scored.items():
                per_patch[m][k].append(v)
        for m in diffusion[1:]:
            spread[m].append(float((preds[m] - preds[diffusion[0]]).abs().mean()) * clean.shape[0])
        images = {"clean": clean.cpu().numpy()[:, 0], **{m: p.cpu().numpy()[:, 0] for m, p in preds.items()}}
        stitcher.add(coords, images, opts)
    bar.close()
    n = len(ds)
    res: dict[str, dict[str, float]] = {}
    per_slice: dict[str, dict[str, np.ndarray]] = {}
    for m in methods:
        row: dict[str, float] = {}
        at = np.concatenate(patch_slice[m]) if patch_slice[m] else np.zeros(0, dtype=np.int64)
        per_slice[m] = {k: _slice_means(np.concatenate(per_patch[m][k]) if per_patch[m][k] else np.zeros(0), at,
                                        len(slices)) for k in METRICS}
        for k in METRICS:
            row[k], row[f"{k}_std"] = _agg(per_patch[m][k])
            sv = np.asarray(stitcher.scores[m][k], dtype=np.float64)
            sv = sv[np.isfinite(sv)]
            row[f"slice_{k}"] = float(sv.mean()) if sv.size else float("nan")
        row["n_patches"] = int(at.size)
        row["n_slices"] = int(np.unique(at).size)
        row["sec_per_patch"] = seconds[m] / max(int(at.size), 1)
        res[m] = row
    ref_m = diffusion[0]
    spreads = {"reference": ref_m, **{m: sum(v) / max(n, 1) for m, v in spread.items()},
               "mae_of_reference": res[ref_m]["mae"]}
    return _TestScores(res, slices, per_slice, spreads, stitcher.kept)


def _slice_means(values: np.ndarray, at: np.ndarray, n: int) -> np.ndarray:
    """``[n]`` mean of the finite ``values`` (one per patch) of each slice index ``at``; NaN for a slice with none."""
    ok = np.isfinite(values)
    total = np.bincount(at[ok], weights=values[ok], minlength=n)
    count = np.bincount(at[ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ------------------------------------------------------------------------------------------------ verdicts
def _verdicts(sel: _Selection, test: _TestScores, opts: DenoiseEvalOptions) -> dict[str, Any]:
    """The quality bar at a trained level: choices and verdicts from ``sel`` (validation), margins on test.

    - ``best_ddim_le_50``: the DDIM with <= 50 steps of best validation PSNR; ``ddim_within_0.5db_of_ddpm``: the
      verdict on validation; ``test_ddpm_minus_best_ddim_psnr_db``: the same gap on test, for that DDIM.
    - ``model_method``: the diffusion method compared with the baselines (``ddpm``, else the best DDIM on validation).
    - ``best_classical``: noisy / NLM / BM3D with the best validation PSNR; ``margin_<metric>`` its paired test
      margin (model better > 0; mean over test slices, bootstrap CI over slices, or volumes when several), and the
      same against the supervised U-Net in ``margins["supervised"]``.
    """
    means = sel.means
    entry: dict[str, Any] = {"chosen_on": sel.chosen_on, "n_val_patches": sel.n_patches,
                             "val_psnr": {m: v["psnr"] for m, v in means.items()}}
    if not means:
        entry["note"] = "no validation patches: nothing chosen, no verdict"
        return entry
    res = test.results
    ddims = [m for m in _by_steps(list(means)) if int(m.split("_")[1]) <= DDIM_BUDGET]
    best_ddim = _best(means, ddims)
    if best_ddim is not None and "ddpm" in means:
        val_gap = means["ddpm"]["psnr"] - means[best_ddim]["psnr"]
        entry["best_ddim_le_50"] = best_ddim
        entry["val_ddpm_minus_best_ddim_psnr_db"] = val_gap
        entry["ddim_within_0.5db_of_ddpm"] = bool(val_gap <= DDIM_TOLERANCE_DB)
        entry["test_ddpm_minus_best_ddim_psnr_db"] = res["ddpm"]["psnr"] - res[best_ddim]["psnr"]
    model_m = "ddpm" if "ddpm" in means else _best(means, _by_steps(list(means)))
    classical = _best(means, [m for m in CLASSICAL if m in means])
    entry["model_method"] = model_m
    entry["best_classical"] = classical
    margins: dict[str, dict[str, Any]] = {}
    for name, base in (("best_classical", classical), ("supervised", "supervised" if "supervised" in means else None)):
        if model_m is None or base is None:
            continue
        margins[name] = {k: _paired_margin(test, model_m, base, k, opts) for k in METRICS}
    entry["margins"] = margins
    for k, m in margins.get("best_classical", {}).items():
        if "diff" in m:
            entry[f"margin_{k}"] = m["diff"]
            entry[f"margin_{k}_ci_low"], entry[f"margin_{k}_ci_high"] = m["diff_ci"]
            entry[f"beats_best_classical_{k}"] = bool(m["diff_ci"][0] > 0)
    return entry


def _paired_margin(test: _TestScores, model_m: str, base: str, metric: str, opts: DenoiseEvalOptions
                   ) -> dict[str, Any]:
    """Paired bootstrap CI of the mean per-slice margin of ``model_m`` over ``base`` in ``metric`` (model better > 0).

    A slice's value is the mean of the metric over its patches (the patch metrics of the tables; stitched slices
    would average the independent noise of overlapping patches). Only the test slices where both have a value
    count (a capped BM3D: its slices). Volumes are resampled with all their slices when the slices come from more
    than one volume.
    """
    a, b = test.per_slice[model_m][metric], test.per_slice[base][metric]
    ok = np.isfinite(a) & np.isfinite(b)
    out: dict[str, Any] = {"model": model_m, "baseline": base, "higher_is_better": HIGHER_IS_BETTER[metric],
                           "n_slices": int(ok.sum())}
    if ok.sum() < 2:
        out["note"] = "fewer than 2 test slices with values: no CI"
        return out
    vols = [test.slices[i][0] for i in np.flatnonzero(ok)]
    subjects = vols if len(set(vols)) > 1 else None
    x, y = (a[ok], b[ok]) if HIGHER_IS_BETTER[metric] else (b[ok], a[ok])
    out.update(paired_mean_difference(x, y, subjects, n_boot=opts.n_boot, seed=opts.seed))
    out["diff_ci"] = list(out["diff_ci"])
    out["by"] = "volume" if subjects is not None else "slice"
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
    cols = [*(c for k in METRICS for c in (k, f"{k}_std")), *(f"slice_{k}" for k in METRICS), "sec_per_patch"]
    w.writerow(["noise_std", "method", *cols, "n_patches", "n_slices"])
    for lkey, res in report["results"].items():
        for m, row in res.items():
            w.writerow([lkey, m, *(f"{row[c]:.6f}" for c in cols), row["n_patches"], row["n_slices"]])
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["noise_std", "method", "steps", "sec_per_patch", "n_patches", "psnr", "ssim", "vsi"])
    for r in report["speed"]:
        w.writerow([f"{r['noise_std']:g}", r["method"], "" if r["steps"] is None else r["steps"],
                    f"{r['sec_per_patch']:.6f}", r["n_patches"], f"{r['psnr']:.4f}", f"{r['ssim']:.5f}",
                    f"{r['vsi']:.5f}"])
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
    for k, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("mae", "MAE"), ("vsi", "VSI")):
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
    """Rich tables: metrics per noise level and method; speed of every method; the choices and paired margins."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    bm3d = report.get("bm3d", {})
    for lkey, res in report["results"].items():
        note = ""
        if "bm3d" in res and bm3d.get("n_slices", 0) < bm3d.get("of_slices", 0):
            note = f"; bm3d on {bm3d['n_slices']} of {bm3d['of_slices']} slices"
        if "nlm" in res:
            note = f"; NLM h chosen on {report['nlm'][lkey]['chosen_on']}{note}"
        table = Table(title=f"Denoising, noise std {lkey} ({report['n_patches']} test patches, mean ± std{note})")
        for col in ("method", "PSNR dB", "SSIM", "MAE", "VSI", "slice PSNR", "s / patch"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for m, r in res.items():
            table.add_row(m, f"{r['psnr']:.2f} ± {r['psnr_std']:.2f}", f"{r['ssim']:.4f} ± {r['ssim_std']:.4f}",
                          f"{r['mae']:.4f}", f"{r['vsi']:.4f}", f"{r['slice_psnr']:.2f}", f"{r['sec_per_patch']:.4f}")
        console.print(table)
    if not bm3d.get("status", "used").startswith("used"):
        console.print(f"bm3d: {bm3d['status']}")
    for lkey, res in bm3d.get("on_its_slices", {}).items():
        table = Table(title=f"Noise std {lkey} on the {bm3d['n_slices']} slices BM3D ran on (mean over slices of "
                            "the patch means)")
        for col in ("method", "PSNR dB", "SSIM", "MAE", "VSI"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for m, r in res.items():
            table.add_row(m, f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['mae']:.4f}", f"{r['vsi']:.4f}")
        console.print(table)
    ref = _reference_level(report)
    table = Table(title=f"Speed vs quality (noise std {ref}, batch {report['batch_size']}, {report['device']}, "
                        f"{report['torch_threads']} threads)")
    for col in ("method", "steps", "s / patch", "PSNR dB", "SSIM", "VSI"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in report["speed"]:
        if f"{r['noise_std']:g}" == ref:
            table.add_row(r["method"], "" if r["steps"] is None else str(r["steps"]), f"{r['sec_per_patch']:.4f}",
                          f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['vsi']:.4f}")
    console.print(table)
    for lkey, e in report["quality_bar"].items():
        on = e.get("chosen_on")
        if "note" in e:
            console.print(f"quality bar @ {lkey}: {e['note']}")
            continue
        if "best_ddim_le_50" in e:
            console.print(
                f"quality bar @ {lkey}: best DDIM <= {DDIM_BUDGET} steps (chosen on {on}, {e['n_val_patches']} "
                f"patches): {e['best_ddim_le_50']}; DDPM - it: {e['val_ddpm_minus_best_ddim_psnr_db']:+.2f} dB on "
                f"validation (within {DDIM_TOLERANCE_DB} dB: {e['ddim_within_0.5db_of_ddpm']}), "
                f"{e['test_ddpm_minus_best_ddim_psnr_db']:+.2f} dB on test")
        for name, ms in e.get("margins", {}).items():
            first = next(iter(ms.values()))
            if "diff" not in first:
                console.print(f"margin of {first['model']} over {first['baseline']} @ {lkey}: {first['note']}")
                continue
            what = f"the best classical baseline ({first['baseline']}, chosen on {on})" if name == "best_classical" \
                else first["baseline"]
            console.print(
                f"margin of {first['model']} over {what} @ {lkey}, paired over {first['n_slices']} test slices "
                f"(CI by {first['by']}): " + "; ".join(
                    f"{k.upper()} {m['diff']:+.4g} [{m['diff_ci'][0]:+.4g}, {m['diff_ci'][1]:+.4g}]"
                    for k, m in ms.items() if "diff" in m))
