"""A generic, resumable, one-time preprocessing cache of fixed-shape arrays (e.g. CT/MRI slices).

Decoding medical files (DICOM, NIfTI) every epoch is the bottleneck of naive pipelines. :func:`build_cache`
runs ``preprocess_fn(record)`` once per record in a multiprocessing pool and stores the results as
memory-mapped ``.npy`` files that any number of DataLoader workers read fast through :class:`SliceCache`.

Layout of one cache (``<cache_root>/<name>-<hash12>/``, the hash covering the settings, the records and the
chunking; another hash is another folder, never reused by mistake)::

    settings.json              the hashed key (settings + records fingerprint + chunk size + format version)
    manifest.json              which chunks are finished (the commit point of a chunk; rewritten atomically)
    chunks/c00000.<key>.npy    stacked arrays of the chunk's good records, ``[n_ok, ...]``, one file per key
    chunks/c00000.index.csv    the chunk's records: id, record fields, meta from preprocess_fn, ok, kind, reason
                               (and source_stamp when stamps are given)
    index.csv                  all records; ``row`` = position in the concatenated arrays (-1 when skipped)
    skipped.csv                the skipped records and why
    complete                   written last: JSON with the key and counts; a cache without it is unfinished

Every file is written through :mod:`meddiff.utils.io` (a temporary name, then ``os.replace``: atomic on POSIX), so
an interrupted build leaves only finished chunks behind; rerunning builds only the chunks the manifest lacks.
Temporary files of builders that died (``kill -9``) are removed when the next build starts
(:func:`meddiff.utils.io.remove_stale_tmp`; a live process's are kept).

Source files can change after they were decoded (a repaired DICOM, a re-download, a same-size replacement copied
with its mtime kept). Pass ``stamps`` (one string per record naming its source files' identity, e.g.
:func:`source_stamp`: size, mtime_ns and a hash of the file's first and last few kB) and every open compares
them with the stamps the chunks were built from: a chunk with a changed, new or vanished file is decoded again
(only that chunk; the rest of the cache is kept), ``index.csv``/``skipped.csv`` are rewritten (a repaired file
leaves the skip list), and a WARNING names the changed files. Stamps are not part of the folder name, so a
changed file never leaves an orphan cache folder behind. A cache built without stamps is rebuilt once (logged).

A record is a mapping with a unique string ``id`` plus any scalar fields (copied into the index). A
``preprocess_fn`` returns either a mapping ``key -> np.ndarray`` or ``Processed`` (arrays + scalar meta for the
index). Raising ``SkipRecord`` (or any exception) skips the record; skips are listed, summarised in a log line, and
never stop the build (both, and the per-chunk worker, are in :mod:`meddiff.data.preprocess.cache_chunks`). Floating arrays are stored as float16 by default (``float_dtype``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from meddiff.data.preprocess.cache_chunks import RESERVED, PreprocessFn, chunk_file, iter_chunk_results
from meddiff.errors import ConfigError, DataError
from meddiff.utils.io import atomic_write_csv, atomic_write_text, remove_stale_tmp

__all__ = [
    "CACHE_FORMAT_VERSION",
    "SliceCache",
    "build_cache",
    "cache_key",
    "cache_path",
    "records_fingerprint",
    "content_tag",
    "settings_hash",
    "source_stamp",
]

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1




# --------------------------------------------------------------------------------------------- hashing
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise ConfigError(
        f"cache settings/records must be JSON-like (dict, list, str, number, bool, None); got {type(obj).__name__}: "
        f"{obj!r}. Convert it to one of those before caching."
    )


def _canonical_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=True)


def settings_hash(settings: Mapping[str, Any], n: int = 12) -> str:
    """Stable hex hash of a JSON-like settings mapping (key order does not matter): ``n`` hex digits."""
    return hashlib.sha256(_canonical_json(settings).encode()).hexdigest()[:n]


def records_fingerprint(records: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the records (all fields, in order): a cache is only valid for the same record list."""
    h = hashlib.sha256()
    for r in records:
        h.update(_canonical_json(r).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(settings: Mapping[str, Any], records: Sequence[Mapping[str, Any]], chunk_size: int) -> dict[str, Any]:
    """The mapping whose hash names the cache folder."""
    return {
        "format": CACHE_FORMAT_VERSION,
        "settings": _jsonable(settings),
        "records": records_fingerprint(records),
        "n_records": len(records),
        "chunk_size": int(chunk_size),
    }


def cache_path(
    cache_root: str | os.PathLike,
    name: str,
    settings: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    chunk_size: int = 512,
) -> Path:
    """``<cache_root>/<name>-<hash12>`` for these settings, records and chunk size (nothing is created)."""
    return Path(cache_root) / f"{name}-{settings_hash(cache_key(settings, records, chunk_size))}"


#: bytes hashed at each end of a source file by :func:`source_stamp` (a DICOM's header and the end of its pixels)
STAMP_EDGE_BYTES = 8192


def content_tag(path: str | os.PathLike, size: int, edge: int = STAMP_EDGE_BYTES) -> str:
    """16 hex digits of sha256 over the first and last ``edge`` bytes of a file of ``size`` bytes (the whole file
    when it is at most ``2 * edge``). Two reads of a few kB, cheap on every open."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= 2 * edge:
            h.update(fh.read())
        else:
            h.update(fh.read(edge))
            fh.seek(size - edge)
            h.update(fh.read(edge))
    return h.hexdigest()[:16]


def source_stamp(*paths: str | os.PathLike | None) -> str:
    """Identity of a record's source files for ``build_cache(stamps=...)``: ``size:mtime_ns:<content tag>`` per
    file, the tag a hash of its first and last :data:`STAMP_EDGE_BYTES` (:func:`content_tag`).

    Size and mtime alone miss a replacement by other content of the same size whose mtime was kept (``cp -p``,
    ``rsync -t``, archive extraction); the tag catches it unless the two files agree in both end blocks. ``None``
    entries (an optional file the record lacks) are left out; a file that does not exist stamps as ``missing``, so
    its appearance later changes the stamp too. ``;`` joins several files.
    """
    parts = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
            tag = content_tag(p, st.st_size)
        except FileNotFoundError:
            parts.append("missing")
            continue
        except OSError as e:  # unreadable: a stamp that never matches a stored one forces a decode
            parts.append(f"error:{type(e).__name__}")
            continue
        parts.append(f"{st.st_size}:{st.st_mtime_ns}:{tag}")
    return ";".join(parts)


def _chunk_stamps(stamps: Sequence[str] | None, n_records: int, chunk_size: int) -> dict[str, str] | None:
    """``{chunk id: sha256 of its records' stamps}`` (None without stamps)."""
    if stamps is None:
        return None
    if len(stamps) != n_records:
        raise DataError(f"got {len(stamps)} source stamps for {n_records} cache records; give one per record.")
    out = {}
    for cid, start in enumerate(range(0, n_records, chunk_size)):
        h = hashlib.sha256()
        for st in stamps[start : start + chunk_size]:
            h.update(str(st).encode())
            h.update(b"\n")
        out[str(cid)] = h.hexdigest()
    return out


def _changed_sources(
    chunk_dir: Path, chunks: Sequence[int], recs: Sequence[Mapping[str, Any]], stamps: Sequence[str],
    chunk_size: int, limit: int = 3,
) -> tuple[int, list[str]]:
    """How many records of ``chunks`` have a stamp other than the one stored in the chunk index, and examples."""
    n, examples = 0, []
    for cid in chunks:
        path = chunk_file(chunk_dir, cid, "index.csv")
        start = cid * chunk_size
        current = {str(r["id"]): str(st) for r, st in zip(recs[start : start + chunk_size],
                                                          stamps[start : start + chunk_size])}
        try:
            old = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=["id", "source_stamp"])
            stored = dict(zip(old["id"], old["source_stamp"]))
        except (OSError, ValueError):  # no index or no stamp column: every record counts as changed
            stored = {}
        for rid, st in current.items():
            if stored.get(rid) != st:
                n += 1
                if len(examples) < limit:
                    examples.append(f"{rid} ({stored.get(rid, 'not stamped')} -> {st})")
    return n, examples


# --------------------------------------------------------------------------------------------- writing
@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock so two processes never build the same cache at once (released when the process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- building
def _validate_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(records):
        if "id" not in r:
            raise DataError(f"cache record {i} has no 'id' field: {dict(r)!r}; every record needs a unique id.")
        clash = [k for k in RESERVED if k in r]
        if clash:
            raise DataError(f"cache record {r['id']!r} uses reserved field(s) {clash}; rename them.")
        out.append({k: v for k, v in r.items()})
    ids = pd.Series([str(r["id"]) for r in out])
    if ids.duplicated().any():
        raise DataError(f"cache records have duplicate ids, e.g. {ids[ids.duplicated()].head(3).tolist()}.")
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_cache(
    records: Sequence[Mapping[str, Any]],
    preprocess_fn: PreprocessFn,
    cache_root: str | os.PathLike,
    name: str,
    settings: Mapping[str, Any],
    *,
    chunk_size: int = 512,
    num_workers: int = 0,
    float_dtype: str = "float16",
    array_shapes: Mapping[str, tuple[Sequence[int], str]] | None = None,
    progress: bool = True,
    mp_context: str | None = None,
    str_columns: Sequence[str] = (),
    stamps: Sequence[str] | None = None,
) -> SliceCache:
    """Build (or resume, or just open) the cache for ``records`` under ``<cache_root>/<name>-<hash12>/``.

    Args:
        records: mappings with a unique ``id`` and JSON-like scalar fields; their order defines the chunks.
        preprocess_fn: ``record -> {key: array}`` or ``Processed``; must be picklable when
            ``num_workers > 0`` with the spawn start method (a module-level function or ``functools.partial``).
        cache_root, name, settings: where, and the preprocessing settings that make this cache unique.
        chunk_size: records per chunk (the unit of parallel work, of resumption and of files on disk).
        num_workers: pool processes (0 = in this process).
        float_dtype: dtype floating arrays are stored in (float16 halves the size of float32).
        array_shapes: optional ``{key: (shape, dtype)}`` every record must match (else inferred per chunk).
        progress: show a tqdm bar.
        mp_context: 'fork' / 'spawn' / 'forkserver' (default: fork on Linux unless CUDA is initialised).
        str_columns: index columns to read back as strings (ids that look numeric).
        stamps: one string per record, the identity of its source files (:func:`source_stamp`); chunks whose
            stamps changed since they were built are decoded again (see the module docstring). None: no check.

    Returns:
        the opened :class:`SliceCache`.
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1.")
    if not records:
        raise DataError(f"no records to cache for {name!r}; check the data source.")
    recs = _validate_records(records)
    key = cache_key(settings, recs, chunk_size)
    folder = Path(cache_root) / f"{name}-{settings_hash(key)}"
    complete = folder / "complete"
    stamps = None if stamps is None else [str(s) for s in stamps]
    want = _chunk_stamps(stamps, len(recs), chunk_size)

    def finished() -> bool:  # complete, and built from the current source files
        if not complete.is_file():
            return False
        return want is None or (_read_json(complete) or {}).get("stamps") == want

    if finished():
        return SliceCache(folder, str_columns=str_columns, expected_key=key)

    chunk_dir = folder / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder):
        if finished():  # another process finished it while we waited for the lock
            return SliceCache(folder, str_columns=str_columns, expected_key=key)
        # leftovers of writers killed mid-write; files of live processes (e.g. a split file being written) stay
        remove_stale_tmp(folder)
        remove_stale_tmp(chunk_dir)
        stored = _read_json(folder / "settings.json")
        if stored is not None and stored != json.loads(_canonical_json(key)):
            raise DataError(f"{folder} holds a cache with other settings (hash collision?); delete the folder.")
        atomic_write_text(folder / "settings.json", json.dumps(_jsonable(key), indent=2, sort_keys=True))

        n_chunks = (len(recs) + chunk_size - 1) // chunk_size
        manifest = _read_json(folder / "manifest.json") or {}
        done: dict[str, dict[str, Any]] = {}
        stale_chunks: list[int] = []
        for cid, summary in (manifest.get("done") or {}).items():
            files = [chunk_file(chunk_dir, int(cid), "index.csv")]
            files += [chunk_file(chunk_dir, int(cid), f"{k}.npy") for k in summary.get("arrays", {})]
            if int(cid) < n_chunks and all(f.is_file() for f in files):
                if want is not None and summary.get("stamps") != want[cid]:
                    stale_chunks.append(int(cid))
                else:
                    done[cid] = summary
        unstamped = [c for c in stale_chunks if not manifest["done"][str(c)].get("stamps")]
        if stale_chunks and len(unstamped) == len(stale_chunks):
            log.warning(
                "cache %s was built without source-file stamps (older meddiff, or stamps=None): decoding %d of %d "
                "chunk(s) again so that files changed since then are read", folder.name, len(stale_chunks), n_chunks,
            )
        elif stale_chunks:
            assert stamps is not None
            stale_chunks.sort()
            n_changed, examples = _changed_sources(chunk_dir, stale_chunks, recs, stamps, chunk_size)
            log.warning(
                "cache %s: %d source file(s) changed since they were decoded (e.g. %s; stamp = size:mtime_ns:content tag); "
                "decoding %d of %d chunk(s) again and rewriting the index and skip list", folder.name, n_changed,
                "; ".join(examples) or "chunks built without stamps", len(stale_chunks), n_chunks,
            )
        # the cache is unfinished from here on: new readers wait for this build instead of opening stale arrays
        complete.unlink(missing_ok=True)
        todo = [i for i in range(n_chunks) if str(i) not in done]
        if done:
            log.info("cache %s: resuming, %d/%d chunks already built", folder.name, len(done), n_chunks)

        shapes = (
            {k: (tuple(int(s) for s in v[0]), np.dtype(v[1]).str) for k, v in array_shapes.items()}
            if array_shapes
            else None
        )
        tasks = [
            (i, recs[i * chunk_size : (i + 1) * chunk_size],
             None if stamps is None else stamps[i * chunk_size : (i + 1) * chunk_size])
            for i in todo
        ]
        init_args = (preprocess_fn, str(chunk_dir), float_dtype, shapes)
        t0 = time.perf_counter()
        n_new = sum(len(t[1]) for t in tasks)
        with tqdm(total=len(recs), initial=len(recs) - n_new, desc=f"cache {name}", disable=not progress,
                  unit="rec", smoothing=0.1) as bar:
            for summary in iter_chunk_results(tasks, init_args, num_workers, mp_context):
                if want is not None:  # the stamps taken before decoding: a file changed meanwhile decodes again
                    summary["stamps"] = want[str(summary["chunk"])]
                done[str(summary["chunk"])] = summary
                atomic_write_text(folder / "manifest.json", json.dumps({"n_chunks": n_chunks, "done": done}))
                bar.update(summary["n_records"])
        elapsed = time.perf_counter() - t0

        _finalize(folder, chunk_dir, n_chunks, done, key, elapsed, n_new, want)
    return SliceCache(folder, str_columns=str_columns, expected_key=key)


def _finalize(
    folder: Path, chunk_dir: Path, n_chunks: int, done: dict[str, dict[str, Any]], key: dict, elapsed: float,
    n_new: int, stamps: dict[str, str] | None = None,
) -> None:
    specs = {json.dumps(s["arrays"], sort_keys=True) for s in done.values() if s["arrays"]}
    if len(specs) > 1:
        raise DataError(
            f"chunks of {folder} hold arrays of different shapes/dtypes {sorted(specs)}; preprocess_fn must return "
            f"fixed shapes (pass array_shapes to enforce them). Delete the folder and rebuild."
        )
    arrays = json.loads(specs.pop()) if specs else {}
    frames, offset = [], 0
    for cid in range(n_chunks):
        df = pd.read_csv(chunk_file(chunk_dir, cid, "index.csv"), dtype={"id": str}, keep_default_na=False,
                         na_values=[""])
        df["ok"] = df["ok"].astype(str).str.lower().isin(["true", "1"])
        df["chunk"] = cid
        n_ok = int(df["ok"].sum())
        row = np.full(len(df), -1, dtype=np.int64)
        row[df["ok"].to_numpy()] = np.arange(offset, offset + n_ok)
        offset += n_ok
        df.insert(0, "row", row)
        frames.append(df)
    index = pd.concat(frames, ignore_index=True)
    for c in ("kind", "reason", "source_stamp"):
        if c in index:
            index[c] = index[c].fillna("").astype(str)
    skipped = index[~index["ok"]]
    atomic_write_csv(folder / "index.csv", index)
    atomic_write_csv(folder / "skipped.csv", skipped)
    n_skip = len(skipped)
    kinds = ", ".join(f"{k}: {n}" for k, n in Counter(skipped["kind"]).most_common())
    rate = f", {n_new / elapsed:.1f} rec/s" if n_new and elapsed > 0 else ""
    if n_skip:
        log.warning("cache %s: %d ok, %d skipped (%s; listed in %s)%s", folder.name, offset, n_skip, kinds,
                    folder / "skipped.csv", rate)
    else:
        log.info("cache %s: %d ok, 0 skipped%s", folder.name, offset, rate)
    if offset == 0:
        raise DataError(
            f"every record failed preprocessing for cache {folder}; first reasons: "
            f"{skipped['reason'].head(3).tolist()}. Fix the data or preprocess_fn, then rerun."
        )
    marker = {"key": _jsonable(key), "n_records": len(index), "n_ok": offset, "n_skipped": n_skip, "arrays": arrays}
    if stamps is not None:
        marker["stamps"] = stamps
    atomic_write_text(folder / "complete", json.dumps(marker, indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------- reading
class SliceCache:
    """Read access to a finished cache: ``cache.get(key, row)`` returns one record's array (a copy).

    Rows ``0 .. len(cache)-1`` are the good records in index order; :attr:`index` lists them (``row >= 0``) and
    the skipped ones (``row == -1``). Memory maps open lazily per process, so the object pickles cheaply into
    DataLoader workers.

    Raises:
        DataError: the folder lacks the ``complete`` marker (unfinished build) or its key differs from
            ``expected_key``.
    """

    def __init__(
        self, path: str | os.PathLike, str_columns: Sequence[str] = (), expected_key: Mapping[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        marker = _read_json(self.path / "complete")
        if marker is None:
            raise DataError(
                f"{self.path} is not a finished cache (no valid 'complete' marker); rerun the build to resume it."
            )
        if expected_key is not None and marker.get("key") != json.loads(_canonical_json(expected_key)):
            raise DataError(f"cache {self.path} was built with other settings; delete it or use another cache_root.")
        self.key: dict[str, Any] = marker["key"]
        self.settings: dict[str, Any] = self.key.get("settings", {})
        self.arrays: dict[str, tuple[tuple[int, ...], str]] = {
            k: (tuple(v[0]), v[1]) for k, v in marker.get("arrays", {}).items()
        }
        dtypes = {c: str for c in ("id", "kind", "reason", "source_stamp", *str_columns)}
        index = pd.read_csv(self.path / "index.csv", dtype=dtypes, keep_default_na=False, na_values=[""])
        for c in dtypes:
            if c in index:
                index[c] = index[c].fillna("")
        index["ok"] = index["ok"].astype(str).str.lower().isin(["true", "1"])
        self.index: pd.DataFrame = index
        good = index[index["row"] >= 0].sort_values("row")
        self._chunks = good["chunk"].to_numpy(np.int64)
        starts = good.groupby("chunk")["row"].min()
        self._chunk_start = {int(c): int(s) for c, s in starts.items()}
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._chunks.size)

    @property
    def ok_index(self) -> pd.DataFrame:
        """Index rows of the good records, ordered by ``row``."""
        return self.index[self.index["row"] >= 0].sort_values("row").reset_index(drop=True)

    @property
    def skipped(self) -> pd.DataFrame:
        """Index rows of the skipped records (``kind``, ``reason`` say why)."""
        return self.index[self.index["row"] < 0].reset_index(drop=True)

    def _map(self, chunk: int, key: str) -> np.ndarray:
        m = self._maps.get((chunk, key))
        if m is None:
            path = chunk_file(self.path / "chunks", chunk, f"{key}.npy")
            try:
                m = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"cannot open cache file {path}: {e}; delete {self.path} and rebuild.") from e
            self._maps[(chunk, key)] = m
        return m

    def get(self, key: str, row: int) -> np.ndarray:
        """Array ``key`` of good record ``row`` (a writable copy, dtype as stored)."""
        if key not in self.arrays:
            raise KeyError(f"cache {self.path.name} has no array {key!r}; it has {sorted(self.arrays)}")
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for cache of {len(self)} records")
        chunk = int(self._chunks[row])
        return np.array(self._map(chunk, key)[row - self._chunk_start[chunk]])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
