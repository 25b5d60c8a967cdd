"""Training throughput of the LightningModule (inside ``Trainer.fit``) vs. a bare PyTorch loop.

Both do the same work per step on the same net and batch: draw t and noise, q_sample, forward, loss on the
x0 target, backward, AdamW step. Requirement: Lightning >= 0.9x the bare loop's throughput.

    python bench/bench_training_step.py [--steps 30 --batch 32 --ema]
"""

from __future__ import annotations

import argparse
import copy
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from meddiff.diffusion import NoiseSchedule
from meddiff.models import UnconditionalDiffusion
from meddiff.nets import build_net

NET = dict(channels=(16, 32, 64), attention_levels=(False, False, True), num_res_blocks=1, norm_num_groups=16)  # the demo UNet


class FixedBatches(Dataset):
    def __init__(self, batch: torch.Tensor, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": self.batch}


def lightning_run(net, schedule, batch, steps: int, ema: bool) -> float:
    model = UnconditionalDiffusion(net=net, schedule=schedule, loss="l1", ema_decay=0.999 if ema else 0.0,
                                   optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
    loader = DataLoader(FixedBatches(batch, steps + 3), batch_size=None, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps + 3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            if i == 3:
                self.t0 = time.perf_counter()

    timer = Timer()
    trainer.callbacks.append(timer)
    trainer.fit(model, train_dataloaders=loader)
    return (time.perf_counter() - timer.t0) / steps


def bare_run(net, schedule, batch, steps: int, ema: bool) -> float:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    shadow = copy.deepcopy(net) if ema else None
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        t = torch.randint(0, schedule.num_train_timesteps, (batch.shape[0],))
        noise = torch.randn_like(batch)
        x_t = schedule.q_sample(batch, t, noise)
        loss = (net(x_t, t) - batch).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if shadow is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(shadow.parameters()), list(net.parameters()), 0.001)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--ema", action="store_true", help="EMA update in both loops")
    args = p.parse_args()
    torch.manual_seed(0)
    schedule = NoiseSchedule(prediction_type="sample")
    batch = torch.rand(args.batch, 1, args.size, args.size) * 2 - 1
    base = build_net(NET)
    results = {}
    for _rnd in range(2):  # alternate, keep the best of each: machine noise hits both alike
        for name, fn in (("bare", bare_run), ("lightning", lightning_run)):
            s = fn(copy.deepcopy(base), schedule, batch, args.steps, args.ema)
            results[name] = min(results.get(name, float("inf")), s)
    ratio = results["bare"] / results["lightning"]
    print(f"batch {args.batch}x1x{args.size}x{args.size}, {args.steps} steps, ema={args.ema}")
    print(f"bare PyTorch loop : {results['bare'] * 1e3:8.1f} ms/step")
    print(f"LightningModule   : {results['lightning'] * 1e3:8.1f} ms/step")
    print(f"throughput ratio Lightning/bare = {ratio:.3f}  (requirement >= 0.9)")


if __name__ == "__main__":
    main()
