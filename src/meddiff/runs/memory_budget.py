"""Does one training batch fit in memory? A cheap, conservative check before anything is allocated.

``data.image_size=4096`` on MNIST used to end in a raw allocator error deep inside the first forward pass (or the
machine swapping for minutes). :func:`check_first_batch_fits` estimates a LOWER BOUND of the activations one training
batch keeps for the backward pass and refuses the config with a :class:`ConfigError` naming the estimate, the
memory available and the settings to lower when even that bound does not fit.

The bound: a UNet level ``l`` with ``c_l`` channels holds ``batch x c_l x (pixels / 2^(dims*l))`` values per stored
tensor, and the training pass stores many such tensors per level (norms, activations, convolutions of every residual
block, skips, the decoder's twin). :data:`TENSORS_PER_LEVEL` counts only 8 of them; measured on the shipped MONAI
UNets (``unet_tiny`` ... ``unet_rsna``, fp32, autograd's saved tensors) the real count is 31-78, so the estimate stays
at least ~4x below what training needs, and a config that runs today is never refused
(``tests/runs/test_memory_budget.py`` composes every experiment). Nets whose size cannot be read from the config
(a pretrained diffusers folder, the GAN) are not checked.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from meddiff.errors import ConfigError

log = logging.getLogger(__name__)

#: stored tensors per UNet level counted by the estimate (measured: 31-78; see the module docstring)
TENSORS_PER_LEVEL = 8


def bytes_per_value(precision: Any) -> int:
    """Bytes of one activation under Lightning's ``trainer.precision`` (the smaller one when unsure: a lower bound)."""
    text = str(precision).lower()
    if text.startswith("64"):
        return 8
    if text.startswith("32"):
        return 4
    return 2  # 16 / bf16 (mixed or true), transformer-engine, "auto" (not resolved yet): the smallest


def activation_bytes(batch_size: int, in_channels: int, spatial: tuple[int, ...], channels: tuple[int, ...],
                     precision: Any = "32-true") -> int:
    """Lower bound on the activation bytes one training batch stores (``[B, C, *spatial]`` input, ``channels`` per
    UNet level; each level halves every spatial side)."""
    pixels = math.prod(spatial)
    shrink = 2 ** len(spatial)
    per_pixel = in_channels + TENSORS_PER_LEVEL * sum(c / shrink**level for level, c in enumerate(channels))
    return int(batch_size * pixels * per_pixel * bytes_per_value(precision))


def _net_shape(net: Mapping[str, Any]) -> tuple[int, tuple[int, ...], int] | None:
    """``(in_channels, channels per level, spatial dims)`` of a UNet config, or None when the config does not say."""
    channels = net.get("channels")
    if not isinstance(channels, list | tuple) or not channels or not all(isinstance(c, int) for c in channels):
        return None
    in_channels = net.get("in_channels", 1)
    dims = net.get("spatial_dims", 2)
    if not isinstance(in_channels, int) or not isinstance(dims, int):
        return None
    return in_channels, tuple(channels), dims


def _spatial(image_size: Any, dims: int) -> tuple[int, ...] | None:
    if isinstance(image_size, bool):
        return None
    if isinstance(image_size, int) and image_size > 0:
        return (image_size,) * dims
    if isinstance(image_size, list | tuple) and image_size and all(isinstance(s, int) and s > 0 for s in image_size):
        return tuple(image_size)
    return None  # null (keep the files' size), interpolations not resolved, ...


def available_memory(trainer: Mapping[str, Any]) -> tuple[int, str] | None:
    """``(bytes free, where)`` for the device the first process trains on: the free memory of its GPU
    (``torch.cuda.mem_get_info``), else the system's available RAM (CPU, MPS' unified memory); None when unknown."""
    import torch

    accelerator = str(trainer.get("accelerator", "auto")).lower()
    strategy = str(trainer.get("strategy", "auto")).lower()
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        if "fork" in strategy or "notebook" in strategy or not torch.cuda.is_available():
            return None  # CUDA must not be initialised before Lightning forks its processes
        devices = trainer.get("devices")
        index = int(devices[0]) if isinstance(devices, list | tuple) and devices else 0
        try:
            free, _ = torch.cuda.mem_get_info(index)
        except (RuntimeError, AssertionError, ValueError):
            return None
        return int(free), f"GPU {index}"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "this machine (RAM)"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine (RAM)"
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_first_batch_fits(cfg: Mapping[str, Any], available: tuple[int, str] | None = None) -> int | None:
    """Raise a :class:`ConfigError` when one training batch of ``cfg`` cannot fit in the memory available.

    ``cfg``: the composed run config (``data.batch_size``, ``data.image_size``, ``net``, ``trainer``), resolved
    values or not (unresolved ones skip the check). ``available``: ``(bytes, where)``, default
    :func:`available_memory`. Returns the estimate in bytes, or None when the config does not allow one.
    """
    try:
        data, net, trainer = (_plain(cfg.get(key)) for key in ("data", "net", "trainer"))
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve: reported where it is used
        return None
    shape = _net_shape(net)
    batch_size = data.get("batch_size")
    if shape is None or isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        return None
    in_channels, channels, dims = shape
    spatial = _spatial(data.get("image_size"), dims)
    if spatial is None:
        return None
    precision = trainer.get("precision", "32-true")
    need = activation_bytes(batch_size, in_channels, spatial, channels, precision)
    if available is None:
        if os.environ.get("LOCAL_RANK", "0") != "0":  # the same config on every process: one process checks
            return need
        available = available_memory(trainer)
    if available is None or need <= available[0]:
        return need
    free, where = available
    size = "x".join(str(s) for s in spatial)
    raise ConfigError(
        f"One training batch cannot fit in memory: it needs at least ~{_gb(need)} of activations "
        f"(data.batch_size={batch_size} x {in_channels} channel(s) x {size} px through net.channels="
        f"{list(channels)}, {bytes_per_value(precision)} bytes per value at trainer.precision={precision}), but "
        f"only {_gb(free)} is available on {where}. Lower data.image_size (activations grow with its square), "
        f"data.batch_size, or the net's channels (net.channels, e.g. net=unet_tiny).")


def _plain(node: Any) -> Mapping[str, Any]:
    """A config group as plain containers (interpolations resolved; a missing group: empty)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    return node if isinstance(node, Mapping) else {}


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"
