"""ADNI volumes for per-volume protocols (e.g. guided translation): :class:`VolumeSource`, :class:`Volumes`,
:func:`volume_source` and :func:`input_volumes` (an external ``.nii.gz``, ``dataset.json`` or record).

A :class:`VolumeSource`'s ``load()`` gives the volume's slices as :class:`meddiff.data.preprocess.mri_slices.VolumeData`
(images ``[S, 1, H, W]`` in ``[-1, 1]``, brain masks, axis and index per slice).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddiff.data.formats.adni_json import (
    CLASS_NAMES,
    ADNIEntry,
    entry_from_dict,
    parse_label,
    read_json_list,
)
from meddiff.data.formats.nifti import is_nifti, strip_nifti_suffix
from meddiff.data.preprocess.mri_slices import SliceSettings, VolumeData, volume_slices
from meddiff.errors import DataError

__all__ = ["VolumeSource", "Volumes", "input_volumes", "volume_source"]

@dataclass
class VolumeSource:
    """A volume to evaluate: id, ADNI ``slice_label`` 1..5 (None = unknown), a loader of its slices, a name for
    messages, and its subject (volumes of one subject are resampled together in bootstrap CIs; None = the volume
    is its own subject)."""

    volume_id: str
    slice_label: int | None
    load: Callable[[], VolumeData]
    name: str = ""
    subject: str | None = None

    @property
    def class_name(self) -> str:
        """``CN`` .. ``AD``, or ``?`` when the class is unknown."""
        return CLASS_NAMES[self.slice_label - 1] if self.slice_label else "?"


@dataclass
class Volumes:
    """Volumes of a split or an input.

    Attributes:
        sources: the loadable volumes, in dataset order.
        skipped: ``{"volume": image, "reason": why}`` for volumes that could not be listed or loaded.
        batch: False for one named input volume (a failure is then an error, not a skip).
    """

    sources: list[VolumeSource]
    skipped: list[dict[str, str]] = field(default_factory=list)
    batch: bool = True


def volume_source(entry: ADNIEntry | str | os.PathLike[str], settings: SliceSettings | None = None) -> VolumeSource:
    """A :class:`VolumeSource` that slices ``entry`` (an :class:`ADNIEntry` or a NIfTI path) when loaded (no cache).

    A bare path has an unknown class and the file name without ``.nii[.gz]`` as its id.
    """

    def load() -> VolumeData:
        return volume_slices(entry, settings).to_volume_data()

    if isinstance(entry, ADNIEntry):
        return VolumeSource(entry.volume_id, entry.slice_label, load, entry.describe(), entry.subject)
    path = Path(entry)
    return VolumeSource(strip_nifti_suffix(path.name), None, load, f"volume {str(path)!r}")


def input_volumes(
    spec: Any,
    input_label: Any = None,
    settings: SliceSettings | None = None,
    what: str = "input",
) -> Volumes:
    """Volumes named by an input option (e.g. ``eval.input``), sliced with ``settings``.

    Args:
        spec: a ``.nii``/``.nii.gz`` path, a ``dataset.json`` path (every entry; paths relative to the json's dir),
            a JSON record string or a mapping ``{"image": ..., "label"|"slice_label": 1..5}`` (the seed's
            ``--infDict``; a relative image path is relative to the working dir).
        input_label: class of a bare volume (1..5 or a name), or None (unknown).
        settings: slicing settings (default :class:`SliceSettings()`); use the DataModule's to match training.
        what: the option name used in error messages.

    Returns:
        :class:`Volumes`; bad ``dataset.json`` entries are skipped and listed (``batch=True``), a single volume
        has ``batch=False``.

    Raises:
        DataError: naming ``what``, for a bad single input (missing file, bad record or label) or an unreadable
            json.
    """
    if isinstance(spec, str) and spec.strip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{what}={spec!r} is not a valid JSON record ({exc}); write "
                '{"image": "path/to/vol.nii.gz", "label": 5}'
            ) from exc
    if isinstance(spec, Mapping):
        entry = entry_from_dict(dict(spec), base_dir=".", position=0, check_file=True)
        return Volumes([volume_source(entry, settings)], [], batch=False)
    path = Path(str(spec)).expanduser()
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise DataError(f"{what}={str(path)!r} not found; give a dataset.json, a .nii.gz volume or a record.")
        sources, skipped = [], []
        for i, rec in enumerate(read_json_list(path, what)):
            try:
                entry = entry_from_dict(rec, base_dir=path.parent, position=i, check_file=False)
            except DataError as exc:
                image = rec.get("image") if isinstance(rec, Mapping) else rec
                skipped.append({"volume": str(image), "reason": str(exc)})
                continue
            sources.append(volume_source(entry, settings))
        return Volumes(sources, skipped, batch=True)
    if not is_nifti(path.name):
        raise DataError(f"{what}={str(path)!r} is neither a .nii/.nii.gz volume nor a dataset.json.")
    if not path.is_file():
        raise DataError(f"{what} volume {str(path)!r} not found; check the path.")
    if input_label is None:
        return Volumes([volume_source(path, settings)], [], batch=False)
    lab = parse_label(input_label, f"{what}_label for {str(path)!r}")
    vid = strip_nifti_suffix(path.name)
    entry = ADNIEntry(image=str(path), path=path, slice_label=lab, volume_id=vid, subject=vid)
    return Volumes([volume_source(entry, settings)], [], batch=False)
