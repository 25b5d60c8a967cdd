#!/usr/bin/env python
"""Write a synthetic ADNI task dir (seed 004 layout) with class-dependent atrophy phantoms.

    python scripts/make_synthetic_adni.py --root data/adni --n-per-class 4 --shape 64 64 64 --seed 0

writes ``<root>/<task>/{cn,emci,mci,lmci,ad}/<class><i>.nii.gz`` and ``<root>/<task>/dataset.json``
(``[{"image": "cn/cn0.nii.gz", "slice_label": 1}, ...]``). See ``meddiff.data.synthetic.mri``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from meddiff.data.synthetic.mri import write_synthetic_adni
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from meddiff.data.synthetic.mri import write_synthetic_adni

from meddiff.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset dir (the seed's --datasetDir)")
    p.add_argument("--task", default="2d_cfg_anom_det", help="task sub-dir (default: %(default)s)")
    p.add_argument("--n-per-class", type=int, default=4, help="volumes per class (default: %(default)s)")
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
    try:
        task_dir = write_synthetic_adni(
            a.root,
            a.n_per_class,
            tuple(a.shape),
            a.seed,
            task=a.task,
            bias_field=not a.no_bias_field,
            noise_std=a.noise_std,
            overwrite=a.overwrite,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {5 * a.n_per_class} volumes {tuple(a.shape)} and dataset.json to {task_dir} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
