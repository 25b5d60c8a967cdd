"""Patched (pDDPM) scoring: all patches of all images in one batched pass vs. one patch at a time, and vs. the
bare cost of the UNet forward passes it needs.

Requirements: report the batched/looped speedup; batched scoring reaches >= 0.8 of the bare-forward limit.

    python bench/bench_patched_scoring.py [--images 16 --size 64 --patch 32 --stride 16]
    python bench/bench_patched_scoring.py --size 128 --patch 64 --stride 64 --images 32 --compare-max-batch 16,128

``--compare-max-batch a,b``: only the batched path, at each chunk size (``model.sampling.max_batch``), with the
ratio; this is what chose ``${meddiff.per_device:<cpu>,<gpu>}`` for the pDDPM experiments (small chunks on a CPU,
large on a GPU).
"""

from __future__ import annotations

import argparse

import torch
from bench._common import interleaved

from meddiff.diffusion import NoiseSchedule
from meddiff.diffusion.partial import PartialSampling, partial_reconstruct
from meddiff.nets import build_net
from meddiff.patches import patch_masks

NET = dict(channels=(16, 32, 64), attention_levels=(False, False, True), num_res_blocks=1, norm_num_groups=16)  # the demo UNet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--compare-max-batch", default=None, help="e.g. 16,128: time the batched path at each chunk size")
    args = p.parse_args()
    if args.compare_max_batch:
        compare_max_batch(args, [int(v) for v in args.compare_max_batch.split(",")])
        return
    torch.manual_seed(0)
    net = build_net(NET).eval()
    schedule = NoiseSchedule(prediction_type="sample")
    x = torch.rand(args.images, 1, args.size, args.size) * 2 - 1
    n_patches = patch_masks(args.size, args.size, args.patch, args.stride).shape[0]
    items = args.images * n_patches

    def fn(xt, t, idx):
        return net(xt, t)

    batched_cfg = PartialSampling(t_start=250, patch_size=args.patch, stride=args.stride, max_batch=args.max_batch)
    looped_cfg = PartialSampling(t_start=250, patch_size=args.patch, stride=args.stride, max_batch=1)
    # the same forward shapes the batched path runs: chunks of max_batch items, the last one smaller
    sizes = [min(args.max_batch, items - i) for i in range(0, items, args.max_batch)]
    bare_inputs = [(torch.randn(n, 1, args.size, args.size), torch.full((n,), 250)) for n in sizes]

    @torch.no_grad()
    def bare():
        for xin, t in bare_inputs:
            net(xin, t)

    with torch.no_grad():
        times = interleaved({
            "batched": lambda: partial_reconstruct(fn, schedule, x, batched_cfg),
            "one patch at a time": lambda: partial_reconstruct(fn, schedule, x, looped_cfg),
            "bare UNet forwards": bare,
        }, rounds=3)
    print(f"{args.images} images {args.size}px, patch {args.patch} stride {args.stride}: {n_patches} patches/image, "
          f"{items} forward items in chunks of {args.max_batch}")
    for k, v in times.items():
        print(f"{k:22s}: {v:7.3f} s  ({items / v:7.1f} patches/s)")
    print(f"speedup batched vs one-at-a-time = {times['one patch at a time'] / times['batched']:.2f}x")
    print(f"batched / bare-forward limit     = {times['bare UNet forwards'] / times['batched']:.3f}  (requirement >= 0.8)")


def compare_max_batch(args: argparse.Namespace, sizes: list[int]) -> None:
    """Median seconds of the batched patched reconstruction at each ``max_batch``, and each one's ratio to the
    fastest."""
    torch.manual_seed(0)
    net = build_net(NET).eval()
    schedule = NoiseSchedule(prediction_type="sample")
    x = torch.rand(args.images, 1, args.size, args.size) * 2 - 1
    n_patches = patch_masks(args.size, args.size, args.patch, args.stride).shape[0]
    items = args.images * n_patches

    def fn(xt, t, idx):
        return net(xt, t)

    cfgs = {f"max_batch={m}": PartialSampling(t_start=250, patch_size=args.patch, stride=args.stride, max_batch=m)
            for m in sizes}
    with torch.no_grad():
        times = interleaved({k: (lambda c=c: partial_reconstruct(fn, schedule, x, c)) for k, c in cfgs.items()},
                            rounds=3)
    best = min(times.values())
    print(f"{args.images} images {args.size}px, patch {args.patch} stride {args.stride}: {items} forward items; "
          f"threads {torch.get_num_threads()}")
    for k, v in times.items():
        print(f"{k:16s}: {v:7.3f} s  ({items / v:7.1f} patches/s, {v / best:.2f}x the fastest)")


if __name__ == "__main__":
    main()
