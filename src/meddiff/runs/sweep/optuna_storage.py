"""Optuna studies kept in ``<sweep_dir>/optuna.db`` (SQLite), so a killed sweep resumes where it stopped.

The sweepers' configs point ``hydra.sweeper.storage`` here::

    storage:
      _target_: meddiff.runs.sweep.optuna_storage.sqlite_storage
      path: ${hydra.sweep.dir}/optuna.db

Why not the plain ``sqlite:///...`` URL: ``hydra-optuna-sweeper`` 1.3 pins optuna < 3, and optuna 2.10's RDB storage
cannot set up a new database under SQLAlchemy 2 (the alembic version stamp is written on a connection that is never
committed: the schema check then fails, or the open write transaction locks the file). :func:`sqlite_storage`
creates the tables and stamps the schema version in a committed transaction first; optuna then opens an already
initialised database, which works. With optuna >= 3 (SQLAlchemy 2 aware) it is a plain ``RDBStorage``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from meddiff.errors import ConfigError

log = logging.getLogger(__name__)

DB_FILE = "optuna.db"
JOB_DIR_ATTR = "job_dir"


def _needs_prestamp() -> bool:
    import optuna
    import sqlalchemy

    return int(optuna.__version__.split(".")[0]) < 3 and int(sqlalchemy.__version__.split(".")[0]) >= 2


def _prestamp(url: str) -> None:
    """Create optuna's tables and record the schema version in committed transactions (optuna 2 + SQLAlchemy 2)."""
    import alembic.config
    import alembic.migration
    import alembic.script
    import sqlalchemy as sa
    from optuna import version
    from optuna.storages._rdb import models

    rdb_dir = Path(models.__file__).parent
    engine = sa.create_engine(url)
    try:
        models.BaseModel.metadata.create_all(engine)
        with engine.begin() as conn:
            context = alembic.migration.MigrationContext.configure(conn)
            if context.get_current_revision() is None:
                config = alembic.config.Config(str(rdb_dir / "alembic.ini"))
                config.set_main_option("script_location", str(rdb_dir / "alembic").replace("%", "%%"))
                script = alembic.script.ScriptDirectory.from_config(config)
                context.stamp(script, script.get_current_head())
            table = models.VersionInfoModel.__table__
            if conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0:
                conn.execute(sa.insert(table).values(version_info_id=1, schema_version=models.SCHEMA_VERSION,
                                                     library_version=version.__version__))
    finally:
        engine.dispose()


def sqlite_storage(path: str | Path, timeout_s: float = 60.0) -> Any:
    """An optuna ``RDBStorage`` in the SQLite file ``path`` (created with its folder if missing).

    ``timeout_s``: how long a writer waits for the file lock (parallel jobs of one study share the file).
    """
    from optuna.storages import RDBStorage

    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    check_readable_db(path)
    url = f"sqlite:///{path}"
    try:
        if _needs_prestamp():
            _prestamp(url)
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": timeout_s}})
    except Exception as e:  # sqlalchemy / alembic errors of a damaged or foreign file
        raise _damaged(path, e) from e


def _damaged(path: Path, e: BaseException) -> ConfigError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ConfigError(
        f"The Optuna study file {path} is damaged or not an Optuna database ({type(e).__name__}: {first}). Move it "
        f"away (e.g. `mv {path} {path}.broken`) to start a new study there, or start the sweep in another folder "
        "(hydra.sweep.dir=...) or under another hydra.sweeper.study_name.")


def check_readable_db(path: Path) -> None:
    """An existing ``path`` must be a readable SQLite database (a :class:`ConfigError` naming it otherwise); a
    missing one is created later by optuna."""
    import sqlite3

    if not path.exists():
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            row = con.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as e:
        raise _damaged(path, e) from e
    if not row or row[0] != "ok":
        raise _damaged(path, RuntimeError(f"integrity check: {row[0] if row else 'no answer'}"))


def load_trials(db_path: str | Path, study_name: str | None = None) -> tuple[str, list[Any]]:
    """``(study_name, trials)`` of a study in ``db_path`` (the only study if ``study_name`` is None)."""
    import optuna

    storage = sqlite_storage(db_path)
    if study_name is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if len(names) != 1:
            raise ValueError(f"{db_path} holds studies {names}; name one (hydra.sweeper.study_name).")
        study_name = names[0]
    study = optuna.load_study(study_name=study_name, storage=storage)
    return study_name, list(study.trials)


def count_trials(db_path: str | Path, study_name: str | None) -> int:
    """Trials already in the study (0 when the file or the study does not exist yet)."""
    if not Path(db_path).is_file():
        return 0
    try:
        return len(load_trials(db_path, study_name)[1])
    except (KeyError, ValueError):
        return 0


def record_job_dir(db_path: str | Path, study_name: str, trial_number: int, job_dir: str,
                   params: dict[str, str] | None = None) -> bool:
    """Store ``job_dir`` as the user attribute ``job_dir`` of a running trial (seen by any optuna tool).

    Optuna refuses to change finished trials, so the job does this itself while its trial runs. ``params``: the job's
    override values; the trial must have suggested the same ones (guards against a numbering mix-up). Returns
    whether it was recorded.
    """
    import optuna

    storage = sqlite_storage(db_path)
    study = optuna.load_study(study_name=study_name, storage=storage)
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == trial_number), None)
    if trial is None or trial.state != optuna.trial.TrialState.RUNNING:
        log.warning("Optuna trial %s of study %r is not running; job dir %s not recorded in the study.",
                    trial_number, study_name, job_dir)
        return False
    if params is not None:
        mismatch = {k: (v, params.get(k)) for k, v in trial.params.items() if not _same(v, params.get(k))}
        if mismatch:
            log.warning("Optuna trial %s suggested %s, the job got other values; job dir not recorded.",
                        trial_number, mismatch)
            return False
    storage.set_trial_user_attr(trial._trial_id, JOB_DIR_ATTR, job_dir)
    return True


def _same(value: Any, text: str | None) -> bool:
    if text is None:
        return False
    if str(value) == text:
        return True
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return False
