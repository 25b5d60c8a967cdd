"""Cost of the BM3D baseline per 64 px slice, beside non-local means (the denoise protocol's other classical baseline).

Wall times depend on the machine and its load, so the result to quote is the ratio BM3D / NLM from one run (both
timed in alternation on the same slices); the absolute seconds are printed with the load average and thread count.

    OMP_NUM_THREADS=1 python bench/bench_bm3d.py [--slices 6 --size 64 --sigma 0.1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from meddiff.metrics.denoisers import available, bm3d_denoise


def _slices(n: int, size: int, sigma: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real MR slice (pydicom's MR_small, 64 px) resized to ``size``, shifted copies, plus Gaussian noise."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    a = dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    a = torch.from_numpy((a - a.min()) / (a.max() - a.min()) * 2 - 1)[None, None]
    a = torch.nn.functional.interpolate(a, size=(size, size), mode="bilinear", antialias=True)[0, 0].numpy()
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        clean = np.roll(a, shift=(3 * i, 5 * i), axis=(0, 1)).astype(np.float64)
        out.append((clean, clean + sigma * rng.normal(size=clean.shape)))
    return out


def _nlm(noisy: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--slices", type=int, default=6)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sigma", type=float, default=0.1)
    args = p.parse_args()
    if not available():
        print("BM3D is an optional extra and is not installed here: pip install meddiff[denoise]. Nothing to time.")
        return
    data = _slices(args.slices, args.size, args.sigma)
    bm3d_denoise(data[0][1], args.sigma)  # warm-up (imports, FFT plans)
    times: dict[str, list[float]] = {"bm3d": [], "nlm": []}
    psnr: dict[str, list[float]] = {"noisy": [], "bm3d": [], "nlm": []}
    for clean, noisy in data:
        for name, fn in (("bm3d", bm3d_denoise), ("nlm", _nlm)):
            t0 = time.perf_counter()
            est = fn(noisy, args.sigma)
            times[name].append(time.perf_counter() - t0)
            psnr[name].append(10 * np.log10(4.0 / np.mean((est - clean) ** 2)))
        psnr["noisy"].append(10 * np.log10(4.0 / np.mean((noisy - clean) ** 2)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.slices} slices of {args.size} px, sigma {args.sigma} ([-1, 1] units); torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for k in ("bm3d", "nlm"):
        print(f"  {k:5s}: median {med[k]:.3f} s/slice, PSNR {np.mean(psnr[k]):.2f} dB (noisy {np.mean(psnr['noisy']):.2f})")
    print(f"  ratio BM3D / NLM time per slice = {med['bm3d'] / med['nlm']:.1f}x")


if __name__ == "__main__":
    main()
