"""GPU smoke benchmark: every full-size experiment (``configs/experiment/*.yaml`` except the CPU demos) trains a few
hundred steps at its seed sizes (its net, image size and batch size) with bf16 mixed precision, on one GPU and
then with DDP on all visible GPUs. Per run: s/step, images/s, peak memory (``torch.cuda.max_memory_allocated`` on
rank 0; on CPU the process's peak RSS) and **loader starvation**: the fraction of the timed wall time spent between
the end of one training step and the start of the next (waiting for the next batch; Lightning fetches it there).
Printed as a table and written to a CSV (``--csv``; ``--out`` also writes JSON).

Data (``--data``): ``real`` uses the experiment's own DataModule (its ``data.root``, ``num_workers``, augmentations:
the starvation a real run would see); ``synthetic`` uses tensors of the experiment's shapes (no dataset needed; then
starvation measures only the synthetic loader with ``--num-workers``); ``auto`` (default) tries real and falls back to
synthetic when the data is missing, saying why in the ``data`` column. Each (experiment, device count) runs in its
own subprocess (a crash or out-of-memory in one does not stop the others). Without CUDA (and without
``--device cpu``) it prints why and exits 0.

    python bench/gpu_smoke.py [--steps 300 --warmup 20 --experiments mnist_splotch,rsna_pddpm --data auto
                               --pretrained-dir /weights/ddpm-ema-celebahq-256 --coarse-ckpt <brainomaly_coarse run>
                               --csv logs/gpu_smoke.csv --out logs/gpu_smoke.json]

``rsna_pddpm_pretrained`` needs ``--pretrained-dir`` (the diffusers folder); it is skipped with a message without
one. ``brainomaly_refiner`` uses ``--coarse-ckpt`` when given, else a randomly initialised coarse generator of
``brainomaly_coarse``'s architecture (same compute per step).
``--device cpu --tiny`` runs the same code on CPU with 4 timed steps, batch 2, synthetic images <= 32 px (or the
model's patch size), to check the plumbing (not a measurement; ``tests/bench/test_gpu_smoke.py`` runs it).
"""

from __future__ import annotations

import argparse
import csv
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
REFINER = "brainomaly_refiner"
TINY_SIZE = 32  # --tiny: synthetic images at most this many pixels wide
CSV_COLUMNS = ["experiment", "devices", "strategy", "precision", "device", "data", "image_shape", "batch_per_device",
               "steps_timed", "s_per_step", "images_per_s", "peak_mem_GiB", "loader_starvation", "params_M", "error"]


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


class StepTimer:
    """Lightning callback: timestamps of every training batch's start and end (after a CUDA sync, so the gap
    between one step's end and the next one's start is the wait for data, not queued GPU work)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # a real Callback subclass, built lazily (Lightning import)
        import lightning as L

        class _StepTimer(L.Callback):
            def __init__(self, warmup: int, cuda: bool) -> None:
                self.warmup, self.cuda = warmup, cuda
                self.starts: list[float] = []
                self.ends: list[float] = []
                self.image_shape: list[int] | None = None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                import torch

                if self.image_shape is None and isinstance(batch, dict) and torch.is_tensor(batch.get("image")):
                    self.image_shape = list(batch["image"].shape[1:])  # [C, H, W] of one item
                if len(self.starts) == self.warmup and self.cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.starts.append(time.perf_counter())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                import torch

                if self.cuda:
                    torch.cuda.synchronize()
                self.ends.append(time.perf_counter())

        return _StepTimer(*args, **kwargs)


def timing(starts: list[float], ends: list[float], warmup: int) -> dict[str, float]:
    """s/step and loader starvation over the steps after ``warmup``: wall = first timed start -> last end; waiting =
    the sum of the gaps end(i-1) -> start(i) inside it; starvation = waiting / wall in [0, 1]."""
    n = min(len(starts), len(ends))
    if n <= warmup:
        raise RuntimeError(f"only {n} steps ran, fewer than the {warmup} warm-up steps + 1")
    wall = ends[n - 1] - starts[warmup]
    wait = sum(starts[i] - ends[i - 1] for i in range(warmup + 1, n))
    return {"steps_timed": n - warmup, "s_per_step": wall / (n - warmup), "loader_starvation": wait / wall}


def peak_memory_gib(cuda: bool) -> float:
    """Peak memory in GiB: allocated CUDA memory on this rank, or the process's peak resident set size on CPU."""
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _refiner_without_coarse(cfg: Any) -> None:
    """``brainomaly_refiner`` without ``--coarse-ckpt``: a random coarse generator of ``brainomaly_coarse``'s
    architecture (the refiner's step costs the same; its numbers are not the point here)."""
    from omegaconf import OmegaConf, open_dict

    from meddiff.models.frozen import generator_arch

    coarse = _compose("brainomaly_coarse", [])
    with open_dict(cfg):
        cfg.model.coarse_ckpt = None
        # the {"class", "kwargs"} form: Hydra must not build the generator while it builds the refiner
        cfg.model.coarse_net = generator_arch(OmegaConf.to_container(coarse.model.generator, resolve=True))


def _real_loader(cfg: Any, batch: int | None) -> tuple[Any, str]:
    """The experiment's own DataModule (set up for fit) and ``"real, <n> workers"``; DataError when the data is
    missing."""
    import hydra
    from omegaconf import open_dict

    if batch:
        with open_dict(cfg):
            cfg.data.batch_size = batch
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm, f"real, {cfg.data.get('num_workers', 0)} workers"


def worker(args: argparse.Namespace) -> None:
    import hydra
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from meddiff.errors import ConfigError, DataError

    overrides = []
    if args.pretrained_dir:
        overrides.append(f"net.pretrained_dir={args.pretrained_dir}")
    if args.coarse_ckpt:
        overrides.append(f"model.coarse_ckpt={args.coarse_ckpt}")
    cfg = _compose(args.experiment, overrides)
    if args.experiment == REFINER and not args.coarse_ckpt:
        _refiner_without_coarse(cfg)
    shapes = _shapes(cfg)
    if args.batch:
        shapes["batch_size"] = args.batch
    if args.tiny:  # small images, but never below the patch a patched DDPM trains on
        shapes["image_size"] = min(shapes["image_size"], max(TINY_SIZE, int(cfg.model.get("patch_size") or 0)))
    L.seed_everything(0, workers=True)
    total_steps = args.warmup + args.steps
    devices, cuda = args.devices, args.accelerator == "gpu"
    per_device = shapes["batch_size"]
    datamodule, loader, missing = None, None, ""
    if args.data in ("auto", "real"):
        try:
            datamodule, data = _real_loader(cfg, args.batch)
            per_device = int(cfg.data.batch_size)
        except (DataError, ConfigError, FileNotFoundError) as e:
            if args.data == "real":
                raise
            first = str(e).splitlines()[0]
            missing = f"; real data missing: {first[:90]}{'...' if len(first) > 90 else ''}"
    if datamodule is None:
        ds = SyntheticItems(per_device * devices * (total_steps + 2), shapes)
        loader = DataLoader(ds, batch_size=per_device, shuffle=False, num_workers=args.num_workers, drop_last=True,
                            persistent_workers=args.num_workers > 0)
        data = f"synthetic, {args.num_workers} workers{missing}"
    model = hydra.utils.instantiate(cfg.model)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    timer = StepTimer(args.warmup, cuda)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
        precision="bf16-mixed", max_steps=total_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer], gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
    )
    if datamodule is not None:
        trainer.fit(model, datamodule=datamodule)
    else:
        trainer.fit(model, train_dataloaders=loader)
    if not trainer.is_global_zero:
        return
    t = timing(timer.starts, timer.ends, args.warmup)
    image_shape = timer.image_shape or [shapes["image_channels"], shapes["image_size"], shapes["image_size"]]
    result = {
        "experiment": args.experiment,
        "devices": devices,
        "strategy": "ddp" if devices > 1 else "single",
        "precision": "bf16-mixed",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "data": data,
        "image_shape": "x".join(map(str, image_shape)),
        "batch_per_device": per_device,
        **t,
        "warmup_steps": args.warmup,
        "images_per_s": per_device * devices / t["s_per_step"],
        "peak_mem_GiB": peak_memory_gib(cuda),
        "params_M": n_params / 1e6,
    }
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------- orchestrator


def _run_one(experiment: str, devices: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", "--experiment", experiment, "--devices", str(devices),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", str(result),
               "--accelerator", args.accelerator, "--num-workers", str(args.num_workers), "--data", args.data]
        for flag, value in (("--pretrained-dir", args.pretrained_dir), ("--coarse-ckpt", args.coarse_ckpt),
                            ("--batch", args.batch)):
            if value:
                cmd += [flag, str(value)]
        if args.tiny:
            cmd.append("--tiny")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            return {"experiment": experiment, "devices": devices, "error": " | ".join(tail), "wall_s": wall}
        out = json.loads(result.read_text())
        out["wall_s"] = wall
        return out


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(runs: list[dict[str, Any]]) -> None:
    """One row per run: experiment, GPUs, s/step, images/s, peak memory, loader starvation, data (or the error)."""
    head = ["experiment", "devices", "s/step", "images/s", "peak GiB", "starvation", "data / error"]
    rows = [[r["experiment"], str(r.get("devices", "")), _fmt(r.get("s_per_step")), _fmt(r.get("images_per_s")),
             _fmt(r.get("peak_mem_GiB")),
             "" if r.get("loader_starvation") is None else f"{100 * r['loader_starvation']:.1f}%",
             r.get("error") or r.get("data", "")] for r in runs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    for row in [head, *rows]:
        print("  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def write_csv(runs: list[dict[str, Any]], path: Path) -> None:
    """The runs as CSV with :data:`CSV_COLUMNS` (empty cells for what a failed or skipped run lacks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (cuDNN autotune, allocator)")
    p.add_argument("--experiments", default=None, help="comma-separated names (default: every full-size one)")
    p.add_argument("--pretrained-dir", default=None, help="diffusers folder for rsna_pddpm_pretrained")
    p.add_argument("--coarse-ckpt", default=None, help="brainomaly_coarse run dir or .ckpt for brainomaly_refiner")
    p.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto",
                   help="the experiment's DataModule, synthetic tensors, or real when available (default)")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers for synthetic data")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--tiny", action="store_true", help="4 timed steps after 1, batch 2, synthetic images <= 32 px")
    p.add_argument("--csv", default="logs/gpu_smoke.csv", help="write the table here as CSV")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
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

    if args.tiny:
        args.steps, args.warmup, args.batch = 4, 1, 2
    if args.device == "cpu":
        args.accelerator, n_gpus = "cpu", 1
        print("On CPU: checks that the experiments build and train with bf16; NOT a GPU measurement.")
    elif not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}). Nothing to measure: run this on a GPU machine (or --device cpu --tiny to check "
              "the plumbing). Exiting 0.")
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
            runs.append({"experiment": name, "devices": 0, "error": "skipped: needs --pretrained-dir (weights)"})
            print(f"{name}: skipped (no pretrained weights: pass --pretrained-dir <diffusers folder>)", flush=True)
            continue
        for devices in sorted({1, n_gpus}):
            r = _run_one(name, devices, args)
            runs.append(r)
            if "error" in r:
                print(f"{name} x{devices}: FAILED: {r['error']}", flush=True)
            else:
                print(f"{name} x{devices}: {r['s_per_step'] * 1e3:.1f} ms/step, {r['images_per_s']:.0f} img/s, peak "
                      f"{r['peak_mem_GiB']:.2f} GiB, loader starvation {100 * r['loader_starvation']:.1f}%",
                      flush=True)
    print()
    print_table(runs)
    write_csv(runs, Path(args.csv))
    print(f"wrote {args.csv}")
    if args.out:
        from meddiff.utils.io import atomic_write_json

        atomic_write_json(Path(args.out), {"runs": runs, "steps": args.steps, "warmup": args.warmup})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
