"""meddiff-predict: a folder of new images -> maps, scores.csv, thresholds from the run report, bad files listed."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddiff.errors import ConfigError, DataError
from meddiff.predict import main, parse_args, predict

CKPT = Path(__file__).parent / "fixtures" / "demo_tiny_v0.1.ckpt"  # MNIST splotch, 28 px, l1 map


def _pngs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        a = np.zeros((28, 28), np.uint8)
        a[8:20, 10:14] = 255
        if i:
            a[3:6, 20:24] = 200  # a "splotch"
        Image.fromarray(a).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_folder_gives_scores_maps_and_lists_the_bad_file(tmp_path, capsys):
    inp = _pngs(tmp_path / "in")
    out = tmp_path / "out"
    assert main([f"ckpt_path={CKPT}", f"input={inp}", f"output={out}"]) == 0
    rows = _rows(out / "scores.csv")
    assert [r["file"] for r in rows] == ["img0.png", "img1.png"]
    assert list(rows[0]) == ["file", "slice", "score"]  # no run report beside the fixture: no 'anomalous'
    assert all(np.isfinite(float(r["score"])) and float(r["score"]) >= 0 for r in rows)
    for i in range(2):
        m = np.load(out / "maps" / f"img{i}_map.npy")
        assert m.shape == (28, 28) and m.dtype == np.float32 and m.min() >= 0
        assert Image.open(out / "maps" / f"img{i}_map.png").size == (28, 28)
    info = json.loads((out / "predict.json").read_text())
    assert [s["file"] for s in info["skipped"]] == ["broken.png"] and info["n_scored_files"] == 2
    assert info["thresholds"]["image_threshold"] is None and "no " in info["thresholds"]["note"]
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable file(s)" in printed and "broken.png" in printed
    assert "no validation-chosen threshold" in printed


def test_thresholds_come_from_the_run_report(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "best.ckpt"
    shutil.copy(CKPT, ckpt)
    scoring = {"map": "l1", "median_size": 1, "erode_iterations": 0, "reduction": "percentile", "q": 99.0, "k": 5}
    (run / "report.json").write_text(json.dumps(
        {"scoring": scoring, "selection": {"pixel_threshold": 0.5, "image_threshold": 0.0}}))
    res = predict(ckpt, _pngs(tmp_path / "in"), tmp_path / "out")
    rows = _rows(tmp_path / "out" / "scores.csv")
    assert [r["anomalous"] for r in rows] == ["1", "1"]  # every score >= 0
    m = np.load(tmp_path / "out" / "maps" / "img1_map.npy")
    assert float(rows[1]["pixels_above_threshold"]) == pytest.approx((m >= 0.5).mean())
    assert (tmp_path / "out" / "maps" / "img1_seg.png").is_file()
    assert res.info["thresholds"]["pixel_threshold"] == 0.5
    # a report whose chosen map differs: its pixel threshold does not apply to the model's scoring
    (run / "report.json").write_text(json.dumps({"scoring": {**scoring, "median_size": 5},
                                                 "selection": {"pixel_threshold": 0.5}}))
    res = predict(ckpt, tmp_path / "in" / "img0.png", tmp_path / "out2")
    assert res.info["thresholds"]["pixel_threshold"] is None and "not applied" in res.info["thresholds"]["pixel_note"]
    assert list(_rows(tmp_path / "out2" / "scores.csv")[0]) == ["file", "slice", "score"]
    # chosen at another reconstruction depth than the model's own: no threshold applies
    (run / "report.json").write_text(json.dumps({"scoring": scoring, "reconstruction": {"t_start": -7},
                                                 "selection": {"pixel_threshold": 0.5, "image_threshold": 0.0}}))
    thr = predict(ckpt, tmp_path / "in" / "img0.png", tmp_path / "out3").info["thresholds"]
    assert thr["image_threshold"] is None and thr["pixel_threshold"] is None and "t_start=-7" in thr["note"]


def test_nifti_volumes_and_dicom_slices(tmp_path):
    import nibabel as nib

    from meddiff.data.synthetic.ct import _write_dicom

    inp = tmp_path / "in"
    inp.mkdir()
    vol = np.random.default_rng(0).normal(100, 20, (30, 26, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(inp / "vol.nii.gz"))
    hu = np.full((40, 40), -1000.0)
    hu[8:32, 8:32] = 35.0  # a square "brain"
    uid = "1.2.826.0.1.3680043.8.498."
    _write_dicom(inp / "ct.dcm", hu, "signed16", uid + "1", "P1", uid + "2", uid + "3", 0.0, 1, 0.5, False)
    res = predict(CKPT, inp, tmp_path / "out")
    assert not res.skipped
    rows = _rows(tmp_path / "out" / "scores.csv")
    assert [(r["file"], r["slice"]) for r in rows] == [("ct.dcm", ""), ("vol.nii.gz", "0"), ("vol.nii.gz", "1"),
                                                       ("vol.nii.gz", "2")]
    maps = nib.load(str(tmp_path / "out" / "maps" / "vol_map.nii.gz"))
    assert maps.shape == (30, 26, 3)  # the volume's frame, one map per axial slice
    assert np.load(tmp_path / "out" / "maps" / "ct_map.npy").shape == (28, 28)  # DICOM: the model's frame


def test_bad_checkpoint_and_empty_input_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        predict(CKPT, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConfigError, match="does not exist"):
        predict(tmp_path / "nope.ckpt", _pngs(tmp_path / "in"), tmp_path / "out")
    with pytest.raises(ConfigError, match="input=.*does not exist"):
        predict(CKPT, tmp_path / "missing", tmp_path / "out")
    assert main([f"ckpt_path={tmp_path / 'nope.ckpt'}", f"input={tmp_path / 'in'}"]) == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown argument"):
        parse_args(["ckpt=x"])
    with pytest.raises(ConfigError, match="missing input"):
        parse_args(["ckpt_path=x"])
