"""Stored configs from older meddiff versions, translated on load (never kept as config aliases).

A checkpoint or run dir carries the config it was trained with. When code moves (a class to another module) or an
option is renamed, the stored config names the old place; :func:`translate_stored_config` rewrites it to today's
names *before* the trust check (:mod:`meddiff.utils.safety`) and instantiation, so old files keep loading while the
configs and code carry one name only.

- :data:`MOVED_TARGETS`: old ``_target_`` -> new ``_target_`` (a class that moved);
- :data:`KEY_TRANSLATORS`: functions ``(cfg: dict) -> None`` that rewrite renamed option keys in place (e.g. an old
  model option spelling to today's ``model.sampling``); each must be a no-op on a current config.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from meddiff.errors import ConfigError

__all__ = ["KEY_TRANSLATORS", "MOVED_TARGETS", "translate_adni_split_options", "translate_sampling_keys",
           "translate_stored_config"]

#: old ``_target_`` -> its current dotted path (add a row when a class a config can name moves)
MOVED_TARGETS: dict[str, str] = {
    # the data layout of issue 15: DataModules moved into meddiff.data.modules
    "meddiff.data.mnist_splotch.MNISTSplotchDataModule": "meddiff.data.modules.mnist_splotch.MNISTSplotchDataModule",
    "meddiff.data.rsna_ct.RSNACTDataModule": "meddiff.data.modules.rsna_ct.RSNACTDataModule",
    "meddiff.data.hdf5_patches.HDF5PatchDataModule": "meddiff.data.modules.hdf5_patches.HDF5PatchDataModule",
    "meddiff.data.adni_slices.ADNISliceDataModule": "meddiff.data.modules.adni.datamodule.ADNISliceDataModule",
    "meddiff.data.image_folder.ImageFolderAnomalyDataModule":
        "meddiff.data.modules.image_folder.ImageFolderAnomalyDataModule",
    # the run wing moved out of utils/ and sweeps/ (runs/, callbacks/)
    "meddiff.utils.checkpoint.LastCheckpoint": "meddiff.callbacks.LastCheckpoint",
    "meddiff.utils.hydra_utils.StoreConfigInCheckpoint": "meddiff.callbacks.StoreConfigInCheckpoint",
    "meddiff.utils.csv_history.CSVHistoryLogger": "meddiff.runs.csv_history.CSVHistoryLogger",
    "meddiff.sweeps.callback.SweepSummary": "meddiff.runs.sweep.callback.SweepSummary",
    # the demo's LR schedule: a function returning a LambdaLR became a class (issue 20: stored configs build classes)
    "meddiff.models.base.warmup_cosine": "meddiff.models.lr_schedules.WarmupCosineLR",
}

#: ADNI split options of meddiff <= 0.1.0 -> today's names (the DataModule no longer accepts the old ones)
ADNI_RENAMED_OPTIONS: dict[str, str] = {"val_frac": "val_fraction", "test_frac": "test_fraction", "split_seed": "seed"}
#: the DataModule's defaults of those options: a stored new name at its default yields to the old one (as 0.1.0 did)
_ADNI_DEFAULTS: dict[str, Any] = {"val_fraction": 0.1, "test_fraction": 0.2, "seed": 0}
_ADNI_DATAMODULE = "meddiff.data.modules.adni.datamodule.ADNISliceDataModule"


def _walk_targets(node: Any, target: str) -> list[MutableMapping[str, Any]]:
    """Every mapping inside ``node`` whose ``_target_`` is ``target``."""
    found: list[MutableMapping[str, Any]] = []
    if isinstance(node, MutableMapping):
        if node.get("_target_") == target:
            found.append(node)
        for value in node.values():
            found.extend(_walk_targets(value, target))
    elif isinstance(node, list):
        for value in node:
            found.extend(_walk_targets(value, target))
    return found


def translate_adni_split_options(cfg: MutableMapping[str, Any]) -> None:
    """``val_frac`` / ``test_frac`` / ``split_seed`` of a stored ADNI data config -> ``val_fraction`` /
    ``test_fraction`` / ``seed`` (runs after the target rows, so it sees the current ADNI path).

    As meddiff 0.1.0 did, the old key wins over a new name stored at its default (a composed config carries the
    defaults of ``configs/data``).

    Raises:
        ConfigError: an old key and its new name at another value both stored (0.1.0 refused such a config too).
    """
    for node in _walk_targets(cfg, _ADNI_DATAMODULE):
        for old, new in ADNI_RENAMED_OPTIONS.items():
            if old not in node:
                continue
            value = node.pop(old)
            if new in node and node[new] != value and node[new] != _ADNI_DEFAULTS[new]:
                raise ConfigError(f"the stored data config has {old}={value!r} and {new}={node[new]!r}; they "
                                  f"name one option ({old} is its old name): fix the stored config or retrain.")
            node[new] = value



# ---------------------------------------------------------------------------------------- model.sampling (0.1 keys)
#: ``model.recon`` / ``model.val_recon`` field -> ``model.sampling`` field (partial-diffusion models)
_RECON_FIELDS = {"method": "sampler", "num_steps": "steps", "n_noise": "draws"}
#: top-level sampling keys of the conditional (denoising) model -> ``model.sampling`` field
_CONDITIONAL_FIELDS = {"sampler": "sampler", "sample_steps": "steps", "eta": "eta", "timestep_spacing": "spacing",
                       "clip_sample": "clip", "num_samples": "draws", "sample_seed": "seed"}
#: top-level sampling keys of the refiner -> ``model.sampling`` field
_REFINER_FIELDS = {"sampler": "sampler", "num_steps": "steps", "eta": "eta", "t_start": "t_start",
                   "timestep_spacing": "spacing", "sample_seed": "seed"}


def _renamed(section: Any, names: dict[str, str]) -> Any:
    if not isinstance(section, MutableMapping):
        return section
    return {names.get(k, k): v for k, v in section.items()}


def translate_sampling_keys(cfg: MutableMapping[str, Any]) -> None:
    """meddiff 0.1's four spellings of sampling settings -> ``model.sampling`` / ``model.val_sampling`` /
    ``model.val_batches`` (in place; a no-op on a current config):

    - ``model.recon`` (partial diffusion) -> ``sampling`` (``method`` -> ``sampler``, ``num_steps`` -> ``steps``,
      ``n_noise`` -> ``draws``), ``model.val_recon`` -> ``val_sampling``; ``recon: null`` (guided / conditional
      checkpoints of 0.1) is dropped;
    - ``model.translate`` (guided) -> ``sampling`` (``num_steps`` -> ``steps``, sampler ``ddim``),
      ``val_score_batches`` -> ``val_batches``;
    - ``model.{sampler, sample_steps, eta, timestep_spacing, clip_sample, num_samples, sample_seed}`` (conditional)
      -> ``sampling``; ``val_psnr_batches`` -> ``val_batches``; ``val_sample_steps`` -> ``val_sampling`` (the DDIM,
      eta 0, one-draw pass validation always ran);
    - ``model.{sampler, num_steps, eta, t_start, timestep_spacing, sample_seed}`` (refiner) -> ``sampling``;
      ``val_num_steps`` -> ``val_sampling.steps``; ``val_score_batches`` -> ``val_batches``.
    """
    model = cfg.get("model")
    if not isinstance(model, MutableMapping) or "sampling" in model:
        return
    if "recon" in model:
        recon = model.pop("recon")
        if recon is not None:
            model["sampling"] = _renamed(recon, _RECON_FIELDS)
        if model.get("val_recon") is not None:
            model["val_sampling"] = _renamed(model.pop("val_recon"), _RECON_FIELDS)
        model.pop("val_recon", None)
    if "translate" in model:
        translate = _renamed(model.pop("translate"), {"num_steps": "steps"})
        model["sampling"] = {"sampler": "ddim", **(translate or {})}
        if "val_score_batches" in model:
            model["val_batches"] = model.pop("val_score_batches")
    elif "sample_steps" in model or "val_psnr_batches" in model or "val_sample_steps" in model:
        model["sampling"] = {new: model.pop(old) for old, new in _CONDITIONAL_FIELDS.items() if old in model}
        if "val_psnr_batches" in model:
            model["val_batches"] = model.pop("val_psnr_batches")
        if "val_sample_steps" in model:
            model["val_sampling"] = {"sampler": "ddim", "steps": model.pop("val_sample_steps"), "eta": 0.0,
                                     "draws": 1}
    elif "residual_scale" in model and any(k in model for k in (*_REFINER_FIELDS, "val_num_steps")):
        model["sampling"] = {new: model.pop(old) for old, new in _REFINER_FIELDS.items() if old in model}
        val_steps = model.pop("val_num_steps", None)
        if val_steps is not None:
            model["val_sampling"] = {"steps": val_steps}
        if "val_score_batches" in model:
            model["val_batches"] = model.pop("val_score_batches")


#: in-place rewrites of renamed option keys in a whole stored config, applied in order
KEY_TRANSLATORS: list[Callable[[MutableMapping[str, Any]], None]] = [translate_adni_split_options,
                                                                     translate_sampling_keys]


def _retarget(node: Any) -> None:
    if isinstance(node, MutableMapping):
        target = node.get("_target_")
        if isinstance(target, str) and target in MOVED_TARGETS:
            node["_target_"] = MOVED_TARGETS[target]
        for value in node.values():
            _retarget(value)
    elif isinstance(node, list):
        for value in node:
            _retarget(value)


def translate_stored_config(cfg: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``cfg`` (plain dicts/lists, changed in place and returned) with moved targets and renamed keys of older
    meddiff versions rewritten to today's spelling."""
    _retarget(cfg)
    for translate in KEY_TRANSLATORS:
        translate(cfg)
    return cfg
