"""ADNI ``dataset.json`` format (seed 004): records ``{"image": ..., "slice_label": 1..5}`` -> :class:`ADNIEntry`.

A task dir ``<root>/<task>/`` holds ``dataset.json``::

    [{"image": "cn/cn0.nii.gz", "slice_label": 1}, {"image": "ad/ad0.nii.gz", "slice_label": 5}, ...]

``slice_label`` (alias ``label``; an int 1..5 or a class name) is the ADNI class CN=1, EMCI=2, MCI=3, LMCI=4,
AD=5; image paths are relative to the task dir (absolute paths work too). An optional ``"subject"`` key groups
several volumes of one subject for the splits; without it every volume is its own subject.

No Lightning, no torch: parsing only. Errors are :class:`meddiff.errors.DataError` naming the entry.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.formats.nifti import strip_nifti_suffix
from meddiff.errors import DataError

__all__ = [
    "CLASS_NAMES",
    "ADNIEntry",
    "entry_from_dict",
    "parse_label",
    "read_dataset_json",
    "read_json_list",
]

#: class names indexed by ``class_label`` (= ``slice_label - 1``)
CLASS_NAMES: tuple[str, ...] = ("CN", "EMCI", "MCI", "LMCI", "AD")
_NAME_TO_SLICE_LABEL = {n.lower(): i + 1 for i, n in enumerate(CLASS_NAMES)}


@dataclass(frozen=True)
class ADNIEntry:
    """One ``dataset.json`` record.

    Attributes:
        image: the path as written in the json.
        path: resolved file path.
        slice_label: ADNI class 1..5 (CN, EMCI, MCI, LMCI, AD).
        volume_id: ``image`` relative to the task dir, POSIX, without ``.nii``/``.nii.gz`` (e.g. ``cn/cn0``).
        subject: subject id for splits (the json's ``subject`` or ``volume_id``).
        position: 0-based index in the json list.
    """

    image: str
    path: Path
    slice_label: int
    volume_id: str
    subject: str
    position: int = 0

    @property
    def class_label(self) -> int:
        """0..4 (CN..AD)."""
        return self.slice_label - 1

    @property
    def label(self) -> int:
        """0 healthy (CN), 1 otherwise."""
        return int(self.slice_label != 1)

    def describe(self) -> str:
        """Human-readable name used in every error about this entry."""
        return f"dataset.json entry #{self.position} (image {self.image!r}, slice_label {self.slice_label})"


def parse_label(value: Any, where: str) -> int:
    """ADNI ``slice_label`` 1..5 from an int, an integral float, a digit string or a class name (``"AD"``).

    Raises:
        DataError: prefixed with ``where`` (what is being parsed), for a value that is not a class or is
            outside 1-5.
    """
    if isinstance(value, str):
        v = value.strip()
        if v.lower() in _NAME_TO_SLICE_LABEL:
            return _NAME_TO_SLICE_LABEL[v.lower()]
        if re.fullmatch(r"[+-]?\d+", v):
            value = int(v)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(
            f"{where}: slice_label {value!r} is not a class; use an integer 1-5 "
            "(CN=1, EMCI=2, MCI=3, LMCI=4, AD=5) or a class name"
        )
    if not 1 <= int(value) <= 5:
        raise DataError(
            f"{where}: slice_label {int(value)} is outside 1-5 (CN=1, EMCI=2, MCI=3, LMCI=4, AD=5); fix the label"
        )
    return int(value)


def entry_from_dict(
    record: Mapping[str, Any],
    base_dir: str | os.PathLike[str] = ".",
    position: int = 0,
    check_file: bool = True,
) -> ADNIEntry:
    """Parse one record ``{"image": ..., "slice_label": 1..5}`` (alias ``label``; optional ``subject``).

    Also serves single-volume inference inputs such as the seed's
    ``{"image": "data/2d_cfg_anom_det/ad/ad0.nii.gz", "label": 5}`` (with ``base_dir="."``).

    Raises:
        DataError: naming the entry, for a non-dict record, a missing ``image``, a label that is missing, not a
            class or outside 1-5, conflicting ``slice_label``/``label``, or (``check_file``) a missing file.
    """
    where = f"dataset.json entry #{position}"
    if not isinstance(record, Mapping):
        raise DataError(f'{where} ({record!r}) is not an object; write {{"image": ..., "slice_label": 1..5}}')
    image = record.get("image")
    where = f"{where} (image {image!r})"
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: needs an 'image' path string, e.g. \"cn/cn0.nii.gz\"")
    if "slice_label" in record and "label" in record:
        a, b = parse_label(record["slice_label"], where), parse_label(record["label"], where)
        if a != b:
            raise DataError(f"{where}: slice_label {a} and label {b} disagree; keep one")
        lab = a
    elif "slice_label" in record or "label" in record:
        lab = parse_label(record.get("slice_label", record.get("label")), where)
    else:
        raise DataError(f"{where}: no 'slice_label' (or 'label'); add one of 1-5 (CN=1 ... AD=5)")
    base = Path(base_dir)
    p = Path(image)
    path = p if p.is_absolute() else base / p
    if check_file and not path.is_file():
        raise DataError(
            f"{where}: image file {str(path)!r} not found; fix the path (relative to {str(base)!r}) or remove "
            "the entry"
        )
    if p.is_absolute():
        try:
            rel = path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            rel = p.name
    else:
        rel = p.as_posix()
    volume_id = strip_nifti_suffix(rel)
    subject = record.get("subject", volume_id)
    return ADNIEntry(
        image=image,
        path=path,
        slice_label=lab,
        volume_id=volume_id,
        subject=str(subject),
        position=int(position),
    )


def read_json_list(path: str | os.PathLike[str], what: str | None = None) -> list[Any]:
    """The top-level JSON list of ``path`` (records not yet parsed).

    Args:
        path: the json file.
        what: the option that named the file (e.g. ``"eval.input"``), used in error messages.

    Raises:
        DataError: naming the file, for a missing file, invalid JSON or a non-list top level.
    """
    path = Path(path)
    name = repr(str(path)) if what is None else f"{what}={str(path)!r}"
    if not path.is_file():
        raise DataError(
            f'{name} not found; a task dir needs dataset.json = [{{"image": "cn/cn0.nii.gz", '
            '"slice_label": 1}, ...] (write a synthetic one with scripts/make_synthetic_adni.py)'
        )
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{name} is not valid JSON ({exc}); check for a missing comma between entries") from exc
    if not isinstance(records, list):
        raise DataError(f"{name} must hold a JSON list of entries, found {type(records).__name__}")
    return records


def read_dataset_json(
    path: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> list[ADNIEntry]:
    """Read the seed's ``dataset.json`` (a list of records, see :func:`entry_from_dict`).

    Args:
        path: the json file.
        base_dir: dir the image paths are relative to (default: the json's dir, i.e. the task dir).
        check_files: raise for a missing image file (``False``: leave it to the loading step, which can skip it).

    Raises:
        DataError: missing/invalid json, a non-list top level, a bad entry (named), a volume listed twice.
    """
    path = Path(path)
    records = read_json_list(path)
    base = Path(base_dir) if base_dir is not None else path.parent
    entries = [entry_from_dict(r, base, i, check_files) for i, r in enumerate(records)]
    seen: dict[str, ADNIEntry] = {}
    for e in entries:
        if e.volume_id in seen:
            raise DataError(
                f"{e.describe()} repeats the volume of {seen[e.volume_id].describe()}; list each once"
            )
        seen[e.volume_id] = e
    return entries
