"""Supervised U-Net denoiser: the learned baseline of the denoise protocol (CDM4MI compares against it).

A plain training loop and an ``nn.Module``, not a LightningModule: it lives beside the protocol that uses it
(:mod:`meddiff.protocols.denoise`, which fits it in its selection step).

The same UNet family as the diffusion model, called at a fixed ``t = 0`` (its time embedding is then a constant)
on the noisy image only, trained with L1 or L2 on the clean image: ``clean^ = cond + net(cond, 0)`` (residual,
default) or ``clean^ = net(cond, 0)``. It sees exactly the training pairs the diffusion model sees
(``datamodule.train_dataloader()``: clean ``image``, noisy ``cond``, fresh noise every pass), for a configurable
number of optimizer steps, and is cached on disk keyed by everything that determines it, so the evaluation of a
run trains it once.

Shapes: ``cond [B, C', H, W]`` -> ``[B, C, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meddiff.errors import ConfigError, DataError
from meddiff.utils.io import atomic_write

log = logging.getLogger(__name__)

SUPERVISED_LOSSES = ("l1", "l2")


class SupervisedDenoiser(nn.Module):
    """``cond [B, C', H, W] -> clean estimate [B, C, H, W]`` clamped to ``[-1, 1]`` (outside training).

    Args:
        net: a denoiser with the project's call signature ``net(x, t, class_labels=None)`` taking ``C'`` input
            channels and giving ``C`` output channels; it is called with ``t = 0``.
        residual: predict the noise-free image as ``cond + net(cond)`` (needs ``C == C'``) rather than directly.
    """

    def __init__(self, net: nn.Module, residual: bool = True) -> None:
        super().__init__()
        self.net = net
        self.residual = bool(residual)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(cond.shape[0], dtype=torch.long, device=cond.device)
        out = self.net(cond, t)
        if self.residual:
            if out.shape != cond.shape:
                raise ConfigError(
                    f"residual supervised denoiser needs output shape {tuple(cond.shape)} == input shape, got "
                    f"{tuple(out.shape)}; set eval.supervised.residual=false or match the channels."
                )
            out = cond + out
        return out if self.training else out.clamp(-1.0, 1.0)


def build_supervised_net(net_cfg: Mapping[str, Any], in_channels: int = 1, out_channels: int = 1) -> nn.Module:
    """The diffusion model's net config with ``in_channels``/``out_channels`` replaced (``_target_`` or ``name``).

    ``net_cfg`` is a plain dict such as the experiment's ``net:`` section (e.g. ``configs/net/unet_small.yaml``).
    """
    cfg = dict(net_cfg)
    if not cfg:
        raise ConfigError("eval.supervised.net is empty; give a net config (e.g. ${net}) for the supervised U-Net.")
    cfg.pop("num_class_embeds", None)
    if "in_channels" in cfg or "_target_" not in cfg or "MonaiUNet" in str(cfg.get("_target_")):
        cfg["in_channels"], cfg["out_channels"] = int(in_channels), int(out_channels)
    if "_target_" in cfg:
        import hydra

        return hydra.utils.instantiate(cfg)
    from meddiff.nets import build_net

    return build_net(cfg)


def _cycle(loader: Iterable) -> Iterable:
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise DataError("the training loader is empty; the supervised baseline needs training pairs.")


def train_supervised(
    model: SupervisedDenoiser,
    loader: Iterable[Mapping[str, Any]],
    steps: int = 500,
    lr: float = 1e-3,
    loss: str = "l1",
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` on ``(cond -> image)`` pairs for ``steps`` Adam steps (cosine-decayed LR). In place.

    Returns ``{"steps", "seconds", "final_loss"}`` (the mean loss of the last 10% of steps).
    """
    from tqdm.auto import tqdm

    if loss not in SUPERVISED_LOSSES:
        raise ConfigError(f"eval.supervised.loss={loss!r} is unknown; choose one of {list(SUPERVISED_LOSSES)}.")
    if int(steps) < 1 or not float(lr) > 0:
        raise ConfigError(f"eval.supervised.steps={steps} must be >= 1 and lr={lr} > 0.")
    steps = int(steps)
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=float(lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=float(lr) * 0.05)
    fn = F.l1_loss if loss == "l1" else F.mse_loss
    tail: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="supervised U-Net", leave=False, disable=not progress)
    it = iter(_cycle(loader))
    for step in bar:
        batch = next(it)
        cond, image = batch["cond"].to(device), batch["image"].to(device)
        value = fn(model(cond), image)
        if not torch.isfinite(value):
            raise FloatingPointError(f"supervised baseline loss is {value.item()} at step {step}; lower its lr.")
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(value.item())
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{value.item():.4f}")
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - start, "final_loss": sum(tail) / len(tail)}


def cache_key(settings: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of the JSON of ``settings`` (sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_or_train_supervised(
    cache_dir: str | Path,
    net_cfg: Mapping[str, Any],
    loader: Iterable[Mapping[str, Any]],
    data_id: Mapping[str, Any],
    in_channels: int = 1,
    out_channels: int = 1,
    steps: int = 500,
    lr: float = 1e-3,
    loss: str = "l1",
    residual: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> tuple[SupervisedDenoiser, dict[str, Any]]:
    """The supervised baseline, from ``<cache_dir>/supervised_<key>.pt`` if present, else trained and cached.

    ``key`` hashes the net config, the training settings and ``data_id`` (what identifies the training pairs:
    file, volumes, noise level), so a changed setting trains a new baseline. The cache is written atomically.

    Returns ``(model in eval mode on device, info)``; ``info`` holds the settings, ``cache`` path, ``cached``
    (loaded rather than trained), ``seconds`` of training and ``final_loss``.
    """
    settings = {"net": dict(net_cfg), "in_channels": int(in_channels), "out_channels": int(out_channels),
                "steps": int(steps), "lr": float(lr), "loss": loss, "residual": bool(residual), "seed": int(seed),
                "data": dict(data_id)}
    path = Path(cache_dir) / f"supervised_{cache_key(settings)}.pt"
    model = SupervisedDenoiser(build_supervised_net(net_cfg, in_channels, out_channels), residual=residual)
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(blob["state_dict"])
            log.info("supervised baseline loaded from %s", path)
            info = {**blob["info"], "cache": str(path), "cached": True}
            return model.to(device).eval(), info
        except Exception as exc:  # noqa: BLE001 - a broken cache is retrained, not fatal
            log.warning("supervised baseline cache %s unreadable (%s); retraining", path, exc)
    stats = train_supervised(model, loader, steps=steps, lr=lr, loss=loss, device=device, seed=seed,
                             progress=progress)
    info = {"settings": settings, **stats}
    state = {k: v.detach().cpu() for k, v in copy.deepcopy(model.state_dict()).items()}
    atomic_write(path, lambda tmp: torch.save({"state_dict": state, "info": info}, tmp))
    return model.to(device).eval(), {**info, "cache": str(path), "cached": False}
