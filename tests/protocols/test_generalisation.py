"""The generalisation check: unseen anomaly kinds (generator: exact masks, deterministic) pasted into healthy TEST
images cached by the test pass, scored with the settings chosen on validation (nothing re-selected)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.anomaly.scoring import ScoringConfig, score_batch
from meddiff.errors import ConfigError
from meddiff.metrics.detection import detection_ci
from meddiff.models.validation import AnomalyValidation
from meddiff.protocols.anomaly import EvalOptions, evaluate_anomaly_detection
from meddiff.protocols.anomaly.passes import run_pass
from meddiff.protocols.anomaly.unseen_kinds import KINDS, make_unseen


def _healthy(n: int = 12, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Digit-like healthy images in [-1, 1]: a bright bar of random place and length on a -1 background."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, size, size)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(4, size - 12, (2,), generator=g))
        x[i, :, r:r + 8, c:c + 3] = 0.4 + 0.5 * torch.rand(1, generator=g)
        x[i, :, r:r + 2, c:c + 8] = 0.7
    return x


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_exactly_its_mask_in_range_and_deterministically(kind):
    x = _healthy()
    out, mask = make_unseen(x, kind, seed=3, item_ids=range(12))
    assert out.shape == x.shape and mask.shape == (12, 1, 28, 28) and mask.dtype == torch.bool
    assert torch.equal(mask, (out != x).any(1, keepdim=True))  # the mask is exactly the changed pixels
    assert mask.flatten(1).any(1).all()  # every item got its anomaly (centred on the foreground)
    assert out.min() >= -1 and out.max() <= 1
    again, mask2 = make_unseen(x, kind, seed=3, item_ids=range(12))
    assert torch.equal(again, out) and torch.equal(mask2, mask)
    # an item's change depends on (seed, kind, item id), not on the batch it comes in
    part, _ = make_unseen(x[5:8], kind, seed=3, item_ids=[5, 6, 7])
    assert torch.equal(part, out[5:8])
    other, _ = make_unseen(x, kind, seed=4, item_ids=range(12))
    assert not torch.equal(other, out)
    region = torch.zeros(12, 1, 28, 28, dtype=torch.bool)
    region[..., :, :14] = True
    inside, m_in = make_unseen(x, kind, seed=3, item_ids=range(12), region=region)
    assert not (m_in & ~region).any() and torch.equal(inside[..., 14:], x[..., 14:])


def test_kinds_differ_and_unknown_kind_is_refused():
    x = _healthy(4)
    outs = [make_unseen(x, k, 0, range(4))[0] for k in KINDS]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    with pytest.raises(ConfigError, match="unseen anomaly kind"):
        make_unseen(x, "splotch", 0, range(4))


class Black:
    """Healthy reconstruction = all -1: the anomaly map is x + 1 (deterministic, no sampling)."""

    def __init__(self) -> None:
        self.anomaly_val = AnomalyValidation(ScoringConfig())
        self.images: list[torch.Tensor] = []

    def reconstruct(self, batch):
        self.images.append(batch["image"].clone())
        return -torch.ones_like(batch["image"])


def _split(seed: int, n: int = 40) -> list[dict]:
    """Half healthy, half with a dim large area (validation chooses the ``mean`` reduction on it)."""
    x = torch.cat([_healthy(n // 2, seed=seed), _healthy(n // 2, seed=seed + 100)])
    label = (torch.arange(n) % 2).long()
    x = torch.stack([x[i // 2] if i % 2 == 0 else x[n // 2 + i // 2] for i in range(n)])
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[label == 1, :, 16:, :] = True
    x = torch.where(mask, torch.full_like(x, -0.5), x)
    return [{"image": x[j:j + 8], "label": label[j:j + 8], "mask": mask[j:j + 8]} for j in range(0, n, 8)]


def test_the_check_scores_the_validation_chosen_setting_not_one_reselected_on_the_unseen_kinds():
    model = Black()
    opts = EvalOptions(median_size=[1], reduction=["mean", "max"], n_boot=50, baselines=[])
    test = _split(seed=7)
    report = evaluate_anomaly_detection(model, _split(seed=1), test, opts)
    gen = report["generalisation"]
    chosen = ScoringConfig(**report["scoring"])
    assert chosen.reduction == "mean"  # chosen on validation (a large dim area)
    assert gen["settings"]["model"] == report["scoring"] and gen["settings_chosen_on"] == "validation"
    # the cached images are the healthy TEST images, in order
    healthy = torch.cat([b["image"][b["label"] == 0] for b in test])
    assert gen["n_healthy"] == len(healthy) == 20
    recon = -torch.ones_like(healthy)
    neg = score_batch(healthy, recon, None, chosen)["score"].double().numpy()
    other_better = []
    for k, kind in enumerate(KINDS):
        share = list(range(k, len(healthy), len(KINDS)))
        changed, _ = make_unseen(healthy[share], kind, opts.seed, share)
        y = np.r_[np.zeros(len(healthy)), np.ones(len(share))]
        aurocs = {}
        for cfg in opts.candidates(model.anomaly_val.scoring):
            pos = score_batch(changed, recon[: len(share)], None, cfg)["score"].double().numpy()
            neg_c = score_batch(healthy, recon, None, cfg)["score"].double().numpy()
            aurocs[cfg.reduction] = detection_ci(np.r_[neg_c, pos], y, n_boot=0)["auroc"]
        e = gen["kinds"][kind]
        assert e["image"]["model"]["auroc"] == pytest.approx(aurocs["mean"])  # the chosen setting's number
        other_better.append(aurocs["max"] > aurocs["mean"] + 0.05)
        assert e["n_anomalous"] == len(share) and e["description"]
        assert e["margin_over_best_baseline"]["baseline"] == "baseline_mean_intensity"
        assert e["pixel_auprc"]["model"] is not None
    assert neg.shape == (20,)
    # the check can tell: on some unseen kind another candidate would have scored better (re-selection would show)
    assert any(other_better)
    assert set(report["summary"]) >= {f"gen_{k}_image_auroc" for k in KINDS} | {"gen_mean_margin", "gen_beats_kinds"}
    assert report["cost"]["n_images"] == 40 and report["cost"]["seconds_per_image"] > 0


def test_cache_holds_only_healthy_items_and_the_check_can_be_switched_off():
    model = Black()
    batches = _split(seed=2)
    col = run_pass(batches, {"model": (model.reconstruct, [ScoringConfig()])}, EvalOptions(), torch.device("cpu"),
                   "t", cache_healthy=5)
    assert len(col.healthy) == 5 and col.healthy_index == [0, 2, 4, 6, 8]
    assert all(int(it["label"]) == 0 for it in col.healthy)
    assert torch.equal(col.healthy[1]["image"], batches[0]["image"][2])
    off = evaluate_anomaly_detection(Black(), _split(1), _split(7), EvalOptions(generalisation=False, n_boot=0,
                                                                                   baselines=[]))
    assert "generalisation" not in off and not any(k.startswith("gen_") for k in off["summary"])
    with pytest.raises(ConfigError, match="generalisation_max_items"):
        EvalOptions(generalisation_max_items=0)
