"""Load a frozen first stage (the coarse generator a refiner builds on), weights-only, from a checkpoint or run dir.

A refiner's first stage is a trained ``CoarseGenerator`` (``meddiff.models.coarse_gan``). This module finds its
checkpoint (a ``.ckpt``, or a coarse run dir whose AUCp-selected checkpoint is used), reads it weights-only, checks
that it holds a generator, builds the generator from its stored architecture (a class on the one trust list,
:data:`meddiff.utils.safety.TRUSTED_CLASSES`, that is a network) and returns it frozen (eval mode, no grads). It knows nothing of runs: the caller passes the key under which checkpoints store
their experiment config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from torch import nn

from meddiff.errors import ConfigError
from meddiff.runs.checkpoint_selection import checkpoint_dir_of, load_weights_only, selection_checkpoints
from meddiff.utils.safety import check_target, locate

__all__ = ["build_generator", "frozen_first_stage", "generator_arch", "generator_class", "load_coarse_generator",
           "plain", "resolve_coarse_checkpoint"]

log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (checkpoints must load weights-only)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def generator_class(target: Any) -> type[nn.Module]:
    """The class a stored generator config names: trusted (:func:`meddiff.utils.safety.check_target`, the one list
    of what a stored config may build) and a network (an ``nn.Module``, not a LightningModule); else a ConfigError
    naming it."""
    try:
        check_target(target, "coarse generator _target_")
    except ConfigError as e:
        raise ConfigError(f"coarse generator class {target!r} is not an allowed generator class: {e}") from e
    cls = locate(target)
    if not issubclass(cls, nn.Module) or issubclass(cls, LightningModule):
        raise ConfigError(f"coarse generator class {target!r} is not an allowed generator class: it is not a "
                          "network (use the generator of a `experiment=brainomaly_coarse` run, e.g. "
                          "meddiff.nets.gan.BrainomalyGenerator).")
    return cls


def generator_arch(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{"class": <trusted generator class path>, "kwargs": {...}}`` from a stored generator config.

    Accepts the CoarseGenerator's own config (``{"_target_": ..., **kwargs}``) or this form. The form has no
    ``_target_`` on purpose: Hydra must not instantiate a stored architecture on its own.
    """
    cfg = dict(plain(cfg))
    if "class" in cfg:
        target, kwargs = cfg["class"], dict(cfg.get("kwargs") or {})
    else:
        target = cfg.pop("_target_", None)
        kwargs = cfg
    generator_class(target)
    return {"class": target, "kwargs": kwargs}


def build_generator(cfg: Mapping[str, Any]) -> nn.Module:
    """A generator from a stored config (see :func:`generator_arch`); only trusted generator classes are built."""
    arch = generator_arch(cfg)
    cls = generator_class(arch["class"])
    try:
        return cls(**arch["kwargs"])
    except TypeError as e:
        raise ConfigError(f"the stored coarse generator arguments do not fit {arch['class']}: {e}") from e


def resolve_coarse_checkpoint(path: str | Path) -> tuple[Path, str]:
    """``(file, rule)``: a ``.ckpt`` file as given (rule ``given``), or a coarse run dir's AUCp-selected checkpoint
    (else its ``last.ckpt``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p, "given"
    if p.is_dir():
        rules = selection_checkpoints(checkpoint_dir_of(p))
        for rule in ("aucp", "last"):
            if rule in rules:
                return rules[rule], rule
        raise ConfigError(f"model.coarse_ckpt={str(p)!r} is a folder without checkpoints/last.ckpt; pass the coarse "
                          "run dir (or a .ckpt) written by `python -m meddiff.train experiment=brainomaly_coarse`.")
    raise ConfigError(
        f"model.coarse_ckpt={str(p)!r} does not exist. Train the coarse stage first "
        "(`python -m meddiff.train experiment=brainomaly_coarse hydra.run.dir=<coarse run dir>`) and pass its run dir "
        "or a .ckpt from its checkpoints/ folder."
    )


def load_coarse_generator(path: str | Path, config_key: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Load a frozen generator from a ``CoarseGenerator`` checkpoint (weights-only); ``config_key``: where the
    checkpoint stores its experiment config.

    Returns ``(generator in eval mode without grads, its architecture config, info {path, rule, iterations})``.
    Raises ConfigError when the file is missing, not loadable weights-only, or not a CoarseGenerator checkpoint.
    """
    file, rule = resolve_coarse_checkpoint(path)
    ckpt = load_weights_only(file, "model.coarse_ckpt")
    model_cfg = (ckpt.get(config_key) or {}).get("model") or {}
    target = str(model_cfg.get("_target_", ""))
    state = {k[len("generator."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    if not target.endswith("CoarseGenerator") or not state or "generator" not in model_cfg:
        raise ConfigError(
            f"model.coarse_ckpt={str(file)!r} is not a CoarseGenerator checkpoint (its model is {target or 'unknown'}, "
            f"{len(state)} generator weights); pass a checkpoint of `experiment=brainomaly_coarse`."
        )
    arch = generator_arch(model_cfg["generator"])
    gen = build_generator(arch)
    try:
        gen.load_state_dict(state)
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        raise ConfigError(f"model.coarse_ckpt={str(file)!r}: the generator weights do not fit its stored "
                          f"architecture ({arch['class']}): {e}") from e
    info = {"path": str(file), "rule": rule, "iterations": int(ckpt["state_dict"].get("iterations", -1))}
    return gen, arch, info




def frozen_first_stage(coarse_ckpt: str | Path | None, coarse_net: Mapping[str, Any] | None, config_key: str
                       ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``(generator frozen in eval mode, its architecture, info {path, rule, ...})`` from ``model.coarse_ckpt``
    (checkpoint or coarse run dir) or, when that file is gone or not given, from ``model.coarse_net`` (the
    architecture a refiner checkpoint stores; its weights then come from that checkpoint's state dict)."""
    if coarse_ckpt:
        path = Path(str(coarse_ckpt)).expanduser()
        if path.exists() or coarse_net is None:
            gen, arch, info = load_coarse_generator(path, config_key)
        else:  # evaluating a refiner checkpoint whose coarse file has moved: weights come from its state_dict
            log.info("model.coarse_ckpt=%s is gone; building the generator from model.coarse_net (the refiner "
                     "checkpoint holds its weights).", path)
            arch = generator_arch(coarse_net)
            gen, info = build_generator(arch), {"path": str(path), "rule": "stored"}
    elif coarse_net is not None:
        arch = generator_arch(coarse_net)
        gen, info = build_generator(arch), {"path": None, "rule": "stored"}
    else:
        raise ConfigError(
            "RefinerDiffusion needs the coarse stage: set model.coarse_ckpt=<coarse run dir or .ckpt> (train it "
            "with `python -m meddiff.train experiment=brainomaly_coarse`)."
        )
    gen.eval().requires_grad_(False)
    return gen, arch, info
