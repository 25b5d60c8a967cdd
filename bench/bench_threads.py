"""Thread count vs machine load: the demo UNet's training step with 1 thread and with one per core, in alternation.

On an idle machine more threads help; when other work already fills the cores, OpenMP threads wait for each other
and a step can get many times slower, while 1 thread degrades gracefully. The result is the ratio of the two median
step times from this one run, printed with the load average and what ``meddiff.utils.cpu.choose_threads`` picks.
Run it with OMP_NUM_THREADS unset (or >= the core count) so torch may use every core.

    python bench/bench_threads.py [--steps 3 --rounds 5 --batch 64 --size 28 --bf16]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from bench_precision import demo_net, make_step  # bench/ is sys.path[0] when run as a script

from meddiff.diffusion import NoiseSchedule
from meddiff.utils.cpu import choose_threads, usable_cpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in both")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    auto = choose_threads("auto")
    n = usable_cpus()
    counts = sorted({1, n})
    torch.manual_seed(0)
    schedule = NoiseSchedule(prediction_type="sample")
    batch = torch.rand(args.batch, 1, args.size, args.size) * 2 - 1
    base = demo_net()
    steps = {k: make_step(copy.deepcopy(base), schedule, batch, bf16=args.bf16, channels_last=False, compile_=False)
             for k in counts}
    for k, fn in steps.items():
        torch.set_num_threads(k)
        fn()
    times: dict[int, list[float]] = {k: [] for k in counts}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            torch.set_num_threads(k)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[k].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"demo UNet step, batch {args.batch}x1x{args.size}x{args.size}, bf16={args.bf16}, {args.rounds} rounds x "
          f"{args.steps} steps; {n} usable cores; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; choose_threads('auto') -> {auto}")
    for k in counts:
        spread = (max(times[k]) - min(times[k])) / med[k]
        print(f"  {k} thread(s): speed vs 1 thread {med[1] / med[k]:.2f}x (spread {spread:.0%})")


if __name__ == "__main__":
    main()
