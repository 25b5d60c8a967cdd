"""The demo UNet's training step on CPU: fp32 vs bf16 autocast vs channels_last vs torch.compile.

The step is what ``make demo`` repeats: draw t and noise, q_sample, forward, L1 loss on the x0 target, backward,
AdamW step, on the demo's net (``configs/net/unet_small.yaml``) and batch (64 x 1 x 28 x 28). Every variant owns a
copy of the same initial net; variants run in alternation (``rounds`` x ``steps`` each) so machine noise hits them
alike, and the result is each variant's median step time as a RATIO to fp32 from this one run (absolute times
depend on the machine and its load and are not a result).

    OMP_NUM_THREADS=1 python bench/bench_precision.py [--steps 5 --rounds 5 --batch 64 --size 28 --threads auto
                                                       --no-compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

from meddiff.diffusion import NoiseSchedule
from meddiff.nets import build_net
from meddiff.utils.cpu import bf16_support, choose_threads

NET_YAML = Path(__file__).resolve().parents[1] / "configs" / "net" / "unet_small.yaml"


def demo_net() -> torch.nn.Module:
    cfg = OmegaConf.to_container(OmegaConf.load(NET_YAML), resolve=True)
    return build_net(cfg)


def make_step(
    net: torch.nn.Module, schedule: NoiseSchedule, batch: torch.Tensor, bf16: bool, channels_last: bool,
    compile_: bool,
) -> Callable[[], float]:
    """One training step of ``net`` (its own AdamW); returns a closure that runs it and gives the loss."""
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    fwd = torch.compile(net) if compile_ else net
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        t = torch.randint(0, schedule.num_train_timesteps, (batch.shape[0],), generator=gen)
        noise = torch.randn(batch.shape, generator=gen)
        x_t = schedule.q_sample(batch, t, noise)
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            loss = (fwd(x_t, t).float() - batch).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="steps per variant before timing (compilation happens here)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--threads", default="auto", help="torch threads: an int or 'auto' (meddiff.utils.cpu)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = p.parse_args()

    threads = choose_threads(int(args.threads) if args.threads != "auto" else "auto")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    schedule = NoiseSchedule(prediction_type="sample")
    batch = torch.rand(args.batch, 1, args.size, args.size) * 2 - 1
    base = demo_net()
    variants = {
        "fp32": dict(bf16=False, channels_last=False, compile_=False),
        "bf16 autocast": dict(bf16=True, channels_last=False, compile_=False),
        "channels_last": dict(bf16=False, channels_last=True, compile_=False),
        "channels_last + bf16": dict(bf16=True, channels_last=True, compile_=False),
    }
    if not args.no_compile:
        variants["torch.compile"] = dict(bf16=False, channels_last=False, compile_=True)
        variants["torch.compile + bf16"] = dict(bf16=True, channels_last=False, compile_=True)
    steps, warm_s = {}, {}
    for name, kw in variants.items():
        steps[name] = make_step(copy.deepcopy(base), schedule, batch, **kw)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            steps[name]()
        warm_s[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    info = bf16_support()
    print(f"demo UNet ({NET_YAML.name}), batch {args.batch}x1x{args.size}x{args.size}, {args.rounds} rounds x "
          f"{args.steps} steps per variant, torch threads {threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"native bf16: {info['native_bf16']} {info['flags']} (capability {info['torch_capability']})")
    print(f"{'variant':24s} {'speed vs fp32':>14s} {'spread':>8s} {'warm-up x fp32 step':>20s}")
    for name in steps:
        spread = (max(times[name]) - min(times[name])) / med[name]
        print(f"{name:24s} {med['fp32'] / med[name]:13.2f}x {spread:7.0%} {warm_s[name] / med['fp32']:19.0f}x")
    print("(speed = fp32 median step time / variant median step time; spread = (max - min) / median over rounds)")


if __name__ == "__main__":
    main()
