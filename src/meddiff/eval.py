"""Hydra entry point: ``python -m meddiff.eval ckpt_path=...`` (console script ``meddiff-eval``).

The experiment config (data, schedule, net, model, eval) is read back from the checkpoint, so any checkpoint
evaluates with no other argument; ``+data.*`` / ``+model.*`` / ``+eval.*`` overrides on the command line take
precedence (e.g. ``+data.root=/other/data`` or ``+model.sampling.t_start=400``). ``+net.*`` / ``+schedule.*`` overrides
must fit the trained weights: a net change whose weights do not load, and any change of the noise schedule or
prediction type (what the weights were trained to compute), is a ConfigError naming the keys; sampling options
(``model.sampling.*``: ``t_start``, ``steps`` respacing, ...) are the way to change how the model is used.

Checkpoints are untrusted input: they load weights-only and their stored config may instantiate only the targets of
``meddiff.utils.safety`` (``meddiff.runs.checkpoint_io``). The model's ``eval_protocol`` names the protocol
(``meddiff.protocols``: ``anomaly``, ``denoise``, ``guided``, ...), which writes ``report.json``, ``metrics.csv`` and
its figures into the run dir; the checkpoint path is recorded in ``report.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from meddiff.errors import ConfigError, DataError
from meddiff.protocols import get_protocol
from meddiff.protocols.base import record_checkpoint
from meddiff.runs.checkpoint_io import load_checkpoint, stored_config
from meddiff.runs.resolvers import register_resolvers
from meddiff.utils.options import as_dict
from meddiff.utils.safety import check_config_targets

log = logging.getLogger("meddiff.eval")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


#: parts of the stored config that the weights were trained with (overrides must fit them)
TRAINED_PARTS = ("net", "schedule")
#: eval presets (``configs/eval/<name>.yaml``) whose name is not the protocol whose options they hold
PRESET_PROTOCOL = {"default": "anomaly"}


def model_protocol(ckpt_path: str | Path) -> tuple[str | None, str]:
    """``(eval_protocol, model class path)`` of the model a checkpoint's stored config builds (trust-checked; the
    class is imported, nothing is built)."""
    from meddiff.utils.safety import locate

    path = Path(ckpt_path).expanduser()
    target = str((stored_config(load_checkpoint(path, mmap=True), path).get("model") or {}).get("_target_", ""))
    return getattr(locate(target), "eval_protocol", None), target


def check_eval_preset(preset: str | None, protocol: str | None, model: str, ckpt_path: str | Path) -> None:
    """An ``eval=<preset>`` of another protocol than the model's is a :class:`ConfigError` naming both and the preset
    to use (instead of an interpolation error deep inside the preset)."""
    if preset is None or protocol is None or PRESET_PROTOCOL.get(preset, preset) == protocol:
        return
    right = next((name for name, proto in PRESET_PROTOCOL.items() if proto == protocol), protocol)
    raise ConfigError(
        f"eval={preset} holds the options of the {PRESET_PROTOCOL.get(preset, preset)!r} protocol, but the model in "
        f"{ckpt_path} ({model}) is evaluated by the {protocol!r} protocol (its eval_protocol). Use eval={right}, or "
        "leave eval= out: the checkpoint carries the eval options it was trained with (change single ones with "
        "+eval.<key>=...).")


def load_from_checkpoint(ckpt_path: str | Path, overrides: DictConfig | None = None) -> tuple[L.LightningModule, DictConfig]:
    """Rebuild the model from the config stored in the checkpoint and load its weights (EMA included).

    The file is read weights-only and its config passes the target allow-list before anything is built.
    ``overrides`` are merged on top; ``net``/``schedule`` overrides also apply to the model's own copy of them and
    must fit the weights (see the module docstring).
    """
    path = Path(ckpt_path).expanduser()
    ckpt = load_checkpoint(path)
    cfg = OmegaConf.create(stored_config(ckpt, path))
    changed: list[str] = []
    if overrides is not None:
        overrides = _with_model_copies(OmegaConf.create(overrides))
        changed = _changed_trained_keys(cfg, overrides)
        trained = {k: OmegaConf.select(cfg, k, default="<absent>") for k in changed}
        cfg = OmegaConf.merge(cfg, overrides)
        check_config_targets(OmegaConf.to_container(cfg, resolve=False), "config with overrides")
        not_net = [k for k in changed if not k.startswith("net.")]
        if not_net:
            raise ConfigError(
                f"{', '.join(f'{k}={OmegaConf.select(cfg, k, default=None)!r}' for k in not_net)} does not fit the "
                f"weights in {path}: they were trained with {', '.join(f'{k}={trained[k]!r}' for k in not_net)}. "
                "Under another noise schedule, prediction type or model class the network would compute something "
                "it was never trained for. Change how it samples instead (+model.sampling.t_start=..., "
                "+model.sampling.steps=..., +eval.t_start=[...]).")
    model = hydra.utils.instantiate(cfg.model)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[:4])
        if changed:
            raise ConfigError(f"{', '.join(changed)} do not fit the weights in {path} ({detail}). Drop these "
                              "overrides: the network must be the one the checkpoint was trained with.") from e
        raise DataError(f"The weights in {path} do not fit the model its own config builds ({detail}).") from e
    if changed:
        log.warning("Evaluating %s with changed %s: the weights load, but they were trained with the stored values.",
                    path, ", ".join(changed))
    return model, cfg


def _with_model_copies(overrides: DictConfig) -> DictConfig:
    """``net``/``schedule`` overrides also for ``model.net``/``model.schedule``: the stored model config holds its own
    resolved copies of them (``model.net: ${net}`` was resolved when the checkpoint was written)."""
    extra = {part: overrides[part] for part in TRAINED_PARTS if part in overrides}
    if not extra:
        return overrides
    return OmegaConf.merge(overrides, {"model": extra})


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def _changed_trained_keys(stored: DictConfig, overrides: DictConfig) -> list[str]:
    """Keys under net / schedule / model.net / model.schedule / model._target_ whose override differs from the
    stored value (the model's copies are reported under their top-level name)."""
    ov = OmegaConf.to_container(overrides, resolve=True)
    st = OmegaConf.to_container(stored, resolve=True)
    changed: list[str] = []
    model_ov = ov.get("model", {}) if isinstance(ov.get("model"), dict) else {}
    model_st = st.get("model", {}) if isinstance(st.get("model"), dict) else {}
    for part in TRAINED_PARTS:
        for source, base in ((ov.get(part), st.get(part)), (model_ov.get(part), model_st.get(part))):
            if source is None:
                continue
            stored_flat = _flat(base if isinstance(base, dict) else {}, part)
            for key, value in _flat(source, part).items():
                if stored_flat.get(key, "<absent>") != value and key not in changed:
                    changed.append(key)
    if "_target_" in model_ov and model_ov["_target_"] != model_st.get("_target_"):
        changed.append("model._target_")
    return changed


def evaluate_checkpoint(
    ckpt_path: str | Path | None,
    out_dir: str | Path,
    eval_cfg: Any = None,
    model: L.LightningModule | None = None,
    datamodule: L.LightningDataModule | None = None,
    overrides: DictConfig | None = None,
    loggers: list | None = None,
    device: str | torch.device | None = None,
    checkpoint_rule: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or an in-memory model) with its protocol; write the report and figures to ``out_dir``.

    ``eval_cfg`` (default: the checkpoint's ``eval``) holds the protocol's options; ``checkpoint_rule`` (how the
    checkpoint was chosen, e.g. by ``meddiff.train``) is recorded as ``report["checkpoint_rule"]``; returns the
    report.
    """
    out_dir = Path(out_dir)
    cfg = None
    if model is None:
        model, cfg = load_from_checkpoint(ckpt_path, overrides)
        if eval_cfg is None:
            eval_cfg = cfg.get("eval")
    if datamodule is None:
        if cfg is None:
            raise ConfigError("evaluate_checkpoint needs a datamodule when no checkpoint config is available.")
        datamodule = hydra.utils.instantiate(cfg.data)
    run = get_protocol(getattr(model, "eval_protocol", None))  # an unknown name fails before any data work
    options = as_dict(eval_cfg)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    _prepare(datamodule, single_input=bool(options.get("input")))
    report = run(model, datamodule, options, out_dir, device)
    report["checkpoint_rule"] = checkpoint_rule or ("given (ckpt_path)" if ckpt_path else "in-memory weights")
    record_checkpoint(report, out_dir, ckpt_path)
    _log_summary(loggers, report, out_dir)
    return report


def _prepare(datamodule: L.LightningDataModule, single_input: bool) -> None:
    """Prepare and set up the data for every split; with ``eval.input`` (one given volume to translate) missing
    training data is only a warning."""
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.setup("test")
    except DataError:
        if not single_input:
            raise
        # translating one given volume needs only the data settings, not the training data
        log.warning("Training data not available; evaluating eval.input only.")


def _log_summary(loggers: list | None, report: dict[str, Any], out_dir: Path) -> None:
    """The summary to every logger as ``test/<name>`` (figures: ``meddiff.runs.log_outputs.log_figures``, once)."""
    for lg in loggers or []:
        lg.log_metrics({f"test/{k}": v for k, v in report.get("summary", {}).items()})


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    preset = HydraConfig.get().runtime.choices.get("eval")
    if preset is not None:
        check_eval_preset(str(preset), *model_protocol(cfg.ckpt_path), cfg.ckpt_path)
    overrides = OmegaConf.create({k: cfg[k] for k in ("data", "model", "eval", *TRAINED_PARTS) if k in cfg})
    shortcuts = {k: cfg.get(k) for k in ("input", "guidance_scale", "t_start") if cfg.get(k) is not None}
    if shortcuts:
        overrides = OmegaConf.merge(overrides, {"eval": shortcuts})
    from meddiff.runs.log_outputs import log_figures
    from meddiff.runs.loggers import eval_run_loggers, log_eval_report
    from meddiff.utils.cpu import apply_threads

    if cfg.get("torch_threads") is not None:
        apply_threads(cfg.torch_threads if str(cfg.torch_threads) == "auto" else int(cfg.torch_threads))

    # a checkpoint whose training logged to wandb gets an eval run (job_type=eval) linked to the training run: its
    # group and config, using its checkpoint artifact; the report and figures become an evaluation artifact
    loggers = eval_run_loggers(cfg.ckpt_path, cfg.paths.output_dir, cfg.get("eval_name"))
    evaluate_checkpoint(cfg.ckpt_path, cfg.paths.output_dir, overrides=overrides, loggers=loggers)
    log_figures(loggers, cfg.paths.output_dir)
    log_eval_report(loggers, cfg.paths.output_dir)
    if loggers:
        import wandb

        wandb.finish()


def main() -> None:
    """Console script: checks ``eval=<preset>`` against the checkpoint's model before Hydra starts."""
    import sys

    register_resolvers()  # ${meddiff.run_dir:...,unique} and ${meddiff.help:eval} in configs/eval.yaml
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith(("-", "+", "~")))
    if "ckpt_path" not in args and not any(a.startswith("-") for a in sys.argv[1:]):
        # the output folder is named after the checkpoint's run: without one Hydra fails before any message
        sys.exit("meddiff-eval: ckpt_path=<file.ckpt> is required (e.g. meddiff-eval "
                 "ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt); see meddiff-eval --help.")
    if args.get("eval") and args.get("ckpt_path"):
        try:
            check_eval_preset(args["eval"], *model_protocol(args["ckpt_path"]), args["ckpt_path"])
        except (ConfigError, DataError) as e:
            sys.exit(f"meddiff-eval: {e}")
    _hydra_main()


if __name__ == "__main__":
    main()
