"""The loggers of a run, built from the ``logger`` config group: a CSV history that continues on resume, one wandb run
per training across any number of resumes, and whatever else the group names.

wandb across resumes (online and offline): the run id is kept in ``<run_dir>/wandb_id.txt`` and reused with
``resume="allow"``; the first launch's display name, group and tags are kept in ``<run_dir>/wandb_run.json`` and
reused by every resume (which adds the tag ``resume`` and puts its own overrides in the config as
``resume/<k>``); wandb's step is the trainer's logging step (:class:`ResumableWandbLogger`), so it continues from
the checkpoint's step instead of restarting at 0. Offline, each launch writes its own
``<run_dir>/wandb/offline-run-<time>-<id>`` folder with the same id; upload them into one run and one history with

    wandb sync --yes --id $(cat <run_dir>/wandb_id.txt) <run_dir>/wandb/offline-run-*

(wandb >= 0.30: the folders of one run id, or all folders given with ``--id``, are synced one after the other in
order of start time into that run, the resumed fragments of one run; wandb <= 0.29: use
``wandb sync --append <folder>`` for each folder after the first, oldest first, or a later folder replaces the
history).

A standalone ``meddiff-eval`` of a checkpoint whose training logged to wandb gets its own wandb run linked to the
training run (:func:`eval_run_loggers`): the training run's group and stored config, the tag ``eval``, the name
``<training name>/eval/<eval_name>``, and the lineage edge "uses the checkpoint artifact" (``model-<training id>``, the
artifact the training logs its ``best``/``last`` checkpoints to), also offline; its report and figures become an
``evaluation`` artifact (:func:`log_eval_report`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict

from meddiff.utils.io import atomic_write_text

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id.txt"
WANDB_RUN_FILE = "wandb_run.json"  # the first launch's id, name, group and tags; the number of launches
RESUME_TAG = "resume"
_RESUMABLE_WANDB = "meddiff.runs.loggers.ResumableWandbLogger"
_LIGHTNING_CSV = "lightning.pytorch.loggers.CSVLogger"
_HISTORY_CSV = "meddiff.runs.csv_history.CSVHistoryLogger"


def _wandb_online() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def new_wandb_id() -> str:
    """A fresh wandb run id (for runs whose id must be known before they start, e.g. a standalone eval run)."""
    try:
        from wandb.sdk.lib.runid import generate_id

        return generate_id()
    except ImportError:  # pragma: no cover - other wandb versions
        import secrets
        import string

        return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _stored_wandb_id(id_file: Path) -> str | None:
    """The run id kept in ``wandb_id.txt``; None when absent or the text ``None`` meddiff <= 0.1 wrote there."""
    if not id_file.is_file():
        return None
    text = id_file.read_text().strip()
    return None if text in ("", "None", "null") else text


def instantiate_loggers(cfg: DictConfig | None, output_dir: str | Path, identity: Any = None,
                        resume_step: int | None = None) -> list[Logger]:
    """Build loggers.

    - CSV: Lightning's ``CSVLogger`` is built as ``meddiff.runs.csv_history.CSVHistoryLogger`` (same arguments), which
      on a resume (``resume_step`` given) keeps the earlier rows of ``metrics.csv`` and continues the file.
    - wandb: offline unless credentials exist; the run id kept in ``<output_dir>/wandb_id.txt`` is reused
      (``resume="allow"``, online and offline), and written there once the wandb run exists; name, group and tags
      left null in the config come from ``identity`` (:class:`meddiff.runs.identity.RunIdentity`).
    """
    if not cfg:
        return []
    loggers: list[Logger] = []
    for _name, lg in cfg.items():
        if not isinstance(lg, DictConfig) or "_target_" not in lg:
            continue
        if lg._target_ in (_LIGHTNING_CSV, _HISTORY_CSV):
            lg = lg.copy()
            with open_dict(lg):
                lg._target_ = _HISTORY_CSV
                lg.resume_step = resume_step
            loggers.append(hydra.utils.instantiate(lg))
        elif "Wandb" in lg._target_:
            loggers.append(_wandb_logger(lg, Path(output_dir), identity))
        else:
            loggers.append(hydra.utils.instantiate(lg))
    return loggers


class ResumableWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` whose wandb step is the trainer's logging step (``trainer/global_step``).

    Lightning lets wandb count its own ``_step``, which restarts at 0 in every offline segment of a resumed run; here
    each row is logged at ``step`` (never below a step already logged, which wandb would drop), so ``_step`` goes on
    from the checkpoint's step across resumes, online and offline.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._min_step = 0

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if step is None or self._wandb_init.get("sync_tensorboard"):
            return super().log_metrics(metrics, step)
        step = max(int(step), self._min_step)
        self._min_step = step
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        self.experiment.log(dict(metrics, **{"trainer/global_step": step}), step=step)


def read_wandb_run(output_dir: str | Path) -> dict[str, Any]:
    """``wandb_run.json`` of a run dir (``{}`` when absent or unreadable)."""
    path = Path(output_dir) / WANDB_RUN_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _wandb_logger(lg: DictConfig, output_dir: Path, identity: Any = None) -> Logger:
    lg = lg.copy()
    id_file = output_dir / WANDB_ID_FILE
    stored_id = _stored_wandb_id(id_file)
    first = read_wandb_run(output_dir)
    resumed = stored_id is not None and lg.get("id") in (None, stored_id)
    if first.get("id") != stored_id:
        first = {}  # written by another run (or an older meddiff): only the id is known
    with open_dict(lg):
        lg._target_ = _RESUMABLE_WANDB
        if str(lg.get("offline", "auto")) == "auto":
            lg.offline = not _wandb_online()
        if lg.get("id") is None and stored_id:
            lg.id = stored_id
        lg.resume = "allow"
        for key in ("name", "group", "tags"):
            if lg.get(key) is None:
                # a resume keeps the first launch's name and group (its own overrides would rename the run)
                value = first.get(key) if resumed and first.get(key) is not None else getattr(identity, key, None)
                lg[key] = list(value) if key == "tags" and value is not None else value
        if resumed:
            lg.tags = list(dict.fromkeys([*(lg.get("tags") or []), RESUME_TAG]))
    logger = hydra.utils.instantiate(lg)
    run = logger.experiment  # creates (or resumes) the run on rank 0; a dummy elsewhere
    run_id = getattr(run, "id", None)
    if isinstance(run_id, str) and run_id and rank_zero_only.rank == 0:
        atomic_write_text(id_file, run_id + "\n")
        launches = int(first.get("launches", 0)) + 1 if resumed else 1
        record = {"id": run_id, "launches": launches,
                  **{k: first.get(k, lg.get(k)) if resumed and first else _plain(lg.get(k))
                     for k in ("name", "group", "tags")}}
        if resumed and not first:
            record["tags"] = [t for t in record["tags"] or [] if t != RESUME_TAG]
        atomic_write_text(output_dir / WANDB_RUN_FILE, json.dumps(record, indent=1) + "\n")
        if resumed and identity is not None:
            overrides = ",".join(f"{k}={v}" for k, v in getattr(identity, "overrides", {}).items())
            run.config.update({f"{RESUME_TAG}/{launches - 1}": overrides}, allow_val_change=True)
    return logger


def _plain(value: Any) -> Any:
    from omegaconf import ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


# ------------------------------------------------------------------------------------------ the eval run of a checkpoint
EVAL_TAG = "eval"
CHECKPOINT_ARTIFACT_TYPE = "model"
EVAL_ARTIFACT_TYPE = "evaluation"


def checkpoint_artifact_name(train_run_id: str) -> str:
    """The artifact the training run ``train_run_id`` logs its checkpoints to (versions aliased ``best``/``last``,
    :func:`meddiff.runs.log_outputs.log_checkpoints`)."""
    return f"model-{train_run_id}"


def eval_run_loggers(ckpt_path: str | Path | None, out_dir: str | Path, eval_name: str | None = None) -> list[Logger]:
    """Loggers for a standalone ``meddiff-eval`` of a checkpoint whose training logged to wandb: a new wandb run
    (``job_type=eval``) in the training run's project and group, named ``<training name>/eval/<eval_name>``, tagged
    like the training plus ``eval``, whose config is the checkpoint's stored config (data, net, model, ... so evals
    filter by hyperparameters) plus where it came from; it uses the checkpoint artifact (:func:`use_checkpoint`).
    ``[]`` when the checkpoint is not in a run dir whose training used wandb (an evaluation never starts a wandb run
    of its own accord). ``eval_name`` defaults to the name of ``out_dir`` (``<run_dir>/evals/<eval_name>``)."""
    import yaml

    from meddiff.runs.checkpoint_io import load_checkpoint, stored_config
    from meddiff.runs.log_outputs import train_run_dir_of
    from meddiff.runs.status import read_status

    run_dir = train_run_dir_of(ckpt_path)
    train_id = _stored_wandb_id(run_dir / WANDB_ID_FILE) if run_dir is not None else None
    if run_dir is None or train_id is None:
        return []
    first = read_wandb_run(run_dir)
    if first.get("id") != train_id:
        first = {}  # written by another run: fall back on status.json
    status = read_status(run_dir) or {}
    resolved = run_dir / "config_resolved.yaml"
    run_cfg = yaml.safe_load(resolved.read_text()) if resolved.is_file() else {}
    run_cfg = run_cfg if isinstance(run_cfg, dict) else {}
    wb = (run_cfg.get("logger") or {}).get("wandb") or {}
    ckpt = Path(str(ckpt_path)).expanduser().resolve()
    train_cfg = stored_config(load_checkpoint(ckpt, mmap=True), ckpt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_name = eval_name or out_dir.name
    train_name = first.get("name") or status.get("name") or run_dir.name
    tags = [str(t) for t in (first.get("tags") or wb.get("tags") or run_cfg.get("tags") or []) if t != RESUME_TAG]
    offline = wb.get("offline", "auto")
    offline = (not _wandb_online()) if str(offline) == "auto" else bool(offline)
    config = {**train_cfg, "train_run_dir": str(run_dir), "checkpoint": str(ckpt), "train_wandb_id": train_id,
              "eval_name": eval_name}
    logger = WandbLogger(save_dir=str(out_dir), project=wb.get("project", "meddiff"),
                         name=f"{train_name}/{EVAL_TAG}/{eval_name}", group=first.get("group") or status.get("group"),
                         tags=list(dict.fromkeys([*tags, EVAL_TAG])), job_type=EVAL_TAG, offline=offline,
                         id=new_wandb_id(), config=config)
    use_checkpoint(logger.experiment, ckpt, train_id)
    return [logger]


def use_checkpoint(run: Any, ckpt_path: Path, train_run_id: str) -> None:
    """Record that ``run`` uses the checkpoint artifact of the training run ``train_run_id``.

    The artifact is built locally exactly as the training logs it (same name, type and file name, so the same content
    digest: the server resolves it to the training's version instead of a new one) and marked used. Online that is
    ``run.use_artifact``; offline wandb refuses ``use_artifact`` ("Cannot use artifact when in offline mode"), so the
    artifact record is written with ``use_after_commit`` - what ``use_artifact`` of a draft artifact does online -
    and ``wandb sync`` commits the version and then records the use. The file is referenced in place (no copy)."""
    import wandb

    art = wandb.Artifact(name=checkpoint_artifact_name(train_run_id), type=CHECKPOINT_ARTIFACT_TYPE,
                         metadata={"file": ckpt_path.name})
    art.add_file(str(ckpt_path), name=ckpt_path.name, policy="immutable")
    try:
        if getattr(run.settings, "_offline", False):
            run._log_artifact(art, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(art)
    except Exception as e:  # the lineage edge must never cost the evaluation itself
        log.warning("Could not record that this eval run uses %s (%s): %s", art.name, ckpt_path, e)


def log_eval_report(loggers: list[Logger], out_dir: str | Path) -> int:
    """``report.json`` and the PNG figures of ``out_dir`` as an ``evaluation`` artifact of each eval wandb run
    (named ``eval-<training id>``: one version per evaluation of that training), online and offline. Returns the
    number of artifact versions logged."""
    from meddiff.runs.log_outputs import log_files_artifact, report_files

    files = report_files(out_dir)
    n = 0
    for lg in loggers:
        if not files or not isinstance(lg, WandbLogger):
            continue
        run = lg.experiment
        source = run.config.get("train_wandb_id") or run.id
        log_files_artifact(run, files, f"{EVAL_TAG}-{source}", EVAL_ARTIFACT_TYPE,
                           metadata={"eval_name": run.config.get("eval_name"),
                                     "checkpoint": run.config.get("checkpoint")})
        n += 1
    return n
