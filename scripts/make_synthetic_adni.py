#!/usr/bin/env python
"""Write a synthetic ADNI task dir (seed 004 layout) with class-dependent atrophy phantoms.

    python scripts/make_synthetic_adni.py --root data/adni --n-per-class 4 --shape 64 64 64 --seed 0
    python scripts/make_synthetic_adni.py --root data/adni --task matched --atrophy matched \
        --n-per-class 60 5 5 5 60 --shape 32 32 32

writes ``<root>/<task>/{cn,emci,mci,lmci,ad}/<class><i>.nii.gz`` and ``<root>/<task>/dataset.json``
(``[{"image": "cn/cn0.nii.gz", "slice_label": 1}, ...]``). See ``meddiff.data.synthetic.mri``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from meddiff.data.synthetic.mri import ATROPHY, class_counts, write_synthetic_adni
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from meddiff.data.synthetic.mri import ATROPHY, class_counts, write_synthetic_adni

from meddiff.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset dir (the seed's --datasetDir)")
    p.add_argument("--task", default="2d_cfg_anom_det", help="task sub-dir (default: %(default)s)")
    p.add_argument(
        "--n-per-class",
        type=int,
        nargs="+",
        default=[4],
        metavar="N",
        help="volumes per class, or five counts for CN EMCI MCI LMCI AD (default: 4)",
    )
    p.add_argument(
        "--atrophy",
        choices=sorted(ATROPHY),
        default="global",
        help="; ".join(f"{k}: {v}" for k, v in ATROPHY.items()) + " (default: %(default)s)",
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[64, 64, 64],
        metavar=("X", "Y", "Z"),
        help="voxels per volume (default: 64 64 64; the seed's volumes are 128 128 128)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-std", type=float, default=0.02, help="Rician noise relative to white matter")
    p.add_argument("--no-bias-field", action="store_true", help="disable the smooth bias field")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset.json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    n_per_class = a.n_per_class[0] if len(a.n_per_class) == 1 else a.n_per_class
    try:
        n_total = sum(class_counts(n_per_class).values())
        task_dir = write_synthetic_adni(
            a.root,
            n_per_class,
            tuple(a.shape),
            a.seed,
            task=a.task,
            bias_field=not a.no_bias_field,
            noise_std=a.noise_std,
            atrophy=a.atrophy,
            overwrite=a.overwrite,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {n_total} volumes {tuple(a.shape)} and dataset.json to {task_dir} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
