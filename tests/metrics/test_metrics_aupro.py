"""AUPRO (MVTec AD definition, up to FPR 0.3) and F1-max of PixelAccumulator against independent computations."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve

from meddiff.metrics import PixelAccumulator
from meddiff.metrics.pixel import AUPRO_FPR_LIMIT, area_up_to


def _brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3, region: np.ndarray | None = None) -> float:
    """A threshold loop over every distinct score: components per 2D map (8-connected), mean overlap per component,
    FPR over normal pixels; MVTec's trapezoid with interpolation at the limit, divided by the limit."""
    flat_maps = maps.reshape(-1, *maps.shape[-2:])
    comp_maps = []  # (image index, component mask)
    for k, m in enumerate(masks.reshape(-1, *masks.shape[-2:])):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        comp_maps += [(k, lab == i) for i in range(1, n + 1)]
    region = np.ones_like(masks) if region is None else region
    normal = flat_maps[(~masks & region).reshape(flat_maps.shape)]
    points = [(0.0, 0.0)]
    for thr in np.unique(maps[region]):
        fpr = float((normal >= thr).mean())
        pro = float(np.mean([(flat_maps[k][c] >= thr).mean() for k, c in comp_maps]))
        points.append((fpr, pro))
    points.sort()
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= limit:
            area += (x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2
        else:
            if x[i - 1] < limit:
                yl = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
                area += (limit - x[i - 1]) * (y[i - 1] + yl) / 2
            break
    return area / limit


def _quantised_case(seed: int, b: int = 4, h: int = 20, w: int = 20):
    """Scores on the bin edges of 200 bins over [0, 2]: the binned metrics are exact for them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((b, 1, h, w), dtype=bool)
    masks[:, :, 3:9, 4:12] = True  # a big lesion
    masks[:, :, 14:16, 14:16] = True  # a small one
    masks[1, :, 15:18, 2] = True  # a thin third on one image
    masks[0] = False  # a healthy image
    maps = np.clip(rng.normal(0.5, 0.3, masks.shape) + 0.4 * masks, 0, 1.99)
    edges = PixelAccumulator(num_bins=200, max_value=2.0).thresholds
    return edges[np.round(maps * 100).astype(int)], masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_and_f1_max_equal_a_brute_force_threshold_loop(seed):
    maps, masks = _quantised_case(seed)
    acc = PixelAccumulator(num_bins=200, max_value=2.0)
    acc.update(torch.from_numpy(maps), torch.from_numpy(masks))
    r = acc.compute()
    assert r["n_regions"] == 3 * 2 + 1
    assert r["aupro"] == pytest.approx(_brute_aupro(maps, masks), abs=1e-9)
    p, rec, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    f1 = np.divide(2 * p * rec, p + rec, out=np.zeros_like(p), where=(p + rec) > 0)
    assert r["f1_max"] == pytest.approx(f1.max(), abs=1e-12)
    assert r["f1_max"] == pytest.approx(r["oracle_dice"], abs=1e-12)  # pixel F1 is the pooled Dice


def test_hand_computed_aupro():
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, 0, 0] = True  # component A: 1 pixel
    masks[0, 0, 4:7, 4:7] = True  # component B: 9 pixels
    perfect = masks.double()
    acc = PixelAccumulator(num_bins=100, max_value=1.0)
    acc.update(perfect, masks)
    assert acc.compute()["aupro"] == pytest.approx(1.0, abs=1e-12)
    # constant map: curve (0,0) -> (1,1), area 0.045 up to 0.3 -> 0.15
    acc = PixelAccumulator(num_bins=100, max_value=1.0)
    acc.update(torch.full_like(perfect, 0.5), masks)
    assert acc.compute()["aupro"] == pytest.approx(0.15, abs=1e-12)
    # A found, B (9x bigger) missed: PRO 0.5 at FPR 0 (pixel TPR would be 0.1), curve (0,.5) -> (1,1)
    half = torch.zeros_like(perfect)
    half[0, 0, 0, 0] = 1.0
    acc = PixelAccumulator(num_bins=100, max_value=1.0)
    acc.update(half, masks)
    assert acc.compute()["aupro"] == pytest.approx((0.3 * (0.5 + 0.65) / 2) / 0.3, abs=1e-12)
    assert AUPRO_FPR_LIMIT == 0.3


def test_components_are_8_connected():
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, 0, 0] = masks[0, 0, 1, 1] = True  # one component touching diagonally (MVTec, anomalib: 8-connected)
    masks[0, 0, 5, 5] = True
    found = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    found[0, 0, 0, 0] = found[0, 0, 5, 5] = 1.0
    acc = PixelAccumulator(num_bins=100, max_value=1.0)
    acc.update(found, masks)
    r = acc.compute()
    assert r["n_regions"] == 2  # PRO at FPR 0 is (1/2 + 1) / 2 = 0.75, curve (0, .75) -> (1, 1)
    assert r["aupro"] == pytest.approx((0.3 * (0.75 + 0.825) / 2) / 0.3, abs=1e-12)


def test_aupro_region_chunks_and_merge_give_the_same_state():
    maps, masks = _quantised_case(5, b=6)
    m, t = torch.from_numpy(maps), torch.from_numpy(masks)
    region = torch.ones_like(t)
    region[:, :, :, :3] = False  # cuts the thin lesion away, and part of others
    one = PixelAccumulator(num_bins=200)
    one.update(m, t, region)
    a, b = PixelAccumulator(num_bins=200), PixelAccumulator(num_bins=200)
    a.update(m[:2], t[:2], region[:2])
    b.update(m[2:], t[2:], region[2:])
    assert torch.equal(a.merge(b).pro_hist, one.pro_hist) and a.compute() == one.compute()
    keep = region.numpy()
    assert one.compute()["aupro"] == pytest.approx(_brute_aupro(maps, masks & keep, region=keep), abs=1e-9)
    assert one.pro_hist.numel() == 200  # bounded by bins, whatever the number of components


def test_area_up_to_interpolates_and_refuses_short_curves():
    assert area_up_to(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.3) == pytest.approx(0.045)
    assert area_up_to(np.array([1.0, 0.3, 0.0]), np.array([1.0, 1.0, 1.0]), 0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        area_up_to(np.array([0.0, 0.2]), np.array([0.0, 1.0]), 0.3)


def test_the_anomaly_protocol_reports_aupro_and_f1_max_beside_auroc():
    """New keys beside pixel AUROC/AUPRC/Dice, for the model, its fixed scoring and the intensity baseline (the
    protocol's own tests pin the existing numbers; they live in tests/protocols/test_anomaly_protocol.py)."""
    from meddiff.anomaly.scoring import ScoringConfig
    from meddiff.models.validation import AnomalyValidation
    from meddiff.protocols.anomaly import EvalOptions, evaluate_anomaly_detection

    class Black:  # healthy estimate all -1: the map is |x + 1|
        anomaly_val = AnomalyValidation(ScoringConfig())

        def reconstruct(self, batch, sampling=None):
            return -torch.ones_like(batch["image"])

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        x = -torch.ones(20, 1, 8, 8) + 0.3 * torch.rand(20, 1, 8, 8, generator=g)
        mask = torch.zeros(20, 1, 8, 8, dtype=torch.bool)
        mask[1::2, :, 2:4, 2:5] = True
        x[mask] = 0.5
        return [{"image": x[j:j + 10], "label": torch.arange(10) % 2, "mask": mask[j:j + 10]} for j in (0, 10)]

    report = evaluate_anomaly_detection(Black(), batches(0), batches(1),
                                        EvalOptions(median_size=[1], reduction=["max"], n_boot=20))
    pix, s = report["pixel"], report["summary"]
    assert pix["model"]["aupro"] == pytest.approx(1.0) and pix["model"]["f1_max"] == pytest.approx(1.0)
    assert s["pixel_aupro"] == pix["model"]["aupro"] and s["pixel_f1_max"] == pix["model"]["f1_max"]
    assert s["baseline_pixel_aupro"] == pix["baseline_intensity"]["aupro"]
    assert s["fixed_pixel_aupro"] == report["fixed_scoring"]["pixel"]["aupro"]
    assert list(s)[:4] == ["image_auroc", "image_auprc", "baseline_image_auroc", "pixel_auroc"]
