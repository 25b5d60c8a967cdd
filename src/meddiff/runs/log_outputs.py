"""What a train run tells its loggers beyond the scalars: the config (once), hparams, figures, checkpoints.

- config: the resolved run config without bookkeeping (paths, logger, callbacks) logged once per logger; Lightning's
  own hparams logging is switched off (it logged the datamodule's arguments a second time, at the top level).
- TensorBoard: ``hparams`` (the run's distinguishing values, e.g. the swept keys <-> best validation score and test
  metrics), so the HParams tab compares the jobs of a sweep (``tensorboard --logdir <sweep_dir>``); figures as images.
- wandb: figures as images (``figures/<name>``), best validation score and test metrics in the run summary, best and
  last checkpoints as ``model`` artifacts and ``report.json`` + the figures as a ``report`` artifact, online and
  offline (an offline run keeps them in its run files; ``wandb sync`` uploads them, see :mod:`meddiff.runs.loggers`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

BOOKKEEPING_KEYS = ("paths", "logger", "callbacks", "hydra")


def kind(logger: Any) -> str:
    """``"wandb"``, ``"tensorboard"``, ``"csv"`` or the class name."""
    known = {"WandbLogger": "wandb", "TensorBoardLogger": "tensorboard", "CSVLogger": "csv"}
    # by class name along the MRO: subclasses (meddiff.runs.loggers.ResumableWandbLogger) are their base's kind
    return next((known[c.__name__] for c in type(logger).__mro__ if c.__name__ in known), type(logger).__name__)


def clean_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved config without bookkeeping keys (where files go, which loggers/callbacks run)."""
    full = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return {k: v for k, v in full.items() if k not in BOOKKEEPING_KEYS}


def log_run_config(loggers: list, cfg: DictConfig, model: Any = None, datamodule: Any = None) -> None:
    """Log the clean config once (wandb config, CSV hparams.yaml); TensorBoard gets hparams at the end instead."""
    for obj in (model, datamodule):
        if obj is not None:
            obj._log_hyperparams = False  # Lightning would log their init arguments again (duplicate data keys)
    config = clean_config(cfg)
    for lg in loggers:
        if kind(lg) != "tensorboard":
            lg.log_hyperparams(config)


def _number(text: Any) -> Any:
    """Override text as int/float/bool when it is one (TensorBoard plots numeric hparams on axes)."""
    if not isinstance(text, str):
        return text
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def final_metrics(selection: dict[str, Any], test_summary: dict[str, Any] | None) -> dict[str, float]:
    """``best/<monitor>`` (the kept checkpoint's validation score) and ``test/<k>`` as plain floats."""
    out: dict[str, float] = {}
    if selection.get("best_score") is not None:
        out[f"best/{selection['monitor']}"] = float(selection["best_score"])
    for k, v in (test_summary or {}).items():
        if isinstance(v, int | float):
            out[f"test/{k}"] = float(v)
    return out


def log_run_end(loggers: list, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """TensorBoard hparams session (values <-> metrics); wandb run summary."""
    if not metrics:
        return
    for lg in loggers:
        k = kind(lg)
        if k == "tensorboard":
            params = {key: _number(v) for key, v in hparams.items()}
            lg.log_hyperparams(params, metrics={f"hparams/{m}": v for m, v in metrics.items()})
            lg.save()
        elif k == "wandb":
            lg.experiment.summary.update(metrics)


def _read_png(path: Path) -> Any:
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(path)  # PNG: float32 in [0, 1], [H, W] or [H, W, C]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3]


def log_figures(loggers: list, out_dir: str | Path, step: int = 0) -> list[Path]:
    """Every PNG figure the evaluation wrote into ``out_dir`` (ROC, anomaly grids, subtype bars, denoising
    curves...) as images: wandb ``figures/<name>``, TensorBoard ``figures/<name>``. Returns the files logged."""
    files = sorted(Path(out_dir).glob("*.png"))
    if not files:
        return []
    for lg in loggers:
        k = kind(lg)
        try:
            if k == "wandb":
                for p in files:
                    lg.log_image(key=f"figures/{p.stem}", images=[str(p)], step=step)
            elif k == "tensorboard":
                for p in files:
                    lg.experiment.add_image(f"figures/{p.stem}", _read_png(p), step, dataformats="HWC")
                lg.experiment.flush()
        except Exception as e:  # a figure must never fail a finished run
            log.warning("Could not log figures to %s: %s", k, e)
    return files


def log_checkpoints(loggers: list, selection: dict[str, Any]) -> int:
    """Upload the best and the last checkpoint as versions of the artifact ``model-<run id>`` (aliases ``best``,
    ``last``), also offline (uploaded by ``wandb sync``). Returns the number of artifact versions logged."""
    paths: dict[str, list[str]] = {}
    for alias, key in (("best", "best_checkpoint"), ("last", "last_checkpoint")):
        p = selection.get(key)
        if p and Path(p).is_file():
            paths.setdefault(str(Path(p).resolve()), []).append(alias)
    if not paths:
        return 0
    n = 0
    for lg in loggers:
        if kind(lg) != "wandb":
            continue
        run = lg.experiment
        import wandb

        from meddiff.runs.loggers import CHECKPOINT_ARTIFACT_TYPE, checkpoint_artifact_name

        for path, aliases in paths.items():  # the eval run of a checkpoint uses this artifact (eval_run_loggers)
            art = wandb.Artifact(name=checkpoint_artifact_name(run.id), type=CHECKPOINT_ARTIFACT_TYPE,
                                 metadata={"monitor": selection.get("monitor"), "score": selection.get("best_score"),
                                           "file": Path(path).name})
            art.add_file(path, name=Path(path).name)
            run.log_artifact(art, aliases=aliases + (["latest"] if "last" in aliases else []))
            n += 1
    return n


def log_run_outputs(loggers: list, out_dir: str | Path, hparams: dict[str, Any], selection: dict[str, Any],
                    test_summary: dict[str, Any] | None, step: int = 0) -> None:
    """At the end of a train run: figures, hparams <-> final metrics, run summary, checkpoint artifacts."""
    if not loggers:
        return
    log_figures(loggers, out_dir, step=step)
    log_run_end(loggers, hparams, final_metrics(selection, test_summary))
    log_checkpoints(loggers, selection)
    log_report(loggers, out_dir)


def report_files(out_dir: str | Path) -> list[Path]:
    """``report.json`` and the PNG figures of ``out_dir`` (those that exist): what a report artifact holds."""
    return [p for p in [Path(out_dir) / "report.json", *sorted(Path(out_dir).glob("*.png"))] if p.is_file()]


def log_files_artifact(run: Any, files: list[Path], name: str, type_: str, metadata: dict[str, Any] | None = None,
                       aliases: list[str] | None = None) -> None:
    """``files`` as one version of the wandb artifact ``name`` of type ``type_`` in ``run`` (online and offline)."""
    import wandb

    art = wandb.Artifact(name=name, type=type_, metadata=metadata)
    for p in files:
        art.add_file(str(p), name=p.name)
    run.log_artifact(art, aliases=aliases)


def log_report(loggers: list, out_dir: str | Path) -> int:
    """``report.json`` and the PNG figures of ``out_dir`` as the artifact ``report-<run id>`` (type ``report``),
    online and offline. Returns the number of artifact versions logged."""
    files = report_files(out_dir)
    if not files:
        return 0
    n = 0
    for lg in loggers:
        if kind(lg) != "wandb":
            continue
        run = lg.experiment
        log_files_artifact(run, files, f"report-{run.id}", "report", aliases=["latest"])
        n += 1
    return n


def train_run_dir_of(ckpt_path: str | Path | None) -> Path | None:
    """The train run dir a checkpoint belongs to (``<run_dir>/checkpoints/<file>.ckpt``), if it is one."""
    if not ckpt_path:
        return None
    ckpt = Path(ckpt_path).expanduser().resolve()
    run_dir = ckpt.parent.parent
    return run_dir if ckpt.parent.name == "checkpoints" and (run_dir / "status.json").is_file() else None
