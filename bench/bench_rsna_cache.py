"""RSNA preprocessing cache: build throughput, and loading from the cache vs. decoding DICOMs on the fly.

On a synthetic RSNA-format dataset (real DICOM files written with pydicom), measured in one run:
1. cache build throughput (slices/s) in one process and with a pool of ``--workers`` processes, and the cost of
   reopening a built cache (which stamps every source file: size + mtime_ns + a hash of its first and last 8 kB,
   so changed files are decoded again), and the cost of stamping alone;
2. data-loading throughput through a DataLoader of the cached dataset vs. a dataset that decodes the DICOMs
   and runs the same preprocessing per item (what a naive pipeline does every epoch), interleaved rounds;
   the ratio is printed.

    PYTHONPATH=src python bench/bench_rsna_cache.py [--size 256 --patients 25 --slices 8 --image-size 128]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved  # noqa: E402

from meddiff.data.modules.rsna_ct import CACHE_NAME, RSNACTDataModule, RSNADataset, RSNADicomDataset  # noqa: E402
from meddiff.data.preprocess.cache import build_cache  # noqa: E402
from meddiff.data.synthetic.ct import write_synthetic_rsna  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="synthetic DICOM side in px (real RSNA: 512)")
    p.add_argument("--patients", type=int, default=25)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128, help="cached image side")
    p.add_argument("--windows", nargs="+", default=["brain", "subdural", "bone"])
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="cache build processes")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers for both loaders")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="work dir (default: a temporary dir, removed afterwards)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    # DataLoader workers run torch with one thread; do the same in this process so both loaders (and the
    # in-process build) are measured alike and do not fight over cores with intra-op threads.
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]

    tmp = tempfile.TemporaryDirectory() if a.dir is None else None
    work = Path(a.dir or tmp.name)
    root = work / "rsna"
    t0 = time.perf_counter()
    if not (root / "stage_2_train.csv").exists():
        write_synthetic_rsna(root, a.patients, a.slices, a.size, 0.5, seed=0)
    n = a.patients * a.slices
    print(f"synthetic data: {n} DICOMs {a.size}x{a.size} written in {time.perf_counter() - t0:.1f}s -> {root}")

    dm = RSNACTDataModule(root, cache_dir=work / "cache_unused", image_size=a.image_size, windows=a.windows,
                          batch_size=a.batch_size, num_workers=a.loader_workers, progress=False)
    records, pre, settings = dm.records(), dm.preprocessor(), dm.cache_settings()
    t0 = time.perf_counter()
    stamps = dm.source_stamps()
    stamping = time.perf_counter() - t0

    build = {}
    for workers in sorted({0, a.workers}):
        t0 = time.perf_counter()
        cache = build_cache(records, pre, work / f"cache_w{workers}", CACHE_NAME, settings, chunk_size=16,
                            num_workers=workers, progress=False, stamps=stamps)
        build[workers] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_cache(records, pre, work / f"cache_w{a.workers}", CACHE_NAME, settings, chunk_size=16, progress=False,
                stamps=dm.source_stamps())
    reopen = time.perf_counter() - t0

    ok = cache.ok_index
    ok_ids = set(ok["id"])
    cached = RSNADataset(cache, ok)
    fly = RSNADicomDataset([r for r in records if r["id"] in ok_ids], pre)

    def run(ds) -> None:
        for _ in DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=a.loader_workers):
            pass

    times = interleaved({"cache": lambda: run(cached), "dicom": lambda: run(fly)}, rounds=a.rounds, warmup=1)
    m = len(cached)
    print(f"\nload average at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} (noisy timings when busy)")
    print(f"slices: {n} records, {m} cached ({len(cache.skipped)} skipped), windows={a.windows}, "
          f"{a.size}px -> {a.image_size}px, cpu_count={os.cpu_count()}")
    print(f"{'measure':<44}{'slices/s':>12}")
    for workers, sec in build.items():
        label = "cache build, in-process" if workers == 0 else f"cache build, pool of {workers} processes"
        print(f"{label:<44}{n / sec:>12.1f}")
    reopen_s = f"{reopen:.3f}s"
    load_label = f"load from cache (DataLoader, {a.loader_workers} workers)"
    print(f"{'cache reopen (stamp sources, no decoding)':<44}{reopen_s:>12}")
    stamp_s = f"{1e3 * stamping / max(1, n):.3f}ms"
    print(f"{'source stamp per record (stat + 2 x 8 kB hash)':<44}{stamp_s:>12}")
    print(f"{load_label:<44}{m / times['cache']:>12.1f}")
    print(f"{'decode DICOM on the fly (same preprocessing)':<44}{m / times['dicom']:>12.1f}")
    print(f"ratio cache / on-the-fly loading: {times['dicom'] / times['cache']:.1f}x")
    if 0 in build and a.workers in build and a.workers != 0:
        print(f"ratio pool / in-process cache build: {build[0] / build[a.workers]:.2f}x")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
