"""Cost of the nearest-healthy-image baseline: a 10,000-image reference (the subset cap) against a batch of queries.

    OMP_NUM_THREADS=1 python bench/bench_baselines.py [--n 10000 --size 128 --queries 256 --chunk 2048]

Prints seconds per query for float32 and float16 reference storage, the reference's memory, and the load average
(absolute times depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from meddiff.metrics.baselines import NearestHealthy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--chunk", type=int, default=2048)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(args.n, 1, args.size, args.size, generator=g) * 2 - 1
    q = torch.rand(args.queries, 1, args.size, args.size, generator=g) * 2 - 1
    mask = torch.ones(args.queries, 1, args.size, args.size, dtype=torch.bool)
    print(f"reference {args.n} x 1 x {args.size} x {args.size}, {args.queries} queries, chunk {args.chunk}, torch "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for dtype in (torch.float32, torch.float16):
        nn = NearestHealthy(ref, chunk_size=args.chunk, dtype=dtype)
        mb = nn.reference.numel() * nn.reference.element_size() / 2**20
        for name, m in (("no mask", None), ("brain mask", mask)):
            t0 = time.perf_counter()
            nn.search(q, m)
            dt = time.perf_counter() - t0
            print(f"  {str(dtype):14s} {mb:7.0f} MB, {name:10s}: {dt / args.queries * 1e3:7.2f} ms/query")


if __name__ == "__main__":
    main()
