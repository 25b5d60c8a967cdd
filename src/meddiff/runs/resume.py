"""Resuming a run under its own config: ``python -m meddiff.train resume=<run_dir> [overrides]``.

Before Hydra composes anything, :func:`resume_argv` rewrites the command line: the run's own overrides (those of its
latest snapshot: ``<run_dir>/.hydra/overrides.yaml``, or ``<run_dir>/resume-<k>/overrides.yaml`` after earlier
resumes) are replayed, the new command-line overrides are applied on top (a new value for a key replaces the old
one), and ``ckpt_path`` (default ``checkpoints/last.ckpt``), ``hydra.run.dir=<run_dir>`` and
``hydra.output_subdir=resume-<k>`` are added, so the original ``.hydra/`` and ``config_resolved.yaml`` stay and each
resume writes its own snapshot. ``ckpt_path=<run_dir>/checkpoints/<x>.ckpt`` of a train run is the same as
``resume=<run_dir>`` continuing from that checkpoint.

Inside the run, :func:`check_resume_config` compares the composed config with the stored one (the latest snapshot's
``config_resolved.yaml``), logs the difference and writes it to ``resume-<k>/resume_diff.yaml``, and refuses a change
of the network (``net.*``), of ``schedule.prediction_type`` or of the model class unless ``+resume_force=true``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meddiff.errors import ConfigError

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "resume-"
RESOLVED_NAME = "config_resolved.yaml"
DIFF_NAME = "resume_diff.yaml"
#: overrides that belong to one launch only and are never replayed
LAUNCH_KEYS = ("resume", "ckpt_path", "resume_force")
#: keys whose change would not fit the weights or would change what the network predicts
PROTECTED = ("net", "model.net", "schedule.prediction_type", "model.schedule.prediction_type", "model._target_")
#: keys left out of the comparison (they name the launch, not the experiment)
NOT_COMPARED = ("resume", "ckpt_path", "resume_force")
#: groups whose values a resume takes from the run's stored config when today's YAMLs changed them (the training
#: recipe); data paths and devices (data, trainer, paths) follow this machine and are only reported
RESTORED_GROUPS = ("model", "net", "schedule")


# ------------------------------------------------------------------------------------------- run dir contents
def is_train_run(run_dir: Path) -> bool:
    return (run_dir / ".hydra" / "overrides.yaml").is_file() or (run_dir / RESOLVED_NAME).is_file()


def snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(k, resume-<k> folder)]`` in order, of every resume snapshot folder (complete or not)."""
    found = []
    for p in run_dir.glob(f"{SNAPSHOT_PREFIX}*"):
        m = re.fullmatch(rf"{re.escape(SNAPSHOT_PREFIX)}(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_snapshot(run_dir: Path) -> tuple[Path, Path]:
    """``(folder with config_resolved.yaml, folder with overrides.yaml)`` of the run's latest complete snapshot.

    A resume snapshot is complete once ``meddiff.train`` accepted the config (it writes ``config_resolved.yaml``
    after all checks): a refused resume leaves an incomplete ``resume-<k>/`` that is never replayed.
    """
    for _, p in reversed(snapshots(run_dir)):
        if (p / RESOLVED_NAME).is_file() and (p / "overrides.yaml").is_file():
            return p, p
    return run_dir, run_dir / ".hydra"


def next_snapshot_name(run_dir: Path) -> str:
    taken = [k for k, _ in snapshots(run_dir)]
    return f"{SNAPSHOT_PREFIX}{(max(taken) if taken else 0) + 1}"


def stored_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config the run last ran under (latest complete snapshot), or None when none was written."""
    folder, _ = latest_snapshot(run_dir)
    path = folder / RESOLVED_NAME
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


# ------------------------------------------------------------------------------------------ the command line
@dataclass(frozen=True)
class _Override:
    text: str
    key: str          # key or group, with its package: "net", "model.optimizer.lr", "data@x"
    kind: str         # "change" | "add" | "force_add" | "del"


def _parse(args: list[str]) -> list[_Override]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    kinds = {OverrideType.CHANGE: "change", OverrideType.ADD: "add", OverrideType.FORCE_ADD: "force_add",
             OverrideType.DEL: "del"}
    parsed = OverridesParser.create().parse_overrides(list(args))
    return [_Override(a, o.key_or_group + (f"@{o.package}" if o.package else ""), kinds[o.type])
            for a, o in zip(args, parsed)]


def _value_text(text: str) -> str:
    return text.split("=", 1)[1] if "=" in text else ""


def merge_overrides(old: list[str], new: list[str]) -> list[str]:
    """``old`` with ``new`` applied on top: a key in both keeps its place with the new value; new keys follow.

    A key that ``old`` added (``+k=v``) and ``new`` changes (``k=w``) stays an addition (``++k=w``); a key
    ``old`` added and ``new`` deletes (``~k``) disappears.
    """
    merged: dict[str, _Override] = {o.key: o for o in _parse(old)}
    for o in _parse(new):
        prev = merged.get(o.key)
        if prev is None:
            merged[o.key] = o
        elif o.kind == "del" and prev.kind in ("add", "force_add"):
            del merged[o.key]
        elif o.kind == "change" and prev.kind in ("add", "force_add"):
            merged[o.key] = _Override("++" + o.text, o.key, "force_add")
        else:
            merged[o.key] = o
    return [o.text for o in merged.values()]


def _args_dict(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))


def _is_null(value: str | None) -> bool:
    return value is None or value.strip().lower() in ("null", "none", "")


def _drop_keys(args: list[str], keys: tuple[str, ...]) -> list[str]:
    out = []
    for a in args:
        key = a.split("=", 1)[0].lstrip("+~")
        if key not in keys:
            out.append(a)
    return out


def resume_argv(argv: list[str], rank: int = 0) -> list[str]:
    """The command line that continues a run (see the module docstring); other command lines unchanged.

    ``rank`` > 0 (a DDP worker started by SLURM/torchrun) writes no snapshot (``hydra.output_subdir=null``).
    Raises :class:`ConfigError` naming the folder when it is not a run that can be continued.
    """
    args = _args_dict(argv)
    run_dir: Path | None = None
    ckpt: Path | None = None
    if not _is_null(args.get("resume")):
        run_dir = Path(args["resume"]).expanduser().resolve()
        if not run_dir.is_dir():
            raise ConfigError(f"resume={args['resume']}: no such folder; pass the run dir of a meddiff-train run "
                              "(logs/train/runs/<name>).")
        if not is_train_run(run_dir):
            raise ConfigError(f"resume={run_dir}: not a meddiff-train run dir (no .hydra/overrides.yaml).")
        if not _is_null(args.get("ckpt_path")):
            ckpt = Path(args["ckpt_path"]).expanduser().resolve()
        else:
            ckpt = run_dir / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                raise ConfigError(
                    f"resume={run_dir}: no checkpoints/last.ckpt in that folder (the run stopped before its first "
                    "checkpoint, or checkpointing was off); start it anew, or pass ckpt_path=<a .ckpt of it>.")
    elif not _is_null(args.get("ckpt_path")):
        path = Path(args["ckpt_path"]).expanduser().resolve()
        if path.parent.name == "checkpoints" and is_train_run(path.parent.parent) and "hydra.run.dir" not in args:
            run_dir, ckpt = path.parent.parent, path
    if run_dir is None:
        return list(argv)
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("resume= continues one run; it cannot be combined with -m/--multirun.")
    if "hydra.run.dir" in args and Path(args["hydra.run.dir"]).expanduser().resolve() != run_dir:
        raise ConfigError(f"resume={run_dir} continues that run in its own folder; drop hydra.run.dir=... "
                          f"({args['hydra.run.dir']}).")

    _, overrides_dir = latest_snapshot(run_dir)
    old: list[str] = []
    if (overrides_dir / "overrides.yaml").is_file():
        old = yaml.safe_load((overrides_dir / "overrides.yaml").read_text()) or []
    flags = [a for a in argv if a.startswith("-")]
    new = [a for a in argv if not a.startswith("-") and not a.startswith("hydra.")]
    hydra_args = [a for a in argv if a.startswith("hydra.") and not a.startswith(("hydra.run.dir=",
                                                                                  "hydra.output_subdir="))]
    merged = merge_overrides(_drop_keys(old, LAUNCH_KEYS), _drop_keys(new, ("resume", "ckpt_path")))
    check_replayed_overrides(old, overrides_dir / "overrides.yaml")
    check_replayed_overrides(merged, Path("the resumed command line"))
    subdir = next_snapshot_name(run_dir) if rank == 0 else "null"
    return [*flags, *merged, f"resume={_quote(run_dir)}", f"ckpt_path={_quote(ckpt)}", *hydra_args,
            f"hydra.run.dir={_quote(run_dir)}", f"hydra.output_subdir={subdir}"]


def check_replayed_overrides(overrides: list[str], source: Path) -> None:
    """Refuse, before Hydra starts, overrides that a run dir cannot legitimately hold: any ``hydra.*`` key (Hydra
    would build its callbacks, launcher or sweeper from them before meddiff sees the config) and any ``_target_``
    that is not a trusted class (:mod:`meddiff.utils.safety`). A :class:`ConfigError` naming the override and file."""
    from meddiff.utils.safety import check_target

    for text in overrides:
        if not isinstance(text, str):
            raise ConfigError(f"{source}: override {text!r} is not a string; this is not a meddiff run dir's file.")
        key, _, value = text.partition("=")
        key = key.lstrip("+~")
        if key == "hydra" or key.startswith("hydra.") or key.startswith("hydra/"):
            raise ConfigError(f"{source}: the replayed override {text!r} sets Hydra's own config; a run's "
                              "overrides.yaml never holds hydra.* keys (a copied or edited run dir?). Refused.")
        if key.split("@")[0].endswith("_target_"):
            check_target(value.strip().strip("'\""), f"{source}: {key}")


def check_resumed_config(cfg: dict[str, Any], run_dir: Path) -> None:
    """Every ``_target_`` of the composed config a resume is about to build (every group: data, schedule, net,
    model, callbacks, logger, trainer, ...) must be a trusted class."""
    from meddiff.utils.safety import check_config_targets

    check_config_targets(cfg, f"resume={run_dir}: config")


def _quote(path: Path) -> str:
    """A path as a Hydra override value (quoted when it holds characters the override grammar treats specially)."""
    text = str(path)
    if re.fullmatch(r"[\w./@:+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------------------------------- comparing configs
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def config_diff(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{dotted key: {"was": old, "now": new}}`` for every leaf that differs (missing = ``"<absent>"``)."""
    a, b = _flatten(stored), _flatten(current)
    diff = {}
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in NOT_COMPARED:
            continue
        was, now = a.get(key, "<absent>"), b.get(key, "<absent>")
        if was != now:
            diff[key] = {"was": was, "now": now}
    return diff


def command_line_keys(old: list[str], merged: list[str]) -> list[str]:
    """The keys (or groups) this launch set on its command line: the merged overrides that are not the run's own."""
    previous = set(old)
    return [o.key.split("@")[0].replace("/", ".") for o in _parse([a for a in merged if a not in previous])]


def restore_stored_values(cfg: Any, stored: dict[str, Any] | None, given: list[str]) -> dict[str, dict[str, Any]]:
    """Put the run's stored values back where today's YAMLs changed them since the run (``RESTORED_GROUPS`` only,
    values that exist in both; keys under ``given`` -- this launch's command line -- keep the new value). Changes
    ``cfg`` (an OmegaConf config) in place; returns ``{key: {"yaml": ignored value, "kept": stored value}}``."""
    from omegaconf import OmegaConf, open_dict

    if not stored:
        return {}
    current = OmegaConf.to_container(cfg, resolve=True)
    diff = config_diff(stored, current)
    restored: dict[str, dict[str, Any]] = {}
    # top-level groups first: model.net is ${net}, restoring net.* restores model.net.* with it
    for key in sorted(diff, key=lambda k: (k.startswith("model."), k)):
        was, now = diff[key]["was"], diff[key]["now"]
        if key.split(".")[0] not in RESTORED_GROUPS or "<absent>" in (was, now):
            continue
        if any(key == g or key.startswith(g + ".") for g in given):
            continue
        if OmegaConf.select(cfg, key) == was or _through_interpolation(cfg, key):
            continue  # follows the key it interpolates (model.net: ${net}): restored there or given there
        with open_dict(cfg):
            OmegaConf.update(cfg, key, was, merge=False)
        restored[key] = {"yaml": now, "kept": was}
    if restored:
        lines = "\n".join(f"  {k}: {v['kept']!r} (today's YAML: {v['yaml']!r})" for k, v in restored.items())
        log.warning("The configs changed since this run started; the run continues with its own values (give a key "
                    "on the command line to change it):\n%s", lines)
    return restored


def _through_interpolation(cfg: Any, key: str) -> bool:
    """Whether ``key`` or one of its parents is an interpolation in ``cfg`` (its value is another key's)."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        if OmegaConf.is_interpolation(node, part):
            return True
        node = node._get_node(part)
    return False


def protected_changes(diff: dict[str, Any]) -> list[str]:
    return [k for k in diff if any(k == p or k.startswith(p + ".") for p in PROTECTED)]


def check_resume_config(stored: dict[str, Any] | None, current: dict[str, Any], run_dir: Path, snapshot: Path,
                        force: bool, yaml_ignored: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Log and record (``<snapshot>/resume_diff.yaml``) how ``current`` differs from the run's stored config; a
    :class:`ConfigError` naming the keys when the network, the prediction type or the model class would change
    (unless ``force``). Returns the difference."""
    from meddiff.utils.io import atomic_write_text

    if stored is None:
        log.warning("Resuming %s: the run stored no %s; the config cannot be compared.", run_dir, RESOLVED_NAME)
        return {}
    diff = config_diff(stored, current)
    if diff:
        lines = "\n".join(f"  {k}: {v['was']!r} -> {v['now']!r}" for k, v in diff.items())
        log.warning("Resuming %s with %d config change(s) (recorded in %s):\n%s", run_dir, len(diff),
                    snapshot / DIFF_NAME, lines)
    else:
        log.info("Resuming %s under its own config (no changes).", run_dir)
    bad = protected_changes(diff)
    shown = [k for k in bad if not (k.startswith("model.") and k[len("model."):] in bad)]  # model.net = ${net}
    if bad and not force:
        raise ConfigError(
            f"resume={run_dir} would change {', '.join(shown)} (the network, prediction type or model class the "
            "checkpoint was trained with): the weights would not fit or would change meaning. Start a new run, or "
            "add +resume_force=true if you mean it.")
    if bad:
        log.warning("+resume_force=true: continuing with changed %s.", ", ".join(shown))
    snapshot.mkdir(parents=True, exist_ok=True)
    record = {"changes": diff, "forced": bool(bad and force), "yaml_changes_ignored": yaml_ignored or {}}
    atomic_write_text(snapshot / DIFF_NAME, yaml.safe_dump(record, sort_keys=False))
    return diff
