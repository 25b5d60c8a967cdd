"""GPU smoke benchmark: every full-size experiment (``configs/experiment/*.yaml`` except the CPU demos) trains a few
hundred steps at its seed sizes (its net, image size and batch size) with bf16 mixed precision, on one GPU and
then with DDP on all visible GPUs, reporting s/step, images/s and peak memory per GPU.

Batches are synthetic tensors of the experiment's shapes (image, cond, class labels), so no dataset is needed and
the numbers measure the model's training step, not data loading. Each (experiment, device count) runs in its own
subprocess (a crash or out-of-memory in one does not stop the others; DDP's launcher re-runs only that worker).
Without CUDA it prints why and exits 0.

    python bench/gpu_smoke.py [--steps 300 --warmup 20 --experiments mnist_splotch,rsna_pddpm
                               --pretrained-dir /weights/ddpm-ema-celebahq-256 --out logs/gpu_smoke.json]

``rsna_pddpm_pretrained`` needs ``--pretrained-dir`` (the diffusers folder); it is skipped without one.
``--cpu-dry-run`` runs the same code on CPU with 2 steps and batch 2 to check the plumbing (not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
PRETRAINED = "rsna_pddpm_pretrained"


def full_size_experiments() -> list[str]:
    """Experiment names without the CPU demos (``demo.yaml``, ``demo_*.yaml``), sorted."""
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("demo"))


# ------------------------------------------------------------------------------------------------------- worker


def _compose(experiment: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from meddiff.runs.resolvers import register_resolvers

    register_resolvers()

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train.yaml", overrides=[f"experiment={experiment}", *overrides])


def _shapes(cfg: Any) -> dict[str, Any]:
    """Batch shapes of an experiment: image channels, cond channels, classes, size and batch size."""
    data, model = cfg.data, cfg.model
    windows = data.get("windows")
    image_c = int(model.get("image_channels") or (len(windows) if windows else 1))
    return {
        "image_channels": image_c,
        "cond_channels": int(model.get("cond_channels") or 0),  # conditional (denoising) models only
        "num_classes": int(model.get("num_classes") or 0),
        "image_size": int(data.image_size),
        "batch_size": int(data.batch_size),
    }


class SyntheticItems:
    """Map-style dataset of dict items with the experiment's shapes (values in [-1, 1], seeded by index)."""

    def __init__(self, n: int, shapes: dict[str, Any]) -> None:
        self.n, self.s = n, shapes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        g = torch.Generator().manual_seed(i)
        size = self.s["image_size"]
        item = {"image": torch.rand(self.s["image_channels"], size, size, generator=g) * 2 - 1,
                "label": torch.tensor(0)}
        if self.s["cond_channels"]:
            item["cond"] = (item["image"][: self.s["cond_channels"]] + 0.1 * torch.randn(
                self.s["cond_channels"], size, size, generator=g)).clamp(-1, 1)
        if self.s["num_classes"]:
            item["class_label"] = torch.randint(0, self.s["num_classes"], (), generator=g)
        return item


def worker(args: argparse.Namespace) -> None:
    import hydra
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    overrides = []
    if args.pretrained_dir:
        overrides.append(f"net.pretrained_dir={args.pretrained_dir}")
    cfg = _compose(args.experiment, overrides)
    shapes = _shapes(cfg)
    if args.batch:
        shapes["batch_size"] = args.batch
    L.seed_everything(0, workers=True)
    model = hydra.utils.instantiate(cfg.model)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gpu = args.accelerator == "gpu"

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.t0: float | None = None
            self.t1: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                if gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            if gpu:
                torch.cuda.synchronize()
            self.t1 = time.perf_counter()

    timer = Timer()
    total_steps = args.warmup + args.steps
    devices = args.devices
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
        precision="bf16-mixed", max_steps=total_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer], gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
    )
    per_device = shapes["batch_size"]
    ds = SyntheticItems(per_device * devices * (total_steps + 2), shapes)
    loader = DataLoader(ds, batch_size=per_device, shuffle=False, num_workers=args.num_workers, drop_last=True,
                        persistent_workers=args.num_workers > 0)
    trainer.fit(model, train_dataloaders=loader)
    if not trainer.is_global_zero:
        return
    assert timer.t0 is not None and timer.t1 is not None
    s_step = (timer.t1 - timer.t0) / args.steps
    result = {
        "experiment": args.experiment,
        "devices": devices,
        "strategy": "ddp" if devices > 1 else "single",
        "precision": "bf16-mixed",
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "params_M": n_params / 1e6,
        "image_shape": [shapes["image_channels"], shapes["image_size"], shapes["image_size"]],
        "batch_per_device": per_device,
        "s_per_step": s_step,
        "images_per_s": per_device * devices / s_step,
        "peak_mem_GiB_rank0": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "gpu": torch.cuda.get_device_name(0) if gpu else "cpu (dry run)",
    }
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------- orchestrator


def _run_one(experiment: str, devices: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", "--experiment", experiment, "--devices", str(devices),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", str(result),
               "--accelerator", args.accelerator, "--num-workers", str(args.num_workers)]
        if args.pretrained_dir:
            cmd += ["--pretrained-dir", args.pretrained_dir]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            return {"experiment": experiment, "devices": devices, "error": " | ".join(tail), "wall_s": wall}
        out = json.loads(result.read_text())
        out["wall_s"] = wall
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (cuDNN autotune, allocator)")
    p.add_argument("--experiments", default=None, help="comma-separated names (default: every full-size one)")
    p.add_argument("--pretrained-dir", default=None, help="diffusers folder for rsna_pddpm_pretrained")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--cpu-dry-run", action="store_true", help="check the plumbing on CPU: 2 steps, batch 2")
    # worker-only options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--experiment", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--accelerator", default="gpu", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    if args.cpu_dry_run:
        args.accelerator, args.steps, args.warmup, args.batch, args.num_workers = "cpu", 2, 1, 2, 0
        n_gpus = 1
        print("CPU dry run: checks that every experiment builds and trains with bf16; NOT a GPU measurement.")
    elif not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}). Nothing to measure: run this on a GPU machine. Exiting 0.")
        return
    else:
        n_gpus = torch.cuda.device_count()
    names = args.experiments.split(",") if args.experiments else full_size_experiments()
    unknown = sorted(set(names) - set(full_size_experiments()))
    if unknown:
        raise SystemExit(f"unknown or demo experiments {unknown}; choose from {full_size_experiments()}.")
    runs = []
    for name in names:
        if name == PRETRAINED and not args.pretrained_dir:
            runs.append({"experiment": name, "devices": 0, "error": "skipped: needs --pretrained-dir"})
            print(f"{name}: skipped (needs --pretrained-dir)", flush=True)
            continue
        for devices in sorted({1, n_gpus}):
            r = _run_one(name, devices, args)
            runs.append(r)
            if "error" in r:
                print(f"{name} x{devices}: FAILED: {r['error']}", flush=True)
            else:
                mem = r["peak_mem_GiB_rank0"]
                print(f"{name} x{devices} ({r['strategy']}, {r['params_M']:.1f}M params, batch {r['batch_per_device']}"
                      f"/GPU, {r['image_shape']}): {r['s_per_step'] * 1e3:.1f} ms/step, {r['images_per_s']:.0f} img/s, "
                      f"peak {'n/a' if mem is None else f'{mem:.2f} GiB'}", flush=True)
    if args.out:
        from meddiff.utils.io import atomic_write_json

        atomic_write_json(Path(args.out), {"runs": runs, "steps": args.steps, "warmup": args.warmup})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
