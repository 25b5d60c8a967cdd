"""One factory keyed by config: ``build_net({"name": "monai_unet", ...})``.

Hydra configs may also instantiate a class directly with ``_target_``; this factory exists so code and tests
can build nets from plain dicts without Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from meddiff.errors import ConfigError
from meddiff.nets.unets import DiffusersUNet, MonaiUNet

NETS: dict[str, type[nn.Module]] = {
    "monai_unet": MonaiUNet,
    "diffusers_unet": DiffusersUNet,
}


def build_net(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a denoiser from ``cfg`` (``name`` plus the class's keyword arguments)."""
    cfg = dict(cfg)
    cfg.pop("_target_", None)
    name = cfg.pop("name", "monai_unet")
    if name not in NETS:
        raise ConfigError(f"Unknown net.name={name!r}; choose one of {sorted(NETS)}.")
    return NETS[name](**cfg)
