"""Score new images with a trained checkpoint: ``meddiff-predict ckpt_path=... input=<folder|file> [output=<dir>]``.

For every readable image under ``input`` (PNG / JPEG / TIFF / BMP through :mod:`meddiff.data.formats.raster`, DICOM
through :mod:`meddiff.data.formats.dicom`, NIfTI volumes slice by slice through :mod:`meddiff.data.formats.nifti`)
the image is preprocessed as the checkpoint's data config says (``image_size``, intensities to ``[-1, 1]``: rasters
with ``data.intensity``; DICOM with ``data.windows`` and the brain crop of :func:`~meddiff.data.preprocess.ct_windows.
preprocess_hu`; NIfTI with the robust percentiles ``data.pct_lo`` / ``pct_hi`` and a square pad), the model gives its
healthy estimate (``model.reconstruct(batch)`` with its own ``model.sampling``) and the anomaly map and image score
come from the shared scorer with the model's configured scoring (``model.anomaly_val.scoring``; the DICOM brain mask
is the scoring region, other inputs have none). Each file is its own batch (NIfTI: its slices), so a file's result
does not depend on which other files are in the folder.

Outputs in ``output`` (default ``./predictions``), every file written atomically:
- ``maps/<name>_map.npy`` (float32 map ``[H, W]``) and ``maps/<name>_map.png`` (8-bit, ``map / map_max``: 2 for l1
  and ssim maps, 4 for l2), at the input's size for rasters, in the model's (cropped, resized) frame for DICOM;
  NIfTI input: ``maps/<name>_map.nii.gz``, the slices' maps at the volume's in-plane size with its (RAS-canonical)
  affine;
- ``scores.csv``: ``file, slice, score`` and, when the run chose thresholds, ``anomalous`` (image score >= the image
  threshold) and ``pixels_above_threshold`` (share of the map >= the validation-chosen pixel threshold, also drawn
  as ``maps/<name>_seg.png``);
- ``predict.json``: the checkpoint, the scoring, where each threshold came from (or why there is none), the skipped
  files with their reasons.
Thresholds come from the run's ``report.json`` (``<run_dir>/report.json`` for ``<run_dir>/checkpoints/x.ckpt``,
chosen on validation by the evaluation protocol); a pixel threshold is used only if the report's chosen map matches
the scoring used here. Unreadable files are skipped and listed at the end; a missing checkpoint or input and an input
without files are errors.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from meddiff.errors import ConfigError, DataError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: map value drawn as white in the PNGs, per map kind (the maps' ranges)
PNG_MAX = {"l1": 2.0, "l2": 4.0, "ssim": 2.0}
USAGE = ("usage: meddiff-predict ckpt_path=<file.ckpt> input=<folder|file> [output=<dir>] [device=cpu|cuda] "
         "[batch_size=16]")


@dataclass
class Slice2D:
    """One model input: ``image [C, S, S]`` in ``[-1, 1]``, an optional scoring ``region`` bool ``[1, S, S]``,
    and how its map goes back to the input's frame (``restore``: ``(H, W, pad_side)`` or None)."""

    image: torch.Tensor
    region: torch.Tensor | None = None
    restore: tuple[int, int, int] | None = None


@dataclass
class Loaded:
    """A read file: its slices; NIfTI volumes also carry their affine and in-plane shape."""

    kind: str
    slices: list[Slice2D]
    affine: np.ndarray | None = None


@dataclass
class Result:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _data_value(data_cfg: Any, key: str, default: Any) -> Any:
    value = data_cfg.get(key, default) if data_cfg is not None else default
    return default if value is None else value


def _match_channels(img: np.ndarray, channels: int, path: Path) -> np.ndarray:
    """``[H, W, C]`` -> ``[channels, H, W]``: RGB(A) to gray by the channel mean, gray repeated, alpha dropped."""
    c = img.shape[2]
    if c == 4:
        img, c = img[:, :, :3], 3
    if c != channels:
        if c == 3 and channels == 1:
            img = img.mean(axis=2, keepdims=True)
        elif c == 1:
            img = np.repeat(img, channels, axis=2)
        else:
            raise DataError(f"{path} has {c} channels; the model takes {channels}.")
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


def _resize(x: np.ndarray, size: tuple[int, int], binary: bool = False) -> np.ndarray:
    """``[C, H, W]`` -> ``[C, *size]`` (bilinear, antialiased as the data modules; a binary mask thresholded)."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
    t = F.interpolate(torch.from_numpy(np.asarray(x, np.float32))[None], size=size, mode="bilinear",
                      align_corners=False, antialias=True)[0].numpy()
    return t > 0.5 if binary else t


def read_input(path: Path, data_cfg: Any, channels: int) -> Loaded:
    """Read and preprocess one file with the existing readers; DataError when it is not a readable image."""
    from meddiff.data.formats.nifti import is_nifti

    size = data_cfg.get("image_size") if data_cfg is not None else None
    name = path.name.lower()
    if is_nifti(name):
        return _read_nifti(path, data_cfg, channels, size)
    if name.endswith(RASTER_SUFFIXES):
        return _read_raster(path, data_cfg, channels, size)
    return _read_dicom(path, data_cfg, channels, size)


def _read_raster(path: Path, data_cfg: Any, channels: int, size: int | None) -> Loaded:
    from meddiff.data.formats.raster import read_image
    from meddiff.data.preprocess.intensity import scale_intensity

    arr = read_image(path)
    x = scale_intensity(arr, _data_value(data_cfg, "intensity", "auto"),
                        _data_value(data_cfg, "percentiles", (1.0, 99.0)))
    x = _match_channels(x, channels, path)
    h, w = x.shape[1:]
    if size:
        x = _resize(x, (int(size), int(size)))
    return Loaded("raster", [Slice2D(torch.from_numpy(np.clip(x, -1, 1)), restore=(h, w, 0))])


def _read_dicom(path: Path, data_cfg: Any, channels: int, size: int | None) -> Loaded:
    from meddiff.data.formats.dicom import read_dicom
    from meddiff.data.preprocess.ct_windows import preprocess_hu

    try:
        ct = read_dicom(path)
    except DataError as e:
        raise DataError(f"not a PNG/JPEG/TIFF/BMP, NIfTI or readable DICOM file ({e})") from e
    windows = _data_value(data_cfg, "windows", ["brain"])
    side = int(size) if size else max(ct.shape)
    out = preprocess_hu(ct.hu, windows, side, crop_to_brain=bool(_data_value(data_cfg, "crop_to_brain", True)))
    img = _match_channels(out["image"].transpose(1, 2, 0), channels, path)
    return Loaded("dicom", [Slice2D(torch.from_numpy(img), torch.from_numpy(out["brain_mask"]))])


def _read_nifti(path: Path, data_cfg: Any, channels: int, size: int | None) -> Loaded:
    import nibabel as nib

    from meddiff.data.formats.nifti import load_volume, robust_normalise

    try:
        ndim = len([s for s in nib.load(str(path)).shape if s != 1])
    except Exception as e:  # corrupt header: what the reader would say
        raise DataError(f"cannot read {path}: {e}") from e
    if ndim == 2:  # a 2D slice stored as NIfTI: the raster reader's job
        return _read_raster(path, data_cfg, channels, size)
    vol, affine = load_volume(path, canonical=True, frame=int(_data_value(data_cfg, "frame", 0)))
    vol = robust_normalise(vol, lower=float(_data_value(data_cfg, "pct_lo", 1.0)),
                           upper=float(_data_value(data_cfg, "pct_hi", 99.0)))
    h, w = vol.shape[:2]
    side = max(h, w)
    out_size = int(size) if size else side
    slices = []
    for z in range(vol.shape[2]):  # axial slices of the canonical (RAS) volume
        sq = np.full((1, side, side), -1.0, dtype=np.float32)  # padded to a square as the slice caches do
        r0, c0 = (side - h) // 2, (side - w) // 2
        sq[0, r0:r0 + h, c0:c0 + w] = vol[:, :, z]
        img = _match_channels(_resize(sq, (out_size, out_size)).transpose(1, 2, 0), channels, path)
        slices.append(Slice2D(torch.from_numpy(np.clip(img, -1, 1)), restore=(h, w, side)))
    return Loaded("nifti", slices, affine=affine)


def _restore(m: np.ndarray, restore: tuple[int, int, int] | None) -> np.ndarray:
    """A map ``[S, S]`` back to the input's frame (undo resize and square pad); DICOM: kept in the model's frame."""
    if restore is None:
        return m
    h, w, side = restore
    if not side:
        return _resize(m[None], (h, w))[0]
    sq = _resize(m[None], (side, side))[0]
    r0, c0 = (side - h) // 2, (side - w) // 2
    return sq[r0:r0 + h, c0:c0 + w]


def run_thresholds(ckpt_path: Path, scoring: Any, sampling: Any = None) -> dict[str, Any]:
    """The thresholds the run chose on validation (``<run_dir>/report.json``), with where they came from.

    A threshold is used only for the maps / scores it was chosen for: the image threshold when the report's chosen
    scoring is the scoring used here, the pixel threshold when its map (kind, filter, erosion) is; both only when the
    report's reconstruction depth (``reconstruction.t_start``) is the model's own.
    """
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    report_path = run_dir / "report.json"
    out: dict[str, Any] = {"report": str(report_path), "image_threshold": None, "pixel_threshold": None}
    if not report_path.is_file():
        out["note"] = f"no {report_path}: no validation-chosen threshold, so no 'anomalous' column"
        return out
    try:
        report = json.loads(report_path.read_text())
        sel = report.get("selection") or {}
        # a report written before a scoring field existed (e.g. ``sign``) holds that field at its default
        chosen = {**type(scoring)().as_dict(), **report["scoring"]} if report.get("scoring") else {}
        depth = (report.get("reconstruction") or {}).get("t_start")
    except (OSError, ValueError, AttributeError, TypeError) as e:
        out["note"] = f"{report_path} is unreadable ({e}); no thresholds used"
        return out
    own_depth = getattr(sampling, "t_start", None)
    if depth is not None and own_depth is not None and depth != own_depth:
        out["note"] = (f"{report_path} chose reconstruction depth t_start={depth}, the model samples with "
                       f"t_start={own_depth}: its thresholds do not apply; no 'anomalous' column")
        return out
    if sel.get("image_threshold") is None:
        out["note"] = (f"{report_path} holds no image-level threshold (selection.image_threshold): no 'anomalous' "
                       "column")
    elif chosen != scoring.as_dict():
        out["note"] = (f"the report's image threshold is for the scoring {chosen}, not the model's configured "
                       f"{scoring.as_dict()} used here; no 'anomalous' column")
    else:
        out["image_threshold"] = float(sel["image_threshold"])
    pix_thr = sel.get("pixel_threshold")
    same_map = all(chosen.get(k) == getattr(scoring, k) for k in ("map", "sign", "median_size", "erode_iterations"))
    if pix_thr is not None and same_map:
        out["pixel_threshold"] = float(pix_thr)
    elif pix_thr is not None:
        out["pixel_note"] = (f"the report's pixel threshold is for the map {chosen}, not the model's configured "
                             "scoring used here; not applied")
    return out


def _png(path: Path, m: np.ndarray, vmax: float) -> None:
    from PIL import Image

    from meddiff.utils.io import atomic_write

    img = Image.fromarray((np.clip(m / vmax, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _stem(rel: Path, used: set[str]) -> str:
    """Output name of an input (its relative path without the image suffix; ``_<ext>`` added on a clash)."""
    from meddiff.data.formats.nifti import is_nifti, strip_nifti_suffix

    base = strip_nifti_suffix(rel.name) if is_nifti(rel.name) else Path(rel.name).stem
    stem = str(rel.parent / base)
    if stem in used:
        stem = str(rel.parent / rel.name.replace(".", "_"))
    used.add(stem)
    return stem


def list_inputs(inp: Path, output: Path) -> list[Path]:
    """The files under ``inp`` (a file, or a folder scanned recursively; hidden files and ``output`` left out)."""
    if not inp.exists():
        raise ConfigError(f"input={inp} does not exist; give an image file or a folder of images.")
    if inp.is_file():
        return [inp]
    out = output.resolve()
    files = sorted(p for p in inp.rglob("*") if p.is_file() and out not in p.resolve().parents
                   and not any(s.startswith(".") for s in p.relative_to(inp).parts))
    if not files:
        raise DataError(f"input={inp} holds no files; put PNG/JPEG/TIFF/BMP, DICOM or NIfTI images in it.")
    return files


@torch.no_grad()
def predict(ckpt_path: str | Path, input: str | Path, output: str | Path = "predictions",  # noqa: A002
            device: str | None = None, batch_size: int = 16) -> Result:
    """Score every readable image under ``input`` with the checkpoint; write maps, ``scores.csv``, ``predict.json``."""
    from meddiff.anomaly.scoring import score_batch
    from meddiff.eval import load_from_checkpoint
    from meddiff.utils.io import atomic_save_npy, atomic_write_bytes, atomic_write_json, atomic_write_text

    ckpt_path, inp, output = Path(ckpt_path).expanduser(), Path(input).expanduser(), Path(output).expanduser()
    files = list_inputs(inp, output)
    model, cfg = load_from_checkpoint(ckpt_path)
    validation = getattr(model, "anomaly_val", None)
    if validation is None or getattr(model, "conditioning_keys", ()):
        raise ConfigError(f"{ckpt_path} holds a {type(model).__name__} (protocol "
                          f"{getattr(model, 'eval_protocol', '?')}): meddiff-predict scores anomalies with models that "
                          "reconstruct an image alone and carry an anomaly scorer (model.anomaly_val).")
    scoring = validation.scoring
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    net_cfg = cfg.get("net") or cfg.model.get("net") or {}
    channels = int(net_cfg.get("in_channels", 1))
    thr = run_thresholds(ckpt_path, scoring, getattr(model, "sampling", None))
    vmax = PNG_MAX.get(scoring.map, 2.0)
    res = Result(info={"ckpt_path": str(ckpt_path), "input": str(inp), "scoring": scoring.as_dict(),
                       "png_max": vmax, "thresholds": thr, "device": str(dev), "output": str(output)})
    used: set[str] = set()
    for path in tqdm(files, desc="predict", unit="file"):
        rel = path.relative_to(inp) if path != inp else Path(path.name)
        name = str(rel)
        try:
            loaded = read_input(path, cfg.get("data"), channels)
            maps, scores = [], []
            for i in range(0, len(loaded.slices), batch_size):
                chunk = loaded.slices[i:i + batch_size]
                x = torch.stack([s.image for s in chunk]).to(dev)
                region = torch.stack([s.region for s in chunk]).to(dev) if chunk[0].region is not None else None
                healthy = model.reconstruct({"image": x}).float()
                out = score_batch(x, healthy, region, scoring)
                maps.append(out["map"][:, 0].cpu().numpy())
                scores.append(out["score"].cpu().numpy())
        except Exception as e:  # one bad file never stops the run: listed at the end
            res.skipped.append((name, f"{type(e).__name__}: {e}"))
            continue
        m_all, s_all = np.concatenate(maps), np.concatenate(scores)
        stem = output / "maps" / _stem(rel, used)
        restored = [_restore(m, s.restore) for m, s in zip(m_all, loaded.slices)]
        if loaded.kind == "nifti":
            import nibabel as nib

            vol = np.stack(restored, axis=2).astype(np.float32)
            data = nib.Nifti1Image(vol, loaded.affine).to_bytes()
            atomic_write_bytes(stem.parent / f"{stem.name}_map.nii.gz", gzip.compress(data))
        else:
            atomic_save_npy(stem.parent / f"{stem.name}_map.npy", restored[0].astype(np.float32))
            _png(stem.parent / f"{stem.name}_map.png", restored[0], vmax)
            if thr["pixel_threshold"] is not None:
                _png(stem.parent / f"{stem.name}_seg.png", (restored[0] >= thr["pixel_threshold"]) * 1.0, 1.0)
        for k, score in enumerate(s_all):
            row: dict[str, Any] = {"file": name, "slice": k if loaded.kind == "nifti" else "",
                                   "score": float(score)}
            if thr["image_threshold"] is not None:
                row["anomalous"] = int(score >= thr["image_threshold"])
            if thr["pixel_threshold"] is not None:
                row["pixels_above_threshold"] = float((m_all[k] >= thr["pixel_threshold"]).mean())
            res.rows.append(row)
    buf = io.StringIO()
    cols = ["file", "slice", "score"] + [c for c in ("anomalous", "pixels_above_threshold")
                                          if res.rows and c in res.rows[0]]
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(res.rows)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "scores.csv", buf.getvalue())
    res.info["skipped"] = [{"file": f, "reason": r} for f, r in res.skipped]
    res.info["n_scored_files"] = len(files) - len(res.skipped)
    atomic_write_json(output / "predict.json", res.info)
    return res


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` arguments (as the other meddiff commands take them)."""
    known = {"ckpt_path": str, "input": str, "output": str, "device": str, "batch_size": int}
    args: dict[str, Any] = {}
    for a in argv:
        key, sep, value = a.lstrip("+").partition("=")
        if not sep or key not in known:
            raise ConfigError(f"unknown argument {a!r}; {USAGE}")
        try:
            args[key] = known[key](value)
        except ValueError as e:
            raise ConfigError(f"{key}={value!r} is not a valid {known[key].__name__}; {USAGE}") from e
    missing = [k for k in ("ckpt_path", "input") if not args.get(k)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}; {USAGE}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + (__doc__ or ""))
        return 0
    try:
        res = predict(**parse_args(argv))
    except (ConfigError, DataError) as e:
        print(f"meddiff-predict: error: {e}", file=sys.stderr)
        return 2
    out = Path(res.info["output"])
    n_files = res.info["n_scored_files"]
    print(f"scored {len(res.rows)} image(s) from {n_files} file(s); scores: {out / 'scores.csv'}, maps: {out / 'maps'}")
    thr = res.info["thresholds"]
    for key in ("note", "pixel_note"):
        if key in thr:
            print(f"threshold: {thr[key]}")
    if res.skipped:
        print(f"skipped {len(res.skipped)} unreadable file(s):")
        for f, reason in res.skipped:
            print(f"  {f}: {reason}")
    return 0 if n_files else 1


if __name__ == "__main__":
    sys.exit(main())
