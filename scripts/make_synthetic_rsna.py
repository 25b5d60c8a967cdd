#!/usr/bin/env python
"""Write a synthetic RSNA Intracranial Hemorrhage dataset (Kaggle layout) with head-CT phantoms.

    python scripts/make_synthetic_rsna.py --root data/rsna --patients 24 --slices 8 --size 128 --seed 0

writes ``<root>/stage_2_train/ID_<hex>.dcm`` (real DICOMs with varied headers: 16-bit signed, 12-bit
unsigned, the 12-bit intercept quirk, multi-valued window tags, one non-square image, one truncated file),
``<root>/stage_2_train.csv`` (Kaggle ``ID,Label`` with a few duplicate rows), ``<root>/masks/ID_<hex>.png``
(uint8 hemorrhage label maps, 0 = none, 1..5 = epidural, intraparenchymal, intraventricular, subarachnoid,
subdural) and ``<root>/synthetic_info.json``. See ``meddiff.data.synthetic.ct``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from meddiff.data.synthetic.ct import write_synthetic_rsna
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from meddiff.data.synthetic.ct import write_synthetic_rsna

from meddiff.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="output dataset dir (the RSNA data root)")
    p.add_argument("--patients", type=int, default=24, help="synthetic patients (default: %(default)s)")
    p.add_argument("--slices", type=int, default=8, help="slices per patient (default: %(default)s)")
    p.add_argument("--size", type=int, default=128,
                   help="image side in px (default: %(default)s; real RSNA images are 512)")
    p.add_argument("--hemorrhage-fraction", type=float, default=0.5,
                   help="share of patients with a hemorrhage (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-truncated", action="store_true", help="do not write the one truncated file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --root")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        table = write_synthetic_rsna(a.root, a.patients, a.slices, a.size, a.hemorrhage_fraction, a.seed,
                                     truncate=not a.no_truncated, overwrite=a.overwrite)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_pos = int(table["any"].sum())
    print(f"wrote {len(table)} slices ({n_pos} with hemorrhage) of {a.patients} patients, {a.size} px, to "
          f"{a.root} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
