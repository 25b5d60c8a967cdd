"""Hydra entry point: ``python -m meddiff.eval ckpt_path=...`` (console script ``meddiff-eval``).

The experiment config (data, schedule, net, model) is read back from the checkpoint, so any checkpoint
evaluates with no other argument; ``data.*`` / ``model.*`` overrides on the command line take precedence (e.g.
``data.root=/other/data`` or ``model.recon.t_start=400``). Writes ``report.json``, ``metrics.csv``, ``roc.png``
and ``anomaly_grid.png`` into the run dir and prints a table.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from meddiff.anomaly.evaluate import EvalOptions, evaluate_anomaly_detection
from meddiff.errors import ConfigError, DataError
from meddiff.utils.hydra_utils import CKPT_CONFIG_KEY
from meddiff.utils.io import atomic_write_json, atomic_write_text

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


def _eval_options(eval_cfg: Any) -> EvalOptions:
    if eval_cfg is None:
        return EvalOptions()
    values = _plain(eval_cfg)
    known = set(EvalOptions.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"Unknown eval option(s) {unknown}; valid: {sorted(known)}.")
    return EvalOptions(**values)


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
    """Evaluate a checkpoint (or an in-memory model) with the honest protocol; write report and figures."""
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
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    protocol = getattr(model, "eval_protocol", "anomaly")
    single_input = protocol != "anomaly" and bool(_plain(eval_cfg).get("input"))
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.setup("test")
    except DataError:
        if not single_input:
            raise
        # translating one given volume needs only the data settings, not the training data
        log.warning("Training data not available; evaluating eval.input only.")
    if protocol != "anomaly":
        # other tasks (denoising, guided translation) bring their own protocol module:
        # meddiff.evaluation.<protocol>.run(model, datamodule, eval_cfg, out_dir, device) -> report with "summary"
        try:  # protocols are moving to meddiff.protocols (issue 8); its registry replaces this lookup
            module = importlib.import_module(f"meddiff.protocols.{protocol}")
        except ModuleNotFoundError as exc:
            if exc.name not in ("meddiff.protocols", f"meddiff.protocols.{protocol}"):
                raise
            module = importlib.import_module(f"meddiff.evaluation.{protocol}")
        report = module.run(model, datamodule, _plain(eval_cfg), out_dir, device)
        report["checkpoint"] = str(ckpt_path) if ckpt_path else None
        atomic_write_json(out_dir / "report.json", report)
        _log_summary(loggers, report)
        return report
    opts = _eval_options(eval_cfg)
    val_loader = datamodule.val_dataloader() if opts.select_on_val else None
    report = evaluate_anomaly_detection(model, val_loader, datamodule.test_dataloader(), opts, device,
                                        subtype_names=getattr(datamodule, "subtype_names", None))
    report["checkpoint"] = str(ckpt_path) if ckpt_path else None
    report["reconstruction"] = dict(vars(model.recon_cfg))
    figures = report.pop("_figures")
    write_outputs(report, figures, out_dir)
    _log_summary(loggers, report, images=[out_dir / "roc.png", out_dir / "anomaly_grid.png"])
    return report


def _plain(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _log_summary(loggers: list | None, report: dict[str, Any], images: list[Path] | None = None) -> None:
    for lg in loggers or []:
        lg.log_metrics({f"test/{k}": v for k, v in report.get("summary", {}).items()})
        if images and type(lg).__name__ == "WandbLogger":
            lg.log_image(key="test/figures", images=[str(p) for p in images if p.is_file()])


def write_outputs(report: dict[str, Any], figures: dict[str, Any], out_dir: Path) -> None:
    from meddiff.viz.figures import save_anomaly_grid, save_roc_pr

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", report)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["metric", "value"])
    for k, v in report["summary"].items():
        writer.writerow([k, f"{v:.6f}"])
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())
    save_roc_pr(out_dir / "roc.png", figures["curves"])
    ex = figures["examples"]
    if ex:
        save_anomaly_grid(out_dir / "anomaly_grid.png", ex["image"], ex["recon"], ex["map"], ex.get("mask"),
                          ex.get("label"), n_rows=8)
    print_report(report)
    if "subtypes" in ex:  # CT (RSNA): per-subtype table and figures, segmentation overlays over the CT
        from meddiff.evaluation.ct_report import write_ct_outputs

        write_ct_outputs(report, figures, out_dir)


def print_report(report: dict[str, Any]) -> None:
    """A rich table: model beside the trivial baseline, with CIs and the protocol."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Test results (n={report['n_test']}); post-processing chosen on validation")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("baseline", justify="right")
    im, ib = report["image"]["model"], report["image"]["baseline_mean_intensity"]

    def ci(d: dict, k: str) -> str:
        lo, hi = d[f"{k}_ci"]
        return f"{d[k]:.3f} [{lo:.3f}, {hi:.3f}]"

    table.add_row("image AUROC [95% CI]", ci(im, "auroc"), ci(ib, "auroc"))
    table.add_row("image AUPRC [95% CI]", ci(im, "auprc"), ci(ib, "auprc"))
    if "subject" in report:
        sm, sb = report["subject"].get("model"), report["subject"].get("baseline_mean_intensity")
        table.add_row("subject AUROC", ci(sm, "auroc") if sm else "-", ci(sb, "auroc") if sb else "-")
    if "pixel" in report:
        pm, pb = report["pixel"]["model"], report["pixel"].get("baseline_intensity", {})
        for key, name in (("auroc", "pixel AUROC"), ("auprc", "pixel AUPRC"),
                          ("dice_at_val_threshold", "Dice @ val threshold"), ("oracle_dice", "Dice (oracle, test-chosen)")):
            if key in pm:
                table.add_row(name, f"{pm[key]:.3f}", f"{pb[key]:.3f}" if key in pb else "-")
    Console().print(table)
    Console().print(f"scoring: {report['scoring']}")


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
