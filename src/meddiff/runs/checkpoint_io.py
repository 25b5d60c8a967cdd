"""Checkpoint files you can trust: loaded weights-only, written atomically and verified.

Loading (:func:`load_checkpoint`): ``torch.load(weights_only=True)`` only, so a file from elsewhere cannot run code
(a pickled ``__reduce__`` payload is refused, not executed). Checkpoints written by meddiff 0.1 hold OmegaConf
containers; the exact OmegaConf/typing classes they need (:data:`LEGACY_SAFE_GLOBALS`, rebuilt by setting
attributes only) are allowed for that one load. An empty, truncated, foreign or unsafe file is a
:class:`~meddiff.errors.DataError` naming it. The config stored in a checkpoint (:func:`stored_config`) is translated
from older versions (:mod:`meddiff.compat`) and passes the trusted-class list of :mod:`meddiff.utils.safety` before
anything is built from it.

Saving (:class:`AtomicCheckpointIO`, the Trainer's checkpoint IO in ``meddiff.train``): every checkpoint Lightning
writes (``last.ckpt``, the best one, SLURM's ``hpc_ckpt_*.ckpt``) is first turned into plain containers, written to
a temporary file, re-opened and checked (keys, every state-dict tensor), and only then renamed over the target with
:func:`meddiff.utils.io.atomic_write`: a crash mid-save leaves the previous checkpoint intact. Trainer resume
(``trainer.fit(ckpt_path=...)``) reads through the same IO, hence through :func:`load_checkpoint`.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import pickle
import typing
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from meddiff.compat import translate_stored_config
from meddiff.errors import ConfigError, DataError
from meddiff.utils.io import atomic_write
from meddiff.utils.safety import check_config_targets

log = logging.getLogger(__name__)

#: key of the experiment config (data, schedule, net, model, eval) stored in every checkpoint meddiff-train writes
CKPT_CONFIG_KEY = "meddiff_config"
LAST_NAME = "last.ckpt"


def _legacy_safe_globals() -> list[Any]:
    """The globals a meddiff 0.1 checkpoint (OmegaConf containers in its hyper-parameters) needs, and no more.

    Each is rebuilt from plain data (``__setstate__`` / dataclass fields), none calls anything from the file.
    """
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, collections.defaultdict, dict, list, int,
            typing.Any]


LEGACY_SAFE_GLOBALS = _legacy_safe_globals()


# ----------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint weights-only. Missing file: :class:`ConfigError`; empty, truncated, foreign or
    unsafe file: :class:`DataError` naming it. ``mmap=True`` maps tensor data instead of reading it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"Checkpoint {path} does not exist; pass a .ckpt written by meddiff-train "
                          "(<run_dir>/checkpoints/last.ckpt or the best one beside it).")
    if path.stat().st_size == 0:
        raise DataError(f"Checkpoint {path} is empty (0 bytes): its write never completed. Use another checkpoint "
                        "(e.g. the best one beside it) or retrain.")
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if text.startswith("Weights only load failed"):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "WeightsUnpickler" in ln),
                          lines[-1] if lines else "")
            raise DataError(
                f"Checkpoint {path} holds objects other than tensors and plain containers ({detail}); "
                "meddiff refuses to load it because unpickling them could run code. Checkpoints written by "
                "meddiff-train never need that: if this file is not yours, do not use it."
            ) from e
        raise DataError(f"Checkpoint {path} is corrupt (not a readable torch file: {text.splitlines()[0]}).") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"Checkpoint {path} is truncated or not a torch checkpoint ({type(e).__name__}: {first}). "
                        "Use another checkpoint (e.g. the best one beside it) or retrain.") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise DataError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry; it holds "
                        f"{type(ckpt).__name__}{' with keys ' + str(sorted(ckpt)[:8]) if isinstance(ckpt, dict) else ''}).")
    return ckpt


def stored_config(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The experiment config stored in a checkpoint, as plain containers, after the target allow-list check."""
    if CKPT_CONFIG_KEY not in ckpt:
        raise DataError(f"{path} holds no meddiff config (key {CKPT_CONFIG_KEY!r}); it was not written by "
                        "meddiff-train. Rebuild the model from your experiment config and load its state_dict.")
    cfg = plain_containers(ckpt[CKPT_CONFIG_KEY])
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: the stored config {CKPT_CONFIG_KEY!r} is a {type(cfg).__name__}, not a mapping.")
    translate_stored_config(cfg)  # older versions' moved targets / renamed keys -> today's, before the trust check
    check_config_targets(cfg, f"{Path(path).name}:{CKPT_CONFIG_KEY}")
    return cfg


def plain_containers(obj: Any) -> Any:
    """``obj`` with every OmegaConf container (anywhere inside dicts/lists/tuples) turned into plain dicts/lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: plain_containers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain_containers(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(plain_containers(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------------------ saving
def verify_checkpoint(path: str | Path, expected_state_keys: set[str], name: str | Path | None = None) -> None:
    """Re-open a written checkpoint (weights-only, tensor data mapped) and check that every state-dict tensor is
    there; a :class:`DataError` naming ``name`` (default: ``path``) otherwise."""
    name = name or path
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except (DataError, ConfigError) as e:
        raise DataError(f"Saving checkpoint {name} failed verification: {e}") from e
    missing = expected_state_keys - set(ckpt["state_dict"])
    if missing:
        raise DataError(f"Saving checkpoint {name} failed verification: {len(missing)} state-dict entries missing "
                        f"(e.g. {sorted(missing)[:3]}).")


def tensor_bytes(obj: Any) -> int:
    """Bytes of tensor data in a (nested) checkpoint dict: what a save needs on disk, give or take the pickle."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _free_bytes(folder: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _no_space(path: Path, need: int, free: int | None) -> DataError:
    mb = 1024 * 1024
    have = "" if free is None else f", {free / mb:.0f} MB free"
    return DataError(f"No space left on {path.parent} to save {path.name}: need ~{need / mb:.0f} MB{have}. Free space "
                     "there (old runs, temporary files) or choose another run dir; the previous checkpoint is kept.")


def save_checkpoint_file(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temp file, fsync, verify, rename); plain containers only.

    A disk without room for it is a :class:`DataError` saying so ("no space left on <folder>: need ~X MB"), checked
    before writing and after a failed write (torch reports a full disk as an unrelated ``unexpected pos ...``)."""
    checkpoint = plain_containers(checkpoint)
    expected = set(checkpoint.get("state_dict", {}))
    path = Path(path)
    need = tensor_bytes(checkpoint) + (1 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = _free_bytes(path.parent)
    if free is not None and free < need:
        raise _no_space(path, need, free)

    def _write(tmp: Path) -> None:
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        verify_checkpoint(tmp, expected, name=path)

    try:
        return atomic_write(path, _write)
    except (OSError, RuntimeError, DataError) as e:
        free = _free_bytes(path.parent)  # the temp file is gone again: is the disk (nearly) full?
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (free is not None and free < need):
            raise _no_space(path, need, free) from e
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, atomic and verified on save, weights-only and checked on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options.")
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always True here, whatever the caller asks: the file may come from anywhere
        ckpt = load_checkpoint(path, map_location=map_location or "cpu")
        if CKPT_CONFIG_KEY in ckpt:
            stored_config(ckpt, path)  # the allow-list check, also on trainer resume
        return ckpt


# ---------------------------------------------------------------------------------------------- finding
def newest_checkpoint(candidates: list[Path]) -> Path | None:
    """Of the readable checkpoints among ``candidates``, the one with the highest global step (unreadable ones are
    skipped with a warning)."""
    best: tuple[int, float, Path] | None = None
    for p in candidates:
        if not p.is_file():
            continue
        try:
            step = int(load_checkpoint(p, mmap=True).get("global_step", 0))
        except (DataError, ConfigError) as e:
            log.warning("Skipping unreadable checkpoint: %s", e)
            continue
        key = (step, p.stat().st_mtime, p)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def check_weights_fit(model: torch.nn.Module, ckpt: dict[str, Any], path: str | Path, strict: bool = True) -> None:
    """Refuse, before anything is written, a checkpoint whose weights do not fit ``model``: one
    :class:`ConfigError` listing the missing and unexpected keys (``strict``) and the shape mismatches."""
    stored = ckpt.get("state_dict") or {}
    own = model.state_dict()
    missing = sorted(set(own) - set(stored)) if strict else []
    unexpected = sorted(set(stored) - set(own)) if strict else []
    shapes = [f"{k}: checkpoint {tuple(stored[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(stored))
              if hasattr(stored[k], "shape") and hasattr(own[k], "shape") and stored[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return

    def _few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    parts = [f"{len(missing)} missing key(s): {_few(missing)}" if missing else "",
             f"{len(unexpected)} unexpected key(s): {_few(unexpected)}" if unexpected else "",
             f"{len(shapes)} shape mismatch(es): {_few(shapes)}" if shapes else ""]
    raise ConfigError(
        f"The weights in {path} do not fit the model this config builds ({'; '.join(p for p in parts if p)}). "
        "Nothing was changed on disk. Resume with the network the run was trained with (drop the net/model "
        "overrides), or start a new run.")
