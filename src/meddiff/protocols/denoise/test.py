"""The test pass of the denoise protocol: every method on the selected test patches, each patch read once per level.

Test patches are whole slices evenly spread over the test split (``max_patches``), independent of any result.
Metrics per patch (mean and std over patches) and per stitched slice (the patches of each slice put back with the
one stitcher of ``meddiff.patches``, overlaps averaged, pixels outside the covered region excluded); wall seconds
per patch of every method at the evaluation batch size. A capped BM3D (``bm3d_max_slices``) runs on the patches of
its slices only; elsewhere its estimate is NaN (not run) and its rows cover those slices.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from meddiff.errors import DataError
from meddiff.patches import stitch_canvases
from meddiff.protocols.denoise.interfaces import DenoiseData
from meddiff.protocols.denoise.methods import (
    MethodContext,
    agg,
    apply_method,
    batch_seed,
    mask_for,
    scores,
    sync,
)
from meddiff.protocols.denoise.options import METRICS, DenoiseEvalOptions, bm3d_status, is_diffusion
from meddiff.protocols.denoise.select import DenoiseSelection

Key = tuple[int, int]  # (volume, slice)


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
    groups: dict[Key, list[int]] = defaultdict(list)
    for i, (v, s) in enumerate(coords[:, :2]):
        groups[(int(v), int(s))].append(i)
    order = sorted(groups)
    sizes = np.asarray([len(groups[k]) for k in order])
    for k in range(min(len(order), max_patches // max(1, int(sizes.min()))), 0, -1):
        idx = ((np.arange(k) + 0.5) * len(order) / k).astype(int)
        if sizes[idx].sum() <= max_patches:
            return np.asarray(sorted(i for j in idx for i in groups[order[j]]), dtype=np.int64)
    return np.asarray(groups[order[len(order) // 2]][:max_patches], dtype=np.int64)


def spread_keys(keys: Sequence[Key], k: int | None) -> list[Key]:
    """At most ``k`` of ``keys`` (sorted), the middle one of each of ``k`` equal bins; ``None`` keeps all."""
    keys = sorted(keys)
    if k is None or k >= len(keys):
        return list(keys)
    return [keys[int(i)] for i in ((np.arange(k) + 0.5) * len(keys) / k).astype(int)]


class SliceStitcher:
    """Collects the patches of each selected slice; when a slice is complete, stitches and scores it.

    Memory holds only the slices still incomplete plus the ``keep`` slices written out as images. A method that did
    not run on a slice (a capped BM3D: NaN estimates) scores NaN there.
    """

    def __init__(self, coords: np.ndarray, slice_shapes: np.ndarray, keep: set[Key]):
        self.expected: dict[Key, int] = defaultdict(int)
        for v, s in coords[:, :2]:
            self.expected[(int(v), int(s))] += 1
        self.slice_shapes = slice_shapes
        self.keep = keep
        self.buf: dict[Key, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = defaultdict(list)
        self.kept: dict[Key, dict[str, np.ndarray]] = {}
        self.scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def add(self, coords: np.ndarray, images: dict[str, np.ndarray], opts: DenoiseEvalOptions) -> None:
        """Patches ``images[name] [B, P, P]`` at ``coords [B, 4]``; complete slices are stitched and scored."""
        for i, c in enumerate(coords):
            key = (int(c[0]), int(c[1]))
            self.buf[key].append((c, {k: v[i] for k, v in images.items()}))
            if len(self.buf[key]) == self.expected[key]:
                self._finish(key, opts)

    def _finish(self, key: Key, opts: DenoiseEvalOptions) -> None:
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
        fg = mask_for(clean, opts)
        mask = region if fg is None else (region & fg)
        covered = region[0, 0].numpy()
        for name, img in slices.items():
            if name == "clean":
                continue
            if not np.isfinite(img[covered]).all():  # the method did not run on this slice (a capped BM3D)
                for m in METRICS:
                    self.scores[name][m].append(float("nan"))
                continue
            s = scores(clean, torch.from_numpy(img)[None, None], mask, opts.dynamic_range)
            for m in METRICS:
                self.scores[name][m].append(float(s[m][0]))
        if key in self.keep:
            self.kept[key] = slices


@dataclass
class LevelScores:
    """The test pass at one noise level."""

    results: dict[str, dict[str, float]]  # method -> row of the metric table
    slices: list[Key]  # the selected test slices, in the order of ``per_slice``
    # method -> metric -> [n_slices]: the mean over each slice's patches (NaN: not run there / empty masks)
    per_slice: dict[str, dict[str, np.ndarray]]
    spread: dict[str, Any]
    kept: dict[Key, dict[str, np.ndarray]]


@dataclass
class TestRun:
    """The whole test pass: every level, with what it covered."""

    __test__ = False  # not a pytest test class

    data_path: str
    n_patches: int
    slice_keys: list[Key]
    bm3d: dict[str, Any]
    levels: dict[str, LevelScores] = field(default_factory=dict)  # level key -> its scores


def run_test_pass(datamodule: DenoiseData, sel: DenoiseSelection, opts: DenoiseEvalOptions, model: Any,
                  device: torch.device) -> TestRun:
    """Every method at every level on the selected test patches, with the choices of ``sel``.

    Raises:
        DataError: the test split is empty.
    """
    first = datamodule.noisy_dataset("test", noise_std=sel.levels[0])
    if len(first) == 0:
        raise DataError("the test split is empty; set data.test_fraction > 0 so some volumes are held out.")
    # which patches: whole slices, independent of any result (coordinates only)
    positions = select_slices(first.coords, opts.max_patches)
    sel_coords = first.coords[positions]
    slice_keys = sorted({(int(v), int(s)) for v, s in sel_coords[:, :2]})
    keep_idx = np.unique(np.linspace(0, len(slice_keys) - 1, min(opts.n_slices_out, len(slice_keys))).round())
    keep = {slice_keys[int(i)] for i in keep_idx} if opts.n_slices_out > 0 else set()
    bm3d_slices = spread_keys(slice_keys, opts.bm3d_max_slices) if sel.use_bm3d else []
    bm3d_info: dict[str, Any] = {"status": bm3d_status(opts, sel.use_bm3d)}
    if sel.use_bm3d:
        bm3d_info.update(sigma=opts.bm3d_sigma, profile=opts.bm3d_profile, n_slices=len(bm3d_slices),
                         of_slices=len(slice_keys), slices=[list(k) for k in bm3d_slices])
    run = TestRun(str(first.info.path), int(len(positions)), slice_keys, bm3d_info)
    for li, level in enumerate(sel.levels):
        lkey = f"{level:g}"
        ds = first if li == 0 else datamodule.noisy_dataset("test", noise_std=level)
        ctx = MethodContext(model, opts, level, li, device, sel.sup_model, sel.levels_chosen[lkey].h_factor)
        scored = _test_level(ds, ctx, sel.methods, positions, sel_coords, first.info.slice_shapes, keep,
                             set(bm3d_slices))
        run.levels[lkey] = scored
        if sel.use_bm3d and len(bm3d_slices) < len(slice_keys):
            # a capped BM3D is compared with every method on its own slices (mean over those slices)
            on = [scored.slices.index(k) for k in bm3d_slices]
            run.bm3d.setdefault("on_its_slices", {})[lkey] = {
                m: {k: agg([scored.per_slice[m][k][on]])[0] for k in METRICS} for m in sel.methods}
    return run


def _test_level(dataset: Any, ctx: MethodContext, methods: Sequence[str], positions: np.ndarray,
                sel_coords: np.ndarray, slice_shapes: np.ndarray, keep: set[Key], bm3d_slices: set[Key]
                ) -> LevelScores:
    """Every method on the selected test patches of ``dataset`` (at ``ctx.level``): each patch is read once."""
    from tqdm.auto import tqdm

    opts, device, level = ctx.opts, ctx.device, ctx.level
    ds = Subset(dataset, positions.tolist())
    loader = DataLoader(ds, batch_size=opts.batch_size, shuffle=False, num_workers=0)
    per_patch: dict[str, dict[str, list[np.ndarray]]] = {m: defaultdict(list) for m in methods}
    patch_slice: dict[str, list[np.ndarray]] = defaultdict(list)  # method -> slice index of each scored patch
    slices = sorted({(int(v), int(s)) for v, s in sel_coords[:, :2]})
    slice_index = {k: i for i, k in enumerate(slices)}
    spread: dict[str, list[float]] = defaultdict(list)  # mean |method - first diffusion method| per batch
    seconds: dict[str, float] = defaultdict(float)
    stitcher = SliceStitcher(sel_coords, slice_shapes, keep)
    bar = tqdm(total=len(loader) * len(methods), desc=f"denoise sigma={level:g}", unit="method x batch",
               leave=False, disable=not opts.progress)
    diffusion = [m for m in methods if is_diffusion(m)]
    for bi, batch in enumerate(loader):
        clean = batch["image"].to(device)
        cond = batch["cond"].to(device)
        coords = batch["coords"].numpy()
        where = np.asarray([slice_index[(int(v), int(s))] for v, s in coords[:, :2]], dtype=np.int64)
        mask = mask_for(clean, opts)
        preds: dict[str, torch.Tensor] = {}
        for m in methods:
            if opts.progress:
                bar.set_postfix(method=m)
            # a capped BM3D runs on the patches of its slices only; elsewhere its estimate is NaN (not run)
            rows = (torch.as_tensor([(int(v), int(s)) in bm3d_slices for v, s in coords[:, :2]], device=device)
                    if m == "bm3d" else None)
            sync(device)
            t0 = time.perf_counter()
            if rows is None:
                pred = apply_method(m, cond, ctx, batch_seed(ctx, bi))
            else:
                pred = torch.full_like(clean, float("nan"))
                if bool(rows.any()):
                    pred[rows] = apply_method(m, cond[rows], ctx, batch_seed(ctx, bi))
            sync(device)
            seconds[m] += time.perf_counter() - t0
            bar.update(1)
            preds[m] = pred
            if rows is None:
                scored = scores(clean, pred, mask, opts.dynamic_range)
                patch_slice[m].append(where)
            elif bool(rows.any()):
                scored = scores(clean[rows], pred[rows], None if mask is None else mask[rows], opts.dynamic_range)
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
        per_slice[m] = {k: slice_means(np.concatenate(per_patch[m][k]) if per_patch[m][k] else np.zeros(0), at,
                                       len(slices)) for k in METRICS}
        for k in METRICS:
            row[k], row[f"{k}_std"] = agg(per_patch[m][k])
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
    return LevelScores(res, slices, per_slice, spreads, stitcher.kept)


def slice_means(values: np.ndarray, at: np.ndarray, n: int) -> np.ndarray:
    """``[n]`` mean of the finite ``values`` (one per patch) of each slice index ``at``; NaN for a slice with none."""
    ok = np.isfinite(values)
    total = np.bincount(at[ok], weights=values[ok], minlength=n)
    count = np.bincount(at[ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
