"""Headless figures: files are written (atomically) and the numbers in the legends are right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from meddiff.errors import DataError
from meddiff.viz import pr_curve, roc_curve, save_anomaly_grid, save_metric_curves, save_roc_pr
from meddiff.viz.figures import _pick_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, min_hw: tuple[int, int] = (100, 100)) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 2000
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.shape[0] >= min_hw[0] and img.shape[1] >= min_hw[1]
    assert img[..., :3].std() > 0.01  # not a blank canvas
    assert not list(path.parent.glob(".*.tmp"))  # no temporary left behind
    return img


def _batch(b=10, c=1, hw=28):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, c, hw, hw, generator=g) * 2 - 1
    recons = (images + 0.1 * torch.randn(b, c, hw, hw, generator=g)).clamp(-1, 1)
    maps = (images - recons).abs().mean(1, keepdim=True)
    masks = torch.zeros(b, 1, hw, hw, dtype=torch.bool)
    masks[b // 2 :, :, 10:16, 10:16] = True
    labels = torch.tensor([0] * (b // 2) + [1] * (b - b // 2))
    return images, recons, maps, masks, labels


def test_anomaly_grid_png(tmp_path):
    images, recons, maps, masks, labels = _batch()
    out = save_anomaly_grid(tmp_path / "sub" / "grid.png", images, recons, maps, masks, labels, n_rows=6, title="t")
    img = _assert_png(Path(out))
    assert img.shape[0] > img.shape[1]  # 6 rows x 4 columns: taller than wide
    # the map, mask and reconstruction columns are really drawn: changing any one changes the picture
    for k, variant in enumerate(
        [(images, recons, maps.flip(-1), masks), (images, recons, maps, ~masks), (images, -recons, maps, masks)]
    ):
        other = imread(save_anomaly_grid(tmp_path / f"v{k}.png", *variant, labels, n_rows=6, title="t"))
        assert other.shape != img.shape or not np.array_equal(other, img), k
    # numpy inputs, RGB, no masks / labels
    i3, r3, m3, _, _ = _batch(c=3)
    _assert_png(Path(save_anomaly_grid(tmp_path / "rgb.png", i3.numpy(), r3.numpy(), m3.numpy()[:, 0])))


def test_anomaly_grid_rows_half_healthy_half_anomalous():
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 1, 0, 1])
    rows = _pick_rows(labels, 10, 6)
    assert labels[rows].tolist() == [0, 0, 0, 1, 1, 1]
    assert rows.tolist() == [2, 4, 5, 0, 1, 3]
    few_healthy = np.array([0, 1, 1, 1, 1, 1])
    assert few_healthy[_pick_rows(few_healthy, 6, 4)].tolist() == [0, 1, 1, 1]
    assert _pick_rows(None, 5, 8).tolist() == [0, 1, 2, 3, 4]


def test_anomaly_grid_shape_errors(tmp_path):
    images, recons, maps, masks, labels = _batch()
    with pytest.raises(DataError, match="recons"):
        save_anomaly_grid(tmp_path / "x.png", images, recons[:, :, :20], maps)
    with pytest.raises(DataError, match="labels"):
        save_anomaly_grid(tmp_path / "x.png", images, recons, maps, labels=labels[:3])
    assert not (tmp_path / "x.png").exists()


def test_roc_pr_numbers_and_png(tmp_path):
    # scikit-learn's documented example: roc_auc_score = 0.75, average_precision_score = 0.8333
    s, y = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert roc_curve(s, y)[2] == pytest.approx(0.75)
    assert pr_curve(s, y)[2] == pytest.approx(5 / 6)
    assert roc_curve(np.ones(6), np.array([0, 1, 0, 1, 1, 0]))[2] == pytest.approx(0.5)  # ties count half
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 2, 400)
    good, bad = yy + rng.normal(0, 0.5, 400), rng.normal(0, 1, 400)
    # AUROC equals the Mann-Whitney probability P(score_pos > score_neg)
    mw = (good[yy == 1][:, None] > good[yy == 0][None]).mean()
    summary = save_roc_pr(tmp_path / "roc.png", {"model": (torch.from_numpy(good), torch.from_numpy(yy)),
                                                 "baseline": (bad, yy)})
    assert summary["model"]["auroc"] == pytest.approx(mw)
    assert summary["model"]["auroc"] > 0.85 and 0.4 < summary["baseline"]["auroc"] < 0.6
    assert summary["model"]["prevalence"] == pytest.approx(yy.mean())
    _assert_png(tmp_path / "roc.png", (200, 400))
    with pytest.raises(DataError, match="both healthy"):
        save_roc_pr(tmp_path / "bad.png", {"m": (good, np.ones(400))})
    with pytest.raises(DataError, match="NaN"):
        save_roc_pr(tmp_path / "bad.png", {"m": (np.full(400, np.nan), yy)})


def test_metric_curves_png(tmp_path):
    x = [50, 100, 250, 500]
    out = save_metric_curves(tmp_path / "m.png", x, {"AUROC": [0.6, 0.7, np.nan, 0.8], "AUPRC": np.ones(4)},
                             "t", "score")
    _assert_png(Path(out))
    with pytest.raises(DataError, match="AUROC"):
        save_metric_curves(tmp_path / "m2.png", x, {"AUROC": [0.6]}, "t", "score")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.png"
    save_metric_curves(path, [0, 1], {"a": [0, 1]}, "x", "y")
    before = path.read_bytes()

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_metric_curves(path, [0, 1, 2], {"b": [2, 1, 0]}, "x", "y")
    assert path.read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]  # temporary removed


def test_save_figure_writes_atomically_with_the_ordinary_file_mode(tmp_path):
    """The public writer every figure (and the CT report) goes through: mode 0644 under umask 022, no temporary."""
    import os

    from meddiff.viz import save_figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    old = os.umask(0o022)
    try:
        out = save_figure(fig, tmp_path / "sub" / "f.png")
        grid = save_anomaly_grid(tmp_path / "grid.png", *_batch(b=4)[:3])
    finally:
        os.umask(old)
    assert out == tmp_path / "sub" / "f.png" and out.read_bytes()[:8] == PNG_MAGIC
    for p in (out, grid):
        assert p.stat().st_mode & 0o777 == 0o644, oct(p.stat().st_mode)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["f.png", "grid.png"]
