"""Files of the denoise report beyond ``report.json`` and ``metrics.csv`` (the skeleton's: ``metric,value`` rows of
the summary): ``results.csv`` (one row per level and method),
``speed.csv``, ``{psnr,ssim,mae,vsi}_vs_noise.png``, ``denoise_examples.png`` and, for the kept slices of every
level, ``images/sigma<level>/`` TIFF hyperstacks (one per slice, pages = clean, noisy, each method; ImageJ labels;
a method that did not run on a slice, e.g. a capped BM3D, is NaN there) and NIfTI stacks (one per method and
volume, ``[H, W, slices]``). All written atomically.
"""

from __future__ import annotations

import gzip
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.protocols.common import write_csv
from meddiff.protocols.denoise.options import METRICS
from meddiff.utils.io import atomic_write, atomic_write_bytes

Kept = dict[str, dict[tuple[int, int], dict[str, np.ndarray]]]  # level -> (volume, slice) -> name -> [H, W]


def write_results_table(report: dict[str, Any], out_dir: Path) -> None:
    """``results.csv``: one row per level and method (``noise_std,method,<metric>,<metric>_std,...,slice_<metric>,
    ...,sec_per_patch,n_patches,n_slices``), with the common CSV writer (``meddiff.protocols.common.write_csv``)."""
    cols = [*(c for k in METRICS for c in (k, f"{k}_std")), *(f"slice_{k}" for k in METRICS), "sec_per_patch"]
    rows = [{"noise_std": lkey, "method": m, **row} for lkey, res in report["results"].items()
            for m, row in res.items()]
    write_csv(out_dir / "results.csv", rows, ["noise_std", "method", *cols, "n_patches", "n_slices"])


def write_speed_table(report: dict[str, Any], out_dir: Path) -> None:
    """``speed.csv``: seconds per patch and quality of every method at every level."""
    speed = [{**r, "noise_std": f"{r['noise_std']:g}", "steps": "" if r["steps"] is None else r["steps"]}
             for r in report["speed"]]
    write_csv(out_dir / "speed.csv", speed,
              ["noise_std", "method", "steps", "sec_per_patch", "n_patches", "psnr", "ssim", "vsi"])


def reference_level(report: dict[str, Any]) -> str:
    """The level the headline tables use: the first evaluated level the model was trained on (else the first)."""
    return next(iter(report["quality_bar"]), f"{report['noise_levels'][0]:g}")


def write_figures(report: dict[str, Any], kept: Kept, names: list[str], out_dir: Path) -> None:
    """Metric-vs-noise curves of every method and the example grid at the reference level."""
    from meddiff.viz.figures import save_metric_curves

    levels = report["noise_levels"]
    for k, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("mae", "MAE"), ("vsi", "VSI")):
        series = {m: [report["results"][f"{s:g}"][m][k] for s in levels] for m in report["methods"]}
        save_metric_curves(out_dir / f"{k}_vs_noise.png", levels, series, "noise std ([-1, 1] units)", label,
                           title=f"{label} vs noise level (test patches, mean)")
    ref = reference_level(report)
    if ref in kept and kept[ref]:
        _save_examples(out_dir / "denoise_examples.png", kept[ref], names, report["results"][ref], ref)


def write_images(kept: Kept, names: list[str], out_dir: Path, tiff: bool, nifti: bool) -> None:
    """TIFF hyperstacks per slice and NIfTI stacks per method/volume of the kept slices, per noise level."""
    for lkey, slices in kept.items():
        folder = out_dir / "images" / f"sigma{lkey}"
        if tiff:
            import tifffile

            for (v, s), imgs in slices.items():
                stack = np.stack([imgs[n] for n in names]).astype(np.float32)
                atomic_write(folder / f"vol{v:03d}_slice{s:03d}.tif",
                             lambda p, stack=stack: tifffile.imwrite(p, stack, imagej=True,
                                                                     metadata={"Labels": names, "axes": "ZYX"}))
        if nifti:
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
