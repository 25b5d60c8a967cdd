"""Generic preprocessing cache: hashing, layout, skips, resume after interruption, atomic writes, pool."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import meddiff.data.preprocess.cache as cache_mod
import meddiff.data.preprocess.cache_chunks as chunks_mod
from meddiff.data.preprocess.cache import (
    SliceCache,
    build_cache,
    cache_path,
    settings_hash,
    source_stamp,
)
from meddiff.data.preprocess.cache_chunks import Processed, SkipRecord
from meddiff.errors import DataError

CALLS: list[str] = []


class Interrupt(BaseException):
    """Stands in for Ctrl-C / a killed job (not an Exception, so it is not swallowed as a skip)."""


def toy_preprocess(rec: dict) -> Processed:
    """x = i (float32 -> stored float16), mask = i odd; skips i % 7 == 3, fails on i == 5."""
    CALLS.append(rec["id"])
    i = int(rec["i"])
    if i % 7 == 3:
        raise SkipRecord(f"record {i} is near-empty", kind="near_empty")
    if i == 5:
        raise ValueError("corrupt pixel data")
    return Processed(
        {"x": np.full((2, 3), i + 0.25, dtype=np.float32), "mask": np.full((1, 2, 3), i % 2 == 1)},
        {"subject": f"s{i // 4}", "double": 2 * i},
    )


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i:03d}", "i": i} for i in range(n)]


SETTINGS = {"image_size": 8, "windows": ["brain"], "crop": True}


def _expected_ok(n: int) -> list[int]:
    return [i for i in range(n) if i % 7 != 3 and i != 5]


def _check_contents(cache: SliceCache, n: int) -> None:
    ok = _expected_ok(n)
    assert len(cache) == len(ok)
    idx = cache.ok_index
    assert idx["id"].tolist() == [f"r{i:03d}" for i in ok] and idx["row"].tolist() == list(range(len(ok)))
    for row, i in enumerate(ok):
        x = cache.get("x", row)
        assert x.dtype == np.float16 and x.shape == (2, 3) and np.all(x == np.float16(i + 0.25))
        assert cache.get("mask", row).dtype == bool and bool(cache.get("mask", row).all()) == (i % 2 == 1)
    assert idx["double"].tolist() == [2 * i for i in ok] and idx["subject"].iloc[0] == "s0"


def test_settings_hash_is_stable_and_sensitive(tmp_path):
    a = {"image_size": 96, "windows": ["brain", "bone"], "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "windows": ["brain", "bone"], "image_size": 96}
    assert settings_hash(a) == settings_hash(b) and len(settings_hash(a)) == 12
    assert settings_hash(a) != settings_hash({**a, "image_size": 128})
    assert settings_hash(a) != settings_hash({**a, "windows": ["bone", "brain"]})
    recs = _records(4)
    p1 = cache_path(tmp_path, "toy", a, recs)
    assert p1 == cache_path(tmp_path, "toy", b, recs) and p1.name.startswith("toy-")
    assert p1 != cache_path(tmp_path, "toy", {**a, "image_size": 128}, recs)
    assert p1 != cache_path(tmp_path, "toy", a, recs[:3])  # other records -> other cache
    assert p1 != cache_path(tmp_path, "toy", a, recs, chunk_size=2)


def test_build_layout_skips_and_reuse(tmp_path, caplog):
    CALLS.clear()
    with caplog.at_level(logging.INFO, logger="meddiff.data.preprocess.cache"):
        cache = build_cache(_records(20), toy_preprocess, tmp_path, "toy", SETTINGS, chunk_size=6, progress=False)
    folder = cache.path
    assert folder == cache_path(tmp_path, "toy", SETTINGS, _records(20), 6)
    _check_contents(cache, 20)
    marker = json.loads((folder / "complete").read_text())
    assert marker["key"]["settings"] == SETTINGS and marker["n_ok"] == len(_expected_ok(20))
    assert json.loads((folder / "settings.json").read_text())["settings"] == SETTINGS
    assert sorted(p.name for p in (folder / "chunks").glob("c00000.*")) == [
        "c00000.index.csv", "c00000.mask.npy", "c00000.x.npy"
    ]
    skipped = pd.read_csv(folder / "skipped.csv")
    assert skipped["id"].tolist() == ["r003", "r005", "r010", "r017"]
    assert skipped.set_index("id").loc["r005", "reason"] == "ValueError: corrupt pixel data"
    assert skipped.set_index("id").loc["r010", "kind"] == "near_empty"
    assert (cache.skipped["row"] == -1).all() and len(cache.index) == 20
    assert any("4 skipped" in r.getMessage() and "near_empty: 3" in r.getMessage() for r in caplog.records)
    # same settings -> the finished cache is opened, nothing recomputed
    CALLS.clear()
    again = build_cache(_records(20), toy_preprocess, tmp_path, "toy", SETTINGS, chunk_size=6, progress=False)
    assert again.path == folder and CALLS == []
    # other settings -> another folder, built from scratch; the first is untouched
    other = build_cache(_records(20), toy_preprocess, tmp_path, "toy", {**SETTINGS, "image_size": 16},
                        chunk_size=6, progress=False)
    assert other.path != folder and len(CALLS) == 20 and (folder / "complete").is_file()


def test_resume_after_interruption_builds_only_missing_chunks(tmp_path):
    recs = _records(30)

    def interrupting(rec):  # the job dies while processing record 13 (in chunk 3 of size 4)
        if rec["i"] == 13:
            raise Interrupt()
        return toy_preprocess(rec)

    with pytest.raises(Interrupt):
        build_cache(recs, interrupting, tmp_path, "toy", SETTINGS, chunk_size=4, progress=False)
    folder = cache_path(tmp_path, "toy", SETTINGS, recs, 4)
    assert not (folder / "complete").exists()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(int(c) for c in manifest["done"]) == [0, 1, 2]  # records 0..11 finished
    with pytest.raises(DataError, match="not a finished cache"):
        SliceCache(folder)
    CALLS.clear()
    cache = build_cache(recs, toy_preprocess, tmp_path, "toy", SETTINGS, chunk_size=4, progress=False)
    assert CALLS == [f"r{i:03d}" for i in range(12, 30)]  # only the missing chunks were built
    _check_contents(cache, 30)


def test_atomic_writes_leave_no_partial_files(tmp_path, monkeypatch):
    recs = _records(12)
    folder = cache_path(tmp_path, "toy", SETTINGS, recs, 4)
    real_replace = os.replace
    state = {"n": 0}

    def failing_replace(src, dst):
        if str(dst).endswith("c00001.mask.npy"):
            state["n"] += 1
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        build_cache(recs, toy_preprocess, tmp_path, "toy", SETTINGS, chunk_size=4, progress=False)
    assert state["n"] == 1
    chunk_files = sorted(p.name for p in (folder / "chunks").iterdir())
    assert "c00001.mask.npy" not in chunk_files
    assert not [n for n in chunk_files if ".tmp" in n]  # temporary files are removed on failure
    manifest = json.loads((folder / "manifest.json").read_text())
    assert list(manifest["done"]) == ["0"]
    monkeypatch.setattr(cache_mod.os, "replace", real_replace)
    # a garbage file at a chunk path the manifest does not list is rebuilt, never trusted
    (folder / "chunks" / "c00001.x.npy").write_bytes(b"garbage")
    # a temporary of a killed writer (its pid is dead) is removed; one of a live process is never touched
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = folder / "chunks" / f".c00002.x.npy.{proc.pid}.abc123_x.tmp"
    dead.write_bytes(b"leftover of a killed writer")
    live = folder / f".split_seed0.csv.{os.getpid()}.q1w2e3r4.tmp"
    live.write_bytes(b"being written by a live process")
    cache = build_cache(recs, toy_preprocess, tmp_path, "toy", SETTINGS, chunk_size=4, progress=False)
    _check_contents(cache, 12)
    assert not list((folder / "chunks").glob(".*tmp*")) and live.is_file()
    live.unlink()
    # an atomic save that fails midway keeps the previous file intact
    target = tmp_path / "a.npy"
    chunks_mod._write_npy(target, np.arange(3))

    def boom(*a, **k):
        raise OSError("crash mid-write")

    monkeypatch.setattr(cache_mod.os, "fsync", boom)
    with pytest.raises(OSError):
        chunks_mod._write_npy(target, np.arange(5))
    assert np.load(target).tolist() == [0, 1, 2] and [p.name for p in tmp_path.glob(".a.npy*")] == []


def test_cache_files_have_the_ordinary_file_mode(tmp_path):
    """Every cache file goes through meddiff.utils.io: readable by the group (0644 under umask 022), never 0600."""
    old = os.umask(0o022)
    try:
        cache = build_cache(_records(9), toy_preprocess, tmp_path, "toy", SETTINGS, chunk_size=4, progress=False)
    finally:
        os.umask(old)
    files = [p for p in cache.path.rglob("*") if p.is_file() and p.name != ".lock"]
    assert {"settings.json", "manifest.json", "index.csv", "skipped.csv", "complete", "c00000.x.npy"} <= {
        p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


def test_pool_matches_in_process(tmp_path):
    recs = _records(40)
    a = build_cache(recs, toy_preprocess, tmp_path / "a", "toy", SETTINGS, chunk_size=5, num_workers=0,
                    progress=False)
    b = build_cache(recs, toy_preprocess, tmp_path / "b", "toy", SETTINGS, chunk_size=5, num_workers=2,
                    progress=False)
    assert a.path.name == b.path.name
    pd.testing.assert_frame_equal(a.index, b.index)
    for row in range(len(a)):
        assert np.array_equal(a.get("x", row), b.get("x", row))
    _check_contents(b, 40)


def test_shape_mismatch_and_bad_records(tmp_path):
    def varying(rec):
        n = 3 if rec["i"] != 2 else 4
        return {"x": np.zeros((n,), dtype=np.float32)}

    cache = build_cache(_records(5), varying, tmp_path, "var", {}, chunk_size=10, progress=False)
    assert cache.skipped["id"].tolist() == ["r002"] and "shape" in cache.skipped["reason"].iloc[0]
    enforced = build_cache(_records(5), varying, tmp_path, "var2", {}, chunk_size=10, progress=False,
                           array_shapes={"x": ((4,), "float16")})
    assert enforced.ok_index["id"].tolist() == ["r002"]
    with pytest.raises(DataError, match="duplicate ids"):
        build_cache([{"id": "a"}, {"id": "a"}], varying, tmp_path, "dup", {}, progress=False)
    with pytest.raises(DataError, match="no 'id'"):
        build_cache([{"i": 1}], varying, tmp_path, "noid", {}, progress=False)
    def always_bad(rec):
        raise DataError(f"bad file {rec['id']}")

    with pytest.raises(DataError, match="every record failed.*bad file r000"):
        build_cache(_records(3), always_bad, tmp_path, "allbad", {}, progress=False)


# ------------------------------------------------------------------------------------------- source stamps
def file_preprocess(rec: dict) -> Processed:
    """x = the number in the record's file; a file holding 'bad' is skipped."""
    CALLS.append(rec["id"])
    text = open(rec["path"]).read()
    if text == "bad":
        raise SkipRecord(f"{rec['path']} is bad", kind="bad_file")
    return Processed({"x": np.full((2,), float(text), dtype=np.float32)})


def _file_records(folder, n: int) -> list[dict]:
    folder.mkdir(exist_ok=True)
    recs = []
    for i in range(n):
        p = folder / f"f{i:02d}.txt"
        if not p.exists():
            p.write_text("bad" if i == 6 else str(i))
        recs.append({"id": f"f{i:02d}", "path": str(p)})
    return recs


def _stamps(recs: list[dict]) -> list[str]:
    return [source_stamp(r["path"]) for r in recs]


def test_changed_source_files_are_decoded_again_chunk_by_chunk(tmp_path, caplog):
    recs = _file_records(tmp_path / "src", 10)
    build = lambda: build_cache(recs, file_preprocess, tmp_path, "f", {}, chunk_size=4, progress=False,  # noqa: E731
                                stamps=_stamps(recs))
    CALLS.clear()
    cache = build()
    assert len(CALLS) == 10 and cache.skipped["id"].tolist() == ["f06"]
    assert cache.index["source_stamp"].tolist() == _stamps(recs)
    CALLS.clear()
    assert build().path == cache.path and CALLS == []  # unchanged files: opened as is
    # repair f06 (chunk 1): only chunk 1 is decoded again; f06 leaves the skip list; the folder stays the same
    (tmp_path / "src" / "f06.txt").write_text("60")
    with caplog.at_level(logging.WARNING, logger="meddiff.data.preprocess.cache"):
        fixed = build()
    assert CALLS == ["f04", "f05", "f06", "f07"] and fixed.path == cache.path
    assert fixed.skipped.empty and not len(pd.read_csv(fixed.path / "skipped.csv"))
    assert fixed.get("x", 6).tolist() == [60.0, 60.0] and fixed.get("x", 9).tolist() == [9.0, 9.0]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "1 source file(s) changed" in msg and "f06" in msg and "decoding 1 of 3 chunk(s) again" in msg
    # a vanished file changes its stamp too: decoded again, then listed as skipped
    os.remove(tmp_path / "src" / "f09.txt")
    CALLS.clear()
    gone = build()
    assert CALLS == ["f08", "f09"] and gone.skipped["id"].tolist() == ["f09"]
    assert "FileNotFoundError" in gone.skipped["reason"].iloc[0]
    with pytest.raises(DataError, match="9 source stamps for 10"):
        build_cache(recs, file_preprocess, tmp_path, "f", {}, chunk_size=4, progress=False, stamps=_stamps(recs)[:9])


@pytest.mark.parametrize("big", [False, True], ids=["small file: whole-file hash", "big file: end blocks"])
def test_a_same_size_same_mtime_replacement_is_decoded_again(tmp_path, big):
    recs = _file_records(tmp_path / "src", 3)
    path = Path(recs[1]["path"])
    pad = " " * (3 * cache_mod.STAMP_EDGE_BYTES) if big else ""
    path.write_text(f"1{pad}\n")
    build = lambda: build_cache(recs, file_preprocess, tmp_path, "f", {}, chunk_size=4, progress=False,  # noqa: E731
                                stamps=_stamps(recs))
    assert build().get("x", 1).tolist() == [1.0, 1.0]
    st = path.stat()
    path.write_text(f"{pad}\n7")  # same size; the changed bytes sit in the first (and last) block
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored, as cp -p / rsync -t would
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    CALLS.clear()
    again = build()
    assert CALLS == ["f00", "f01", "f02"] and again.get("x", 1).tolist() == [7.0, 7.0]


def test_a_cache_built_without_stamps_is_rebuilt_once_with_them(tmp_path, caplog):
    recs = _file_records(tmp_path / "src", 6)
    old = build_cache(recs, file_preprocess, tmp_path, "f", {}, chunk_size=4, progress=False)
    (tmp_path / "src" / "f01.txt").write_text("10")  # changed after an old build that recorded no stamps
    CALLS.clear()
    with caplog.at_level(logging.WARNING, logger="meddiff.data.preprocess.cache"):
        new = build_cache(recs, file_preprocess, tmp_path, "f", {}, chunk_size=4, progress=False,
                          stamps=_stamps(recs))
    assert new.path == old.path and len(CALLS) == 6 and new.get("x", 1).tolist() == [10.0, 10.0]
    assert any("built without source-file stamps" in r.getMessage() for r in caplog.records)


def test_a_file_changed_during_an_interrupted_build_is_decoded_again_on_resume(tmp_path):
    recs = _file_records(tmp_path / "src", 8)

    def interrupting(rec):
        if rec["id"] == "f05":
            raise Interrupt()
        return file_preprocess(rec)

    with pytest.raises(Interrupt):
        build_cache(recs, interrupting, tmp_path, "f", {}, chunk_size=2, progress=False, stamps=_stamps(recs))
    (tmp_path / "src" / "f00.txt").write_text("100")  # in chunk 0, already built before the interruption
    CALLS.clear()
    cache = build_cache(recs, file_preprocess, tmp_path, "f", {}, chunk_size=2, progress=False,
                        stamps=_stamps(recs))
    assert CALLS == ["f00", "f01", "f04", "f05", "f06", "f07"]  # chunk 1 (f02, f03) was kept
    assert cache.get("x", 0).tolist() == [100.0, 100.0]
