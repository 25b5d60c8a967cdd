"""What a run is called and which keys its sweep varies.

- name: ``<experiment>/<k=v,...>`` from Hydra's task overrides with shortened keys, e.g. ``demo/lr=3e-4,t_start=400``
  (in a sweep only the swept keys; in a single run every override that changes the model, data or training).
- group: ``<experiment>`` for a single run, ``<experiment>/<sweep id>`` for the jobs of a sweep (sweep id = the
  sweep dir's name: its timestamp, or the study name of an Optuna sweep, so a resumed study keeps its group).
- tags: the experiment's ``tags`` + the swept keys.

The swept keys are known only to the process that starts the sweep (a job sees its own concrete values), so the
Hydra callback writes them to ``<sweep_dir>/sweep.json`` before any job runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from meddiff.utils.io import atomic_write_json

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
# overrides that say where or how a run is logged, not what it is: never part of a run's name or hparams
NOT_IDENTITY = ("experiment", "hparams_search", "logger", "callbacks", "paths", "hydra", "launcher", "ckpt_path",
                "resume", "tags", "debug", "torch_threads", "evaluate", "train")
MAX_NAME = 128  # wandb display names and groups beyond this are cut in the UI


@dataclass
class RunIdentity:
    """How one run presents itself to loggers and tables."""

    experiment: str
    name: str
    group: str
    tags: list[str]
    overrides: dict[str, str]            # the job's task overrides, key -> value text
    swept: list[str] = field(default_factory=list)  # swept keys (full dotted), empty outside a sweep
    sweep_dir: str | None = None
    job_num: int | None = None

    @property
    def hparams(self) -> dict[str, str]:
        """The experiment and the values that tell this run apart (swept keys in a sweep, identity overrides
        otherwise): TensorBoard hparams."""
        keys = self.swept or [k for k in self.overrides if is_identity_key(k)]
        return {"experiment": self.experiment, **{k: self.overrides[k] for k in keys if k in self.overrides}}


def is_identity_key(key: str) -> bool:
    root = key.lstrip("+~").split(".", 1)[0]
    return root not in NOT_IDENTITY


def parse_override_lines(lines: list[str] | None) -> dict[str, str]:
    """``["model.optimizer.lr=0.0003", "+x=1", "net=unet_tiny"]`` -> ``{"model.optimizer.lr": "0.0003", ...}``.

    Keys lose their ``+``/``++``/``~`` prefix; values keep their command-line text.
    """
    out: dict[str, str] = {}
    for line in lines or []:
        key, sep, value = str(line).partition("=")
        out[key.lstrip("+~")] = value if sep else "null"
    return out


def swept_keys(overrides: list[str] | None, sweeper_params: dict[str, Any] | None = None) -> list[str]:
    """Keys a multirun varies: command-line sweeps (``a=1,2``, ``choice(...)``, ``range``, ``interval``) and the
    sweeper's ``params`` (Optuna search space, or the basic sweeper's ``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [str(o) for o in overrides or []]
    lines += [f"{k}={v}" for k, v in (sweeper_params or {}).items()]
    keys: list[str] = []
    for o in OverridesParser.create().parse_overrides(lines):
        key = o.key_or_group
        if o.is_sweep_override() and key not in keys:
            keys.append(key)
    return keys


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that is unique among ``keys`` (``model.optimizer.lr`` -> ``lr``)."""
    parts = {k: k.split(".") for k in keys}
    out: dict[str, str] = {}
    for k, p in parts.items():
        for n in range(1, len(p) + 1):
            cand = ".".join(p[-n:])
            if sum(".".join(q[-n:]) == cand for q in parts.values() if len(q) >= n) == 1:
                out[k] = cand
                break
        else:
            out[k] = k
    return out


def short_value(text: str) -> str:
    """Compact number text: ``0.0003`` -> ``3e-4``, ``0.0012345678`` -> ``0.00123``; anything else unchanged."""
    try:
        x = float(text)
    except (TypeError, ValueError):
        return str(text)
    if text.strip().lstrip("-").isdigit() or x == 0 or x != x:
        return str(text)
    fixed = f"{x:.3g}"
    mant, _, exp = f"{x:.2e}".partition("e")
    sci = f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return sci if len(sci) < len(fixed) else fixed


def format_overrides(values: dict[str, str]) -> str:
    short = short_keys(list(values))
    return ",".join(f"{short[k]}={short_value(v)}" for k, v in values.items())


def experiment_name(cfg: DictConfig | dict, choices: dict[str, Any] | None = None) -> str:
    name = cfg.get("experiment_name") if hasattr(cfg, "get") else None
    if not name and choices:
        name = choices.get("experiment")
    return str(name or cfg.get("task_name") or "run")


def write_sweep_info(sweep_dir: str | Path, info: dict[str, Any]) -> Path:
    return atomic_write_json(Path(sweep_dir) / SWEEP_FILE, info)


def read_sweep_info(sweep_dir: str | Path | None) -> dict[str, Any]:
    if sweep_dir is None:
        return {}
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def run_identity(cfg: DictConfig) -> RunIdentity:
    """The identity of the running Hydra job (works outside Hydra too: then name = group = experiment)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    tags = [str(t) for t in (cfg.get("tags") or [])]
    if not HydraConfig.initialized():
        exp = experiment_name(cfg)
        return RunIdentity(exp, exp, exp, tags, {})
    hc = HydraConfig.get()
    choices = OmegaConf.to_container(hc.runtime.choices) if hc.runtime.get("choices") else {}
    exp = experiment_name(cfg, choices)
    overrides = parse_override_lines(list(hc.overrides.task))
    multirun = hc.mode == RunMode.MULTIRUN
    swept: list[str] = []
    sweep_dir = job_num = None
    if multirun:
        sweep_dir = str(hc.sweep.dir)
        job_num = int(hc.job.num)
        info = read_sweep_info(sweep_dir)
        swept = [k for k in info.get("swept", []) if k in overrides]
    shown = {k: overrides[k] for k in (swept or [k for k in overrides if is_identity_key(k)])}
    name = f"{exp}/{format_overrides(shown)}" if shown else exp
    group = f"{exp}/{Path(sweep_dir).name}" if sweep_dir else exp
    for k in swept:
        if k not in tags:
            tags.append(k)
    return RunIdentity(exp, name[:MAX_NAME], group[:MAX_NAME], [t[:64] for t in tags], overrides, swept,
                       sweep_dir, job_num)
