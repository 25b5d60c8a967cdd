"""The one atomic writer: a crash never leaves a half-written report, cache, checkpoint or figure behind.

Every writer goes through :func:`atomic_write`: the content is written to a hidden temporary file in the target's
folder (``.<name>.<pid>.<random>.tmp``, so a stale one names the process that left it), flushed, given the
ordinary file mode (``0o666 & ~umask``, i.e. 0644 under the usual umask 022; ``mkstemp`` alone would leave
0600), then renamed over the target with ``os.replace`` (atomic on POSIX and Windows).

A process killed mid-write (``kill -9``, OOM, preemption) leaves its temporary file behind. A long job that owns a
folder calls :func:`remove_stale_tmp` when it starts: it deletes the temporary files whose writer process is no
longer alive, and never one of a live process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"

log = logging.getLogger(__name__)

# ``.<name>.<pid>.<random>.tmp`` as made by :func:`tmp_path_for` (mkstemp's random part: [a-z0-9_]).
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<rand>[a-z0-9_]+)" + re.escape(TMP_SUFFIX) + "$")


def _file_mode() -> int:
    """0o666 minus the process umask: the mode ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def tmp_path_for(path: str | Path) -> Path:
    """A fresh, unique temporary path beside ``path`` (created empty; the caller writes it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX)
    os.close(fd)
    return Path(tmp)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then move it onto ``path`` atomically (mode 0644).

    ``write`` may be any writer taking a path (``np.save`` with a file handle, ``torch.save``, ``fig.savefig``,
    ``h5py.File``...). On any exception the temporary file is removed and the target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync'd before the rename)."""

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, _write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON; tensors, arrays and numpy scalars become lists/numbers, paths strings."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def atomic_write_csv(path: str | Path, df: Any, **to_csv_kwargs: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically (``index=False`` unless given)."""
    to_csv_kwargs.setdefault("index", False)
    return atomic_write_text(path, df.to_csv(**to_csv_kwargs))


def atomic_save_npy(path: str | Path, arr: Any) -> Path:
    """``np.save`` atomically (the target keeps its name; no ``.npy`` is appended)."""
    import numpy as np

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    return atomic_write(path, _write)


def tmp_owner_pid(path: str | Path) -> int | None:
    """The pid in an :func:`atomic_write` temporary name ``.<name>.<pid>.<random>.tmp``; ``None`` for other names."""
    m = _TMP_NAME.match(Path(path).name)
    return int(m.group("pid")) if m else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie or another user's process counts as alive).

    Unknown (a platform without ``os.kill(pid, 0)`` and without psutil) counts as alive, so callers that delete
    files of dead processes keep them.
    """
    if pid <= 0:
        return True  # 0 / negative address process groups: never treat as a dead writer
    if os.name != "posix":
        try:
            import psutil
        except ImportError:
            return True
        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


def remove_stale_tmp(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the :func:`atomic_write` temporary files in ``folder`` whose writer process is dead.

    Only names of the form ``.<name>.<pid>.<random>.tmp`` are considered; a file is removed only when no process
    with that pid is alive on this host, so a write in progress is never touched (a reused pid keeps a stale file
    until a later start: safe, not tidy). The pid is of this host: on a folder that processes on several hosts
    write at once, hold a lock before calling this. A missing folder is fine (nothing to do).

    Args:
        folder: the folder the job owns (e.g. a cache folder, an output folder).
        recursive: also look in every subfolder.

    Returns:
        the removed paths; one INFO log line names them and the space freed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob(f".*{TMP_SUFFIX}") if recursive else folder.glob(f".*{TMP_SUFFIX}")
    removed: list[Path] = []
    freed = 0
    for p in sorted(candidates):
        pid = tmp_owner_pid(p)
        if pid is None or pid_alive(pid) or not p.is_file():
            continue
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:  # removed meanwhile by another cleaner
            continue
        removed.append(p)
        freed += size
    if removed:
        names = ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else "")
        log.info("removed %d stale temporary file(s) of dead processes (%.1f MB) in %s: %s", len(removed),
                 freed / 1e6, folder, names)
    return removed


def _jsonable(o: Any) -> Any:
    try:
        import numpy as np
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, np.generic | np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)
