"""The worker side of :mod:`meddiff.data.preprocess.cache`: what a ``preprocess_fn`` returns or raises
(:class:`Processed`, :class:`SkipRecord`) and the processing of one chunk of records into its array files and index
CSV (in a multiprocessing pool or in-process). Every file is written atomically (:mod:`meddiff.utils.io`).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from meddiff.errors import DataError
from meddiff.utils.io import atomic_write_bytes, atomic_write_csv

__all__ = ["PreprocessFn", "Processed", "SkipRecord", "chunk_file", "iter_chunk_results"]

#: index columns the cache writes itself (a record or meta field of that name is refused / dropped)
RESERVED = ("row", "ok", "kind", "reason", "chunk", "source_stamp")


class SkipRecord(DataError):
    """Raise from a ``preprocess_fn`` to skip a record on purpose; ``kind`` groups the summary (e.g. 'near_empty')."""

    def __init__(self, reason: str, kind: str = "skipped") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass
class Processed:
    """What a ``preprocess_fn`` may return: fixed-shape ``arrays`` plus scalar ``meta`` for the index CSV."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


PreprocessFn = Callable[[Mapping[str, Any]], "Processed | Mapping[str, np.ndarray]"]


def _write_npy(path: Path, arr: np.ndarray) -> None:
    """One array file of a chunk, written atomically and fsync'd (numeric data only: no pickles)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def chunk_file(chunk_dir: Path, chunk_id: int, suffix: str) -> Path:
    return chunk_dir / f"c{chunk_id:05d}.{suffix}"


_WORKER: dict[str, Any] = {}


def _init_worker(preprocess_fn: PreprocessFn, chunk_dir: str, float_dtype: str, shapes: dict | None) -> None:
    _WORKER.update(fn=preprocess_fn, chunk_dir=Path(chunk_dir), float_dtype=float_dtype, shapes=shapes)
    if "torch" in sys.modules:  # one intra-op thread per worker: the pool provides the parallelism
        sys.modules["torch"].set_num_threads(1)


def _as_arrays(out: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if isinstance(out, Processed):
        arrays, meta = out.arrays, out.meta
    elif isinstance(out, Mapping):
        arrays, meta = out, {}
    else:
        raise TypeError(f"preprocess_fn must return a mapping of arrays or Processed, got {type(out).__name__}")
    if not arrays:
        raise TypeError("preprocess_fn returned no arrays")
    return {str(k): np.asarray(v) for k, v in arrays.items()}, dict(meta)


def _process_chunk(task: tuple[int, list[dict[str, Any]], list[str] | None]) -> dict[str, Any]:
    """Run preprocess_fn over one chunk, write its array files and index CSV atomically, return a summary."""
    chunk_id, records, stamps = task
    fn: PreprocessFn = _WORKER["fn"]
    chunk_dir: Path = _WORKER["chunk_dir"]
    float_dtype = np.dtype(_WORKER["float_dtype"])
    shapes: dict[str, tuple[tuple[int, ...], str]] | None = _WORKER["shapes"]

    stacks: dict[str, list[np.ndarray]] = {}
    rows: list[dict[str, Any]] = []
    for j, rec in enumerate(records):
        row = {k: v for k, v in rec.items()}
        if stamps is not None:
            row["source_stamp"] = stamps[j]
        try:
            arrays, meta = _as_arrays(fn(rec))
            arrays = {
                k: v.astype(float_dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()
            }
            spec = shapes or {k: (tuple(v.shape), v.dtype.str) for k, v in arrays.items()}
            if set(arrays) != set(spec):
                raise DataError(f"arrays {sorted(arrays)} differ from the expected keys {sorted(spec)}")
            for k, v in arrays.items():
                if tuple(v.shape) != tuple(spec[k][0]) or v.dtype.str != np.dtype(spec[k][1]).str:
                    raise DataError(
                        f"array {k!r} has shape {v.shape} {v.dtype}, expected {tuple(spec[k][0])} {spec[k][1]}"
                    )
            shapes = spec
            for k, v in arrays.items():
                stacks.setdefault(k, []).append(v)
            row.update({k: v for k, v in meta.items() if k not in RESERVED})
            row.update(ok=True, kind="", reason="")
        except SkipRecord as e:
            row.update(ok=False, kind=e.kind, reason=str(e))
        except Exception as e:  # never let one bad record stop the build; it is listed in skipped.csv
            row.update(ok=False, kind=type(e).__name__, reason=f"{type(e).__name__}: {e}")
        rows.append(row)

    written: dict[str, list[Any]] = {}
    if shapes is not None:
        for k, (shape, dtype) in shapes.items():
            arr = (
                np.stack(stacks[k]) if stacks.get(k) else np.zeros((0, *shape), dtype=np.dtype(dtype))
            )
            _write_npy(chunk_file(chunk_dir, chunk_id, f"{k}.npy"), arr)
            written[k] = [list(shape), np.dtype(dtype).str]
    atomic_write_csv(chunk_file(chunk_dir, chunk_id, "index.csv"), pd.DataFrame(rows))
    n_ok = sum(bool(r["ok"]) for r in rows)
    return {"chunk": chunk_id, "n_records": len(rows), "n_ok": n_ok, "arrays": written}


def _default_mp_context() -> str:
    methods = mp.get_all_start_methods()
    torch = sys.modules.get("torch")
    cuda_on = bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())
    return "fork" if "fork" in methods and not cuda_on else "spawn"


def iter_chunk_results(
    tasks: list[tuple[int, list[dict[str, Any]], list[str] | None]],
    init_args: tuple,
    num_workers: int,
    mp_context: str | None,
) -> Iterable[dict[str, Any]]:
    if num_workers <= 0 or len(tasks) <= 1:
        saved = dict(_WORKER)
        _WORKER.update(fn=init_args[0], chunk_dir=Path(init_args[1]), float_dtype=init_args[2], shapes=init_args[3])
        torch = sys.modules.get("torch")
        n_threads = torch.get_num_threads() if torch is not None else None
        if torch is not None:  # per-record ops are small: extra intra-op threads only add contention
            torch.set_num_threads(1)
        try:
            for t in tasks:
                yield _process_chunk(t)
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
            if torch is not None and n_threads is not None:
                torch.set_num_threads(n_threads)
        return
    ctx = mp.get_context(mp_context or _default_mp_context())
    with ctx.Pool(min(num_workers, len(tasks)), initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap_unordered(_process_chunk, tasks)
