"""Parse the RSNA Intracranial Hemorrhage label file (``stage_2_train.csv``).

Kaggle format: columns ``ID,Label``; ``ID = ID_<hex>_<subtype>``, six rows per image (epidural,
intraparenchymal, intraventricular, subarachnoid, subdural, any), labels 0/1. The real file has duplicate rows:
they are dropped before pivoting. Output: one row per image id (``ID_<hex>``) with the six columns as int8.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from meddiff.errors import DataError

__all__ = ["SUBTYPES", "LABEL_COLUMNS", "parse_rsna_labels", "write_rsna_labels"]

log = logging.getLogger(__name__)

#: the five hemorrhage subtypes, in the order used by ``subtypes`` tensors
SUBTYPES: tuple[str, ...] = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
#: subtype columns plus ``any`` (the image label: 1 = hemorrhage, 0 = healthy)
LABEL_COLUMNS: tuple[str, ...] = (*SUBTYPES, "any")

_ID_PATTERN = r"^(ID_[0-9A-Fa-f]+)_(" + "|".join(LABEL_COLUMNS) + r")$"


def parse_rsna_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``stage_2_train.csv`` -> DataFrame indexed by image id (``ID_<hex>``, sorted), columns
    :data:`LABEL_COLUMNS` (int8, 0/1).

    Exact duplicate rows are dropped (and counted in a log line). Raises :class:`DataError` naming the problem
    when the file is missing, lacks the ``ID``/``Label`` columns, has malformed IDs or non-0/1 labels, gives
    conflicting labels for the same image and subtype, or lacks some of the six rows for an image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"RSNA label file {str(path)!r} not found; expected the Kaggle 'stage_2_train.csv' with columns ID,Label."
        )
    try:
        df = pd.read_csv(path, dtype={"ID": str}, usecols=lambda c: c in ("ID", "Label"))
    except Exception as e:
        raise DataError(f"cannot read RSNA label file {str(path)!r}: {type(e).__name__}: {e}") from e
    missing = {"ID", "Label"} - set(df.columns)
    if missing:
        raise DataError(f"{str(path)!r} lacks column(s) {sorted(missing)}; expected the Kaggle header 'ID,Label'.")
    if df.empty:
        raise DataError(f"RSNA label file {str(path)!r} has no rows.")
    df["ID"] = df["ID"].astype(str).str.strip()

    parts = df["ID"].str.extract(_ID_PATTERN)
    bad = parts[0].isna()
    if bad.any():
        examples = df.loc[bad, "ID"].head(3).tolist()
        raise DataError(
            f"{str(path)!r}: {int(bad.sum())} row(s) have a malformed ID, e.g. {examples}; "
            f"expected 'ID_<hex>_<subtype>' with subtype in {list(LABEL_COLUMNS)}."
        )
    labels = pd.to_numeric(df["Label"], errors="coerce")
    bad = ~labels.isin([0, 1])
    if bad.any():
        examples = df.loc[bad, ["ID", "Label"]].head(3).values.tolist()
        raise DataError(f"{str(path)!r}: {int(bad.sum())} label(s) are not 0/1, e.g. {examples}.")

    long = pd.DataFrame({"image": parts[0], "subtype": parts[1], "label": labels.astype("int8")})
    n_before = len(long)
    long = long.drop_duplicates()
    n_dups = n_before - len(long)
    conflict = long.duplicated(["image", "subtype"], keep=False)
    if conflict.any():
        examples = long.loc[conflict, "image"].unique()[:3].tolist()
        raise DataError(
            f"{str(path)!r}: conflicting labels for the same image and subtype, e.g. {examples}; fix the file."
        )
    wide = long.pivot(index="image", columns="subtype", values="label")
    wide = wide.reindex(columns=list(LABEL_COLUMNS))
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        examples = wide.index[incomplete][:3].tolist()
        raise DataError(
            f"{str(path)!r}: {int(incomplete.sum())} image(s) lack some of the six label rows "
            f"{list(LABEL_COLUMNS)}, e.g. {examples}."
        )
    wide = wide.astype("int8").sort_index()
    wide.index.name = "id"
    wide.columns.name = None
    if n_dups:
        log.info("%s: dropped %d duplicate row(s); %d images", path.name, n_dups, len(wide))
    inconsistent = (wide[list(SUBTYPES)].max(axis=1) != wide["any"]).sum()
    if inconsistent:
        log.warning("%s: %d image(s) where 'any' differs from the max over subtypes", path.name, int(inconsistent))
    return wide


def write_rsna_labels(labels: pd.DataFrame, path: str | os.PathLike, duplicate_ids: tuple[str, ...] = ()) -> None:
    """Write a wide label frame (index = image id, columns :data:`LABEL_COLUMNS`) in Kaggle long format.

    Six rows per image in the Kaggle order; the six rows of each image in ``duplicate_ids`` are appended again
    at the end (the real file has such duplicates).
    """
    rows: list[tuple[str, int]] = []
    for image_id, row in labels[list(LABEL_COLUMNS)].iterrows():
        rows.extend((f"{image_id}_{c}", int(row[c])) for c in LABEL_COLUMNS)
    for image_id in duplicate_ids:
        rows.extend((f"{image_id}_{c}", int(labels.loc[image_id, c])) for c in LABEL_COLUMNS)
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(path, index=False)
