"""Hydra entry point: ``python -m meddiff.eval ckpt_path=...`` (console script ``meddiff-eval``).

The experiment config (data, schedule, net, model, eval) is read back from the checkpoint, so any checkpoint
evaluates with no other argument; ``data.*`` / ``model.*`` / ``eval.*`` overrides on the command line take
precedence (e.g. ``data.root=/other/data`` or ``model.recon.t_start=400``). The model's ``eval_protocol`` names the
protocol (``meddiff.protocols``: ``anomaly``, ``denoise``, ``guided``, ...), which writes ``report.json``,
``metrics.csv`` and its figures into the run dir; the checkpoint path is recorded in ``report.json``.
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
from meddiff.utils.hydra_utils import CKPT_CONFIG_KEY
from meddiff.utils.options import as_dict

log = logging.getLogger("meddiff.eval")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def load_from_checkpoint(ckpt_path: str | Path, overrides: DictConfig | None = None) -> tuple[L.LightningModule, DictConfig]:
    """Rebuild the model from the config stored in the checkpoint and load its weights (EMA included)."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(path)!r} does not exist; pass a .ckpt written by meddiff-train "
                          "(<run_dir>/checkpoints/last.ckpt or the best one beside it).")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if CKPT_CONFIG_KEY not in ckpt:
        raise ConfigError(f"{path} holds no meddiff config (key {CKPT_CONFIG_KEY!r}); it was not written by "
                          "meddiff-train. Rebuild the model from your experiment config and load the state_dict.")
    cfg = OmegaConf.create(ckpt[CKPT_CONFIG_KEY])
    if overrides is not None:
        cfg = OmegaConf.merge(cfg, overrides)
    model = hydra.utils.instantiate(cfg.model)
    model.load_state_dict(ckpt["state_dict"])
    return model, cfg


def evaluate_checkpoint(
    ckpt_path: str | Path | None,
    out_dir: str | Path,
    eval_cfg: Any = None,
    model: L.LightningModule | None = None,
    datamodule: L.LightningDataModule | None = None,
    overrides: DictConfig | None = None,
    loggers: list | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or an in-memory model) with its protocol; write the report and figures to ``out_dir``.

    ``eval_cfg`` (default: the checkpoint's ``eval``) holds the protocol's options; returns the report.
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
    """The summary to every logger as ``test/<name>``; the protocol's figures (``out_dir/*.png``) to wandb."""
    for lg in loggers or []:
        lg.log_metrics({f"test/{k}": v for k, v in report.get("summary", {}).items()})
        if type(lg).__name__ == "WandbLogger":
            images = sorted(str(p) for p in out_dir.glob("*.png"))
            if images:
                lg.log_image(key="test/figures", images=images)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
def _hydra_main(cfg: DictConfig) -> None:
    overrides = OmegaConf.create({k: cfg[k] for k in ("data", "model", "eval") if k in cfg})
    shortcuts = {k: cfg.get(k) for k in ("input", "guidance_scale", "t_start") if cfg.get(k) is not None}
    if shortcuts:
        overrides = OmegaConf.merge(overrides, {"eval": shortcuts})
    evaluate_checkpoint(cfg.ckpt_path, cfg.paths.output_dir, overrides=overrides)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
