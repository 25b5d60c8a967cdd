"""The one atomic writer: a crash never leaves a half-written report, cache, checkpoint or figure behind.

Every writer goes through :func:`atomic_write`: the content is written to a hidden temporary file in the target's
folder (``.<name>.<pid>.<random>.tmp``, so a stale one names the process that left it), flushed, given the
ordinary file mode (``0o666 & ~umask``, i.e. 0644 under the usual umask 022; ``mkstemp`` alone would leave
0600), then renamed over the target with ``os.replace`` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


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
