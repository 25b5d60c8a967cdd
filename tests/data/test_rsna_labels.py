"""RSNA label CSV: Kaggle long format -> one row per image, duplicates dropped, clear errors."""

from __future__ import annotations

import pandas as pd
import pytest

from meddiff.data.formats.rsna_labels import LABEL_COLUMNS, SUBTYPES, parse_rsna_labels, write_rsna_labels
from meddiff.errors import DataError


def _rows(image: str, labels: dict[str, int]) -> list[str]:
    return [f"{image}_{c},{labels.get(c, 0)}" for c in LABEL_COLUMNS]


def _write(path, lines: list[str]) -> None:
    path.write_text("ID,Label\n" + "\n".join(lines) + "\n")


def test_parse_pivots_and_drops_duplicates(tmp_path):
    csv = tmp_path / "stage_2_train.csv"
    a = _rows("ID_00ab12cd3", {"subdural": 1, "any": 1})
    b = _rows("ID_0000aaaa1", {})
    c = _rows("ID_ffff00001", {"epidural": 1, "intraventricular": 1, "any": 1})
    _write(csv, a + b + c + a + b[:3])  # duplicate rows, as in the real file
    df = parse_rsna_labels(csv)
    assert list(df.columns) == list(LABEL_COLUMNS) and len(SUBTYPES) == 5
    assert df.index.tolist() == ["ID_0000aaaa1", "ID_00ab12cd3", "ID_ffff00001"]  # one row per image, sorted
    assert df.index.name == "id" and all(str(t) == "int8" for t in df.dtypes)
    assert df.loc["ID_00ab12cd3"].tolist() == [0, 0, 0, 0, 1, 1]
    assert df.loc["ID_0000aaaa1"].sum() == 0
    assert df.loc["ID_ffff00001"].tolist() == [1, 0, 1, 0, 0, 1]


def test_write_then_parse_roundtrip(tmp_path):
    wide = pd.DataFrame(
        [[0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], index=["ID_1a", "ID_2b"], columns=list(LABEL_COLUMNS)
    )
    path = tmp_path / "labels.csv"
    write_rsna_labels(wide, path, duplicate_ids=("ID_2b",))
    raw = pd.read_csv(path)
    assert len(raw) == 6 * 3 and raw["ID"].iloc[0] == "ID_1a_epidural" and raw["ID"].duplicated().sum() == 6
    back = parse_rsna_labels(path)
    assert back.astype(int).equals(wide.astype(int).rename_axis("id"))


@pytest.mark.parametrize(
    "lines, match",
    [
        (_rows("ID_aa", {}) + ["ID_aa_any,1"], "conflicting"),
        (_rows("ID_aa", {})[:5], "lack some of the six"),
        (_rows("ID_aa", {}) + ["ID_bb_hemorrhage,0"], "malformed ID.*ID_bb_hemorrhage"),
        (_rows("ID_aa", {}) + ["image7_any,0"], "malformed ID"),
        (_rows("ID_aa", {"any": 2}), "not 0/1"),
        (["ID_aa_any,yes"], "not 0/1"),
        ([], "no rows"),
    ],
)
def test_malformed_label_files_raise(tmp_path, lines, match):
    csv = tmp_path / "bad.csv"
    _write(csv, lines)
    with pytest.raises(DataError, match=match):
        parse_rsna_labels(csv)


def test_missing_file_and_columns(tmp_path):
    with pytest.raises(DataError, match="stage_2_train.csv.*not found"):
        parse_rsna_labels(tmp_path / "stage_2_train.csv")
    csv = tmp_path / "x.csv"
    csv.write_text("Image,Value\nID_aa_any,0\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['ID', 'Label'\]"):
        parse_rsna_labels(csv)
