#!/usr/bin/env python
"""Convert NIfTI volumes into one HDF5 patch file for the denoising DataModule.

Arguments are ``key=value`` (Hydra style) or ``--key value`` / ``--key=value``::

    python scripts/prepare_hdf5.py input=data/ct_nifti name=ct image_size=64 stride=32
    python scripts/prepare_hdf5.py --input a.nii.gz --input b.nii.gz --name mr --targetdir data
    python scripts/prepare_hdf5.py synthetic=8 name=demo          # brain phantoms first (no data needed)

Prints the output path and a summary (volumes, patches, skipped volumes with reasons). Skipped volumes and
removed temporary files of killed earlier runs are logged as they happen (stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import meddiff  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r} is not a boolean (true/false)")


def _pair(s: str) -> tuple[float, float]:
    parts = s.strip("()[] ").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{s!r} must be two comma-separated numbers, e.g. 1,99")
    return float(parts[0]), float(parts[1])


def _intensity(s: str) -> str | tuple[float, float]:
    return s if s.strip().lower() in ("robust", "minmax", "none") else _pair(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Cut NIfTI volumes into 2D patches in one HDF5 file (<targetdir>/<name>_p<size>_s<stride>.h5).",
        epilog="Every option can also be written key=value, e.g. input=data/nifti name=ct image_size=64.",
    )
    a = p.add_argument
    a(
        "--input",
        "--inputpath",
        dest="input",
        action="append",
        help="NIfTI file or folder (recursive); repeat or comma-separate for several",
    )
    a("--name", "--datasetname", dest="name", required=True, help="dataset name (file prefix)")
    a(
        "--targetdir",
        "--out",
        "--output",
        dest="targetdir",
        default="data",
        help="output folder (default: data)",
    )
    a("--image_size", "--image-size", dest="image_size", type=int, default=64, help="patch size in pixels")
    a("--stride", type=int, default=32, help="grid step (<= image_size)")
    a("--axis", type=int, default=2, choices=(0, 1, 2), help="slicing axis of the RAS volume (2 = axial)")
    a(
        "--min_foreground",
        "--min-foreground",
        dest="min_foreground",
        type=float,
        default=0.0,
        help="drop patches with a smaller foreground fraction",
    )
    a(
        "--foreground_threshold",
        "--foreground-threshold",
        dest="foreground_threshold",
        type=float,
        default=-0.95,
        help="normalised value above which a pixel is foreground",
    )
    a(
        "--intensity",
        type=_intensity,
        default="robust",
        help="robust | minmax | none | low,high (fixed window)",
    )
    a(
        "--percentiles",
        type=_pair,
        default=(1.0, 99.0),
        help="lower,upper percentiles for robust (default 1,99)",
    )
    a("--dtype", choices=("float32", "float16"), default="float32", help="storage type of the patches")
    a("--canonical", type=_bool, default=True, help="reorient to RAS first (default true)")
    a("--frame", type=int, default=0, help="frame of 4D inputs")
    a(
        "--nan_policy",
        "--nan-policy",
        dest="nan_policy",
        choices=("raise", "zero"),
        default="raise",
        help="NaN voxels: skip the volume (raise) or replace with 0",
    )
    a("--compression", default=None, help="h5py compression: gzip | lzf (default none)")
    a("--filename", default=None, help="override the output file name")
    a("--progress", type=_bool, default=True, help="show a progress bar")
    a(
        "--skip_bad",
        "--skip-bad",
        dest="skip_bad",
        type=_bool,
        default=True,
        help="skip (and list) volumes that fail to load, e.g. truncated files (default true); false: stop there",
    )
    a(
        "--synthetic",
        type=int,
        default=0,
        help="write N brain-like phantom volumes to <targetdir>/<name>_nifti first and use them as input",
    )
    a(
        "--synthetic_shape",
        "--synthetic-shape",
        dest="synthetic_shape",
        default="96,96,24",
        help="X,Y,Z of the phantoms",
    )
    a("--seed", type=int, default=0, help="seed of the phantoms")
    return p


def normalise_argv(argv: list[str]) -> list[str]:
    """Turn ``key=value`` tokens into ``--key=value`` (tokens already starting with ``-`` are kept)."""
    out = []
    for tok in argv:
        if not tok.startswith("-") and "=" in tok:
            key, val = tok.split("=", 1)
            out.append(f"--{key.strip()}={val}")
        else:
            out.append(tok)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit code (0 ok, 1 data/config error, 2 usage error)."""
    args = build_parser().parse_args(normalise_argv(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # no-op if configured

    from meddiff.data.formats.patch_hdf5 import inspect_hdf5
    from meddiff.data.preprocess.nifti_patches import save_as_hdf5
    from meddiff.data.synthetic.mr_heads import write_synthetic_volumes
    from meddiff.errors import ConfigError, DataError

    inputs: list[str] = [s for item in (args.input or []) for s in item.split(",") if s]
    try:
        if args.synthetic:
            shape = tuple(int(v) for v in str(args.synthetic_shape).strip("()[] ").split(","))
            folder = Path(args.targetdir) / f"{args.name}_nifti"
            written = write_synthetic_volumes(folder, n=args.synthetic, shape=shape, seed=args.seed)  # type: ignore[arg-type]
            print(f"wrote {len(written)} phantom volumes to {folder}")
            inputs += [str(w) for w in written]
        if not inputs:
            print("error: give input=<NIfTI file or folder> (or synthetic=N)", file=sys.stderr)
            return 2
        out = save_as_hdf5(
            inputs,
            args.name,
            args.targetdir,
            image_size=args.image_size,
            stride=args.stride,
            axis=args.axis,
            min_foreground=args.min_foreground,
            intensity=args.intensity,
            percentiles=args.percentiles,
            foreground_threshold=args.foreground_threshold,
            dtype=args.dtype,
            canonical=args.canonical,
            frame=args.frame,
            nan_policy=args.nan_policy,
            compression=args.compression,
            filename=args.filename,
            progress=args.progress,
            skip_bad=args.skip_bad,
        )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    print(inspect_hdf5(out).summary())
    print(f"size on disk: {out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
