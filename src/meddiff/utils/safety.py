"""What a config read from a file may build: the one list of trusted classes.

A checkpoint carries its experiment config (``meddiff_config``), a run dir its overrides and resolved config, a
refiner its ``coarse_ckpt``; ``meddiff.eval`` and a resume rebuild the model, data, callbacks, loggers and trainer
from them with ``hydra.utils.instantiate``. A file from elsewhere must not be able to run code or write files that
way, so every ``_target_`` in such a config is checked here before anything of it is instantiated:

- the dotted name must be one of :data:`TRUSTED_CLASSES` (as configs spell it), or the defining
  ``<module>.<qualname>`` of one of them — a name, compared as text, before anything is imported;
- it must resolve to a class. Functions and other module-level callables (``meddiff.utils.io.atomic_write_text``,
  ``shutil.copyfile``, anything from ``diffusers.utils``) are never on the list.

Anything else is a :class:`~meddiff.errors.ConfigError` naming the key and the refused target. A class of your own
that a stored config should build (a new model, DataModule, callback) is added to :data:`TRUSTED_CLASSES`, here and
nowhere else.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from typing import Any

from meddiff.errors import ConfigError

#: every class a stored config may instantiate, by the dotted name configs use (see the module docstring)
TRUSTED_CLASSES: frozenset[str] = frozenset({
    # models (LightningModules)
    "meddiff.models.UnconditionalDiffusion",
    "meddiff.models.conditional.ConditionalDiffusion",
    "meddiff.models.guided.GuidedDiffusion",
    "meddiff.models.refiner.RefinerDiffusion",
    "meddiff.models.coarse_gan.CoarseGenerator",
    "meddiff.models.dae.DenoisingAutoencoder",
    "meddiff.models.cddpm.ConditionedDDPM",
    # nets
    "meddiff.nets.MonaiUNet",
    "meddiff.nets.DiffusersUNet",
    "meddiff.nets.gan.BrainomalyGenerator",
    "meddiff.nets.BrainomalyGenerator",
    "meddiff.nets.gan.PatchCritic",
    # noise schedules
    "meddiff.diffusion.NoiseSchedule",
    # optimizers
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "torch.optim.SGD",
    "torch.optim.RMSprop",
    "torch.optim.Adagrad",
    "torch.optim.NAdam",
    "torch.optim.RAdam",
    # LR schedulers (built with _partial_: true; the model passes the optimizer)
    "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "torch.optim.lr_scheduler.ExponentialLR",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
    "torch.optim.lr_scheduler.LinearLR",
    "torch.optim.lr_scheduler.ConstantLR",
    "torch.optim.lr_scheduler.OneCycleLR",
    "torch.optim.lr_scheduler.ReduceLROnPlateau",
    "meddiff.models.lr_schedules.WarmupCosineLR",
    # DataModules
    "meddiff.data.modules.mnist_splotch.MNISTSplotchDataModule",
    "meddiff.data.modules.rsna_ct.RSNACTDataModule",
    "meddiff.data.modules.adni.datamodule.ADNISliceDataModule",
    "meddiff.data.modules.hdf5_patches.HDF5PatchDataModule",
    "meddiff.data.modules.image_folder.ImageFolderAnomalyDataModule",
    # callbacks (configs/callbacks, the project's own, the sweep callback of configs/hydra)
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.EarlyStopping",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.ModelSummary",
    "lightning.pytorch.callbacks.RichModelSummary",
    "lightning.pytorch.callbacks.RichProgressBar",
    "lightning.pytorch.callbacks.TQDMProgressBar",
    "lightning.pytorch.callbacks.Timer",
    "meddiff.callbacks.LastCheckpoint",
    "meddiff.runs.sweep.callback.SweepSummary",
    "meddiff.benchmark.callback.LeaderboardCallback",
    # loggers
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.WandbLogger",
    "meddiff.runs.csv_history.CSVHistoryLogger",
    # trainer
    "lightning.pytorch.Trainer",
})

_TARGET_KEYS = ("_target_",)
_HINT = ("a config read from a checkpoint or run dir may only build the classes listed in "
         "meddiff.utils.safety.TRUSTED_CLASSES (models, nets, noise schedules, optimizers, LR schedulers, DataModules, "
         "the project's callbacks and loggers, the Trainer): no functions. If this file is not yours, do not use it; "
         "if it names a class of your own, add that class to TRUSTED_CLASSES.")


def locate(target: str) -> Any:
    """Import the longest importable module prefix of ``target`` and walk the remaining attributes."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


@functools.cache
def _defining_names() -> dict[str, str]:
    """``{"<module>.<qualname>": listed name}`` of every listed class that imports (the spelling a class reports)."""
    out: dict[str, str] = {}
    for name in TRUSTED_CLASSES:
        try:
            obj = locate(name)
        except (ImportError, AttributeError):
            continue  # a stale name: refused by check_target, caught by the list's own test
        if isinstance(obj, type):
            out[f"{obj.__module__}.{obj.__qualname__}"] = name
    return out


def is_trusted(target: Any) -> bool:
    """Whether ``target`` names a listed class (text comparison; imports only the listed classes' modules)."""
    if not isinstance(target, str):
        return False
    return target in TRUSTED_CLASSES or target in _defining_names()


def check_target(target: Any, where: str = "_target_") -> None:
    """Refuse a ``_target_`` that is not a trusted class (see the module docstring); ``where`` names its key."""
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{where}={target!r} is not a dotted class name; {_HINT}")
    if not is_trusted(target):
        raise ConfigError(f"{where}={target!r} is refused: {_HINT}")
    try:
        obj = locate(target)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}={target!r} is a trusted name but imports nothing ({type(e).__name__}: {e}); "
                          "the class moved: update meddiff.utils.safety.TRUSTED_CLASSES and meddiff.compat.") from e
    if not isinstance(obj, type):
        raise ConfigError(f"{where}={target!r} is not a class; {_HINT}")


def check_config_targets(cfg: Any, where: str = "config") -> None:
    """Check every ``_target_`` in a (nested) config: dicts, lists, OmegaConf containers. Raises on the first bad
    one, naming its key path (e.g. ``meddiff_config.model.net._target_``)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, DictConfig | ListConfig):
            cfg = OmegaConf.to_container(cfg, resolve=False)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            path = f"{where}.{key}"
            if key in _TARGET_KEYS:
                check_target(value, path)
            else:
                check_config_targets(value, path)
    elif isinstance(cfg, list | tuple):
        for i, value in enumerate(cfg):
            check_config_targets(value, f"{where}[{i}]")
