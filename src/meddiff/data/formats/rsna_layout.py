"""The RSNA Intracranial Hemorrhage folder layout (the Kaggle download, or the synthetic generator's output)::

    <root>/stage_2_train.csv            ID,Label   (ID = ID_<hex>_<subtype>, six rows per image)
    <root>/stage_2_train/ID_<hex>.dcm   one CT slice per file
    <root>/masks/ID_<hex>.png           optional (synthetic data): uint8 label map, > 0 = hemorrhage

:func:`check_rsna_layout` checks a root; :func:`rsna_records` lists its slices as records for the preprocessing
cache (:mod:`meddiff.data.preprocess.cache`). No decoding happens here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.formats.rsna_labels import LABEL_COLUMNS, parse_rsna_labels
from meddiff.errors import ConfigError, DataError

__all__ = ["RSNA_LAYOUT", "check_rsna_layout", "rsna_records"]

RSNA_LAYOUT = (
    "expected <root>/stage_2_train.csv (Kaggle 'ID,Label', ID = ID_<hex>_<subtype>) and "
    "<root>/stage_2_train/ID_<hex>.dcm; generate a synthetic one with "
    "`python scripts/make_synthetic_rsna.py --root <root>` or set data.synthetic=true"
)


def check_rsna_layout(root: str | os.PathLike) -> tuple[Path, Path]:
    """``(csv_path, dicom_dir)`` of an RSNA root; :class:`DataError` naming the missing path otherwise."""
    root = Path(root)
    csv, dcm = root / "stage_2_train.csv", root / "stage_2_train"
    for p in (root, csv, dcm):
        if not p.exists():
            raise DataError(f"RSNA data path {str(p)!r} does not exist; {RSNA_LAYOUT}.")
    return csv, dcm


def rsna_records(
    root: str | os.PathLike, max_slices: int | None = None, seed: int = 0, with_masks: bool | None = None
) -> list[dict[str, Any]]:
    """Cache records (sorted by id): ``id``, ``file`` (relative path), the six labels, optional ``mask_file``.

    ``max_slices`` keeps a seeded random subset (for quick runs). ``with_masks`` defaults to whether
    ``<root>/masks`` exists.
    """
    csv, _ = check_rsna_layout(root)
    labels = parse_rsna_labels(csv)
    if max_slices is not None:
        if int(max_slices) < 1:
            raise ConfigError(f"max_slices={max_slices} must be >= 1 (or null for all slices).")
        if max_slices < len(labels):
            keep = np.sort(np.random.default_rng(seed).choice(len(labels), int(max_slices), replace=False))
            labels = labels.iloc[keep]
    if with_masks is None:
        with_masks = (Path(root) / "masks").is_dir()
    records = []
    for image_id, row in zip(labels.index.tolist(), labels.to_numpy(dtype=np.int64).tolist()):
        rec: dict[str, Any] = {"id": image_id, "file": f"stage_2_train/{image_id}.dcm"}
        rec.update(zip(LABEL_COLUMNS, row))
        if with_masks:
            rec["mask_file"] = f"masks/{image_id}.png"
        records.append(rec)
    return records
