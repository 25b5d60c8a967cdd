"""Synthetic RSNA generator: valid DICOMs, header variety, masks aligned with hyperdense lesions, Kaggle CSV."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy import ndimage as ndi

from meddiff.data.formats.dicom import read_dicom
from meddiff.data.formats.rsna_labels import LABEL_COLUMNS, SUBTYPES, parse_rsna_labels
from meddiff.data.synthetic.ct import write_synthetic_rsna
from meddiff.errors import ConfigError, DataError

SIZE = 96


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("rsna_syn")
    table = write_synthetic_rsna(root, n_patients=10, slices_per_patient=4, image_size=SIZE,
                                 hemorrhage_fraction=0.5, seed=3)
    return root, table


def _dcm(root: Path, image_id: str) -> Path:
    return root / "stage_2_train" / f"{image_id}.dcm"


def test_layout_and_valid_dicoms(syn):
    root, table = syn
    files = sorted((root / "stage_2_train").glob("ID_*.dcm"))
    assert len(files) == len(table) == 40
    truncated = set(table.loc[table["truncated"], "id"])
    assert len(truncated) == 1
    for _, r in table.iterrows():
        if r["id"] in truncated:
            continue
        ds = pydicom.dcmread(_dcm(root, r["id"]))
        px = ds.pixel_array
        assert ds.Modality == "CT" and ds.SOPInstanceUID == r["id"]
        assert ds.PatientID == r["patient_id"] and ds.StudyInstanceUID == r["study_uid"]
        assert ds.SeriesInstanceUID == r["series_uid"] and float(ds.ImagePositionPatient[2]) == pytest.approx(r["z"])
        assert px.shape == (ds.Rows, ds.Columns) == (r["rows"], r["cols"])
        assert ds.BitsStored in (12, 16) and ds.PixelRepresentation in (0, 1)
    # one patient = one study/series; slices of a patient share it
    per = table.groupby("patient_id")[["study_uid", "series_uid"]].nunique()
    assert (per == 1).all().all() and table["patient_id"].nunique() == 10
    assert (root / "masks").is_dir() and len(list((root / "masks").glob("*.png"))) == 40


def test_header_variety(syn):
    root, table = syn
    headers = [pydicom.dcmread(_dcm(root, i), stop_before_pixels=True) for i in table["id"]]
    quirk = [h for h in headers if h.BitsStored == 12 and h.PixelRepresentation == 0 and float(h.RescaleIntercept) > -100]
    assert quirk, "no 12-bit intercept-quirk file"
    assert any(h.BitsStored == 12 and float(h.RescaleIntercept) == -1024 for h in headers)  # 12-bit, no quirk
    assert any(h.PixelRepresentation == 1 for h in headers)
    assert {float(h.RescaleIntercept) for h in headers} >= {-1024.0, -1000.0, 0.0, 1.0}
    assert any(isinstance(h.WindowCenter, pydicom.multival.MultiValue) for h in headers)
    odd = table[table["rows"] != table["cols"]]
    assert len(odd) == 1 and (odd["rows"].iloc[0], odd["cols"].iloc[0]) == (round(490 * SIZE / 512), round(638 * SIZE / 512))


def test_quirk_files_need_the_fix(syn):
    root, table = syn
    for image_id in table.loc[table["variant"].str.startswith("quirk12") & ~table["truncated"] & ~table["near_empty"], "id"]:
        ds = pydicom.dcmread(_dcm(root, image_id))
        naive = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        sl = read_dicom(_dcm(root, image_id))
        assert sl.intercept_fixed
        assert naive[0, 0] > 3000  # without the fix air looks like dense bone
        assert abs(float(np.median(sl.hu[:5, :5])) + 1000) < 25  # with it, air is -1000 HU
        brain = (sl.hu > 0) & (sl.hu < 100)
        assert brain.mean() > 0.03 and 15 < float(np.median(sl.hu[brain])) < 50


def test_masks_align_with_hyperdense_lesions(syn):
    root, table = syn
    csv_labels = parse_rsna_labels(root / "stage_2_train.csv")
    means, seen = [], set()
    for _, r in table[~table["truncated"]].iterrows():
        sl = read_dicom(_dcm(root, r["id"]))
        m = np.asarray(Image.open(root / "masks" / f"{r['id']}.png"))
        assert m.shape == sl.hu.shape and m.dtype == np.uint8 and m.max() <= 5
        for k, st in enumerate(SUBTYPES, start=1):
            present = bool((m == k).any())
            assert present == bool(csv_labels.loc[r["id"], st]) == bool(r[st]), (r["id"], st)
            if present:
                seen.add(st)
                les = m == k
                means.append(float(sl.hu[les].mean()))
                bone_near = ndi.binary_dilation(les, iterations=3) & (sl.hu > 300)
                if st in ("epidural", "subdural"):  # against the inner table of the skull
                    assert bone_near.any(), (r["id"], st)
                if st in ("intraparenchymal", "intraventricular"):  # deep, away from the skull
                    assert not bone_near.any(), (r["id"], st)
        assert bool(m.any()) == bool(csv_labels.loc[r["id"], "any"])
        if m.any():
            brain = (sl.hu > -20) & (sl.hu < 100) & (m == 0)
            assert float(sl.hu[brain].mean()) < 45  # the lesion is hyperdense relative to the brain
    assert seen == set(SUBTYPES)  # all five subtypes occur
    assert means and all(50 <= x <= 90 for x in means), means


def test_kaggle_csv_with_duplicates(syn):
    root, table = syn
    raw = pd.read_csv(root / "stage_2_train.csv")
    info = json.loads((root / "synthetic_info.json").read_text())
    n_dup = len(info["duplicated_in_csv"])
    assert n_dup >= 1 and len(raw) == 6 * (len(table) + n_dup) and raw.duplicated().sum() == 6 * n_dup
    assert raw["ID"].str.match(r"^ID_[0-9a-f]+_(" + "|".join(LABEL_COLUMNS) + ")$").all()
    parsed = parse_rsna_labels(root / "stage_2_train.csv")
    assert parsed.astype(int).equals(table.set_index("id")[list(LABEL_COLUMNS)].sort_index().astype(int).rename_axis("id"))
    assert 0 < parsed["any"].mean() < 1


def test_truncated_file_is_a_data_error(syn):
    root, table = syn
    image_id = table.loc[table["truncated"], "id"].iloc[0]
    with pytest.raises(DataError, match=image_id):
        read_dicom(_dcm(root, image_id))


def test_deterministic_and_overwrite(tmp_path):
    a = write_synthetic_rsna(tmp_path / "a", n_patients=2, slices_per_patient=2, image_size=48, seed=7)
    b = write_synthetic_rsna(tmp_path / "b", n_patients=2, slices_per_patient=2, image_size=48, seed=7)
    assert a.equals(b)
    assert (tmp_path / "a" / "stage_2_train.csv").read_bytes() == (tmp_path / "b" / "stage_2_train.csv").read_bytes()
    assert _dcm(tmp_path / "a", a["id"].iloc[0]).read_bytes() == _dcm(tmp_path / "b", b["id"].iloc[0]).read_bytes()
    with pytest.raises(ConfigError, match="overwrite"):
        write_synthetic_rsna(tmp_path / "a", n_patients=2, slices_per_patient=2, image_size=48, seed=8)
    c = write_synthetic_rsna(tmp_path / "a", n_patients=2, slices_per_patient=2, image_size=48, seed=8, overwrite=True)
    assert len(list((tmp_path / "a" / "stage_2_train").glob("*.dcm"))) == 4 and not c["id"].isin(a["id"]).any()


def test_cli_script(tmp_path, capsys):
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_synthetic_rsna.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_rsna", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--root", str(tmp_path / "r"), "--patients", "2", "--slices", "3", "--size", "48", "--seed", "1"]
    assert mod.main(args) == 0
    assert "wrote 6 slices" in capsys.readouterr().out
    assert len(parse_rsna_labels(tmp_path / "r" / "stage_2_train.csv")) == 6
    assert mod.main(args) == 2 and "overwrite" in capsys.readouterr().err
