"""val/aucp for the diffusion anomaly models (the AnomalyValidation component): pool membership is the AUCp target, labels never
are; val/auroc and val/loss are exactly those of the same batches without pools; no val/aucp without pools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from meddiff.diffusion import NoiseSchedule
from meddiff.metrics.aucp import aucp, debiased_auc
from meddiff.models import UnconditionalDiffusion
from meddiff.nets import build_net


class Recorded(UnconditionalDiffusion):
    """The healthy estimate is all -1 (background), so an image's score is a known function of its pixels."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.logged: dict[str, list[float]] = {}

    def validation_reconstruct(self, batch):
        return torch.full_like(batch["image"], -1.0)

    def log(self, name, value, *args, **kwargs):
        self.logged.setdefault(name, []).append(float(value))


def _model(**kw) -> Recorded:
    torch.manual_seed(0)
    net = build_net(dict(in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                         num_res_blocks=1, norm_num_groups=8, num_head_channels=8))
    return Recorded(net=net, schedule=NoiseSchedule(50), sampling={"t_start": 10}, **kw).eval()


def _images(levels) -> torch.Tensor:
    """[B, 1, 8, 8] images whose mean |x - (-1)| score grows with ``levels`` in [0, 1]."""
    return torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 8, 8) * 2 - 1


def _validate(model, batches) -> dict[str, list[float]]:
    model.logged = {}
    with torch.no_grad():
        for i, (loader_idx, b) in enumerate(batches):
            model.validation_step(b, i, loader_idx)
        model.on_validation_epoch_end()
    return model.logged


VAL_LEVELS, VAL_LABELS = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2], [0, 1, 0, 1, 1, 0]
KNOWN_LEVELS = [0.05, 0.15, 0.35, 0.25]


def _val(labels=VAL_LABELS, pool=True):
    b = {"image": _images(VAL_LEVELS), "label": torch.tensor(labels)}
    if pool:
        b["pool"] = ["unannotated_labelled"] * len(labels)
    return b


def _known(labels=None):
    b = {"image": _images(KNOWN_LEVELS), "pool": ["known_healthy"] * len(KNOWN_LEVELS)}
    if labels is not None:
        b["label"] = torch.tensor(labels)
    return b


def test_without_pools_val_auroc_only():
    out = _validate(_model(), [(0, _val(pool=False))])
    assert "val/aucp" not in out and "val/aucp_debiased" not in out
    assert out["val/auroc"] == [pytest.approx(roc_auc_score(VAL_LABELS, VAL_LEVELS))]


def test_aucp_is_pool_membership_and_val_auroc_val_loss_are_unchanged():
    plain = _validate(_model(), [(0, _val(pool=False))])
    out = _validate(_model(aucp_rho=0.5), [(0, _val()), (1, _known())])
    assert out["val/aucp"] == [pytest.approx(aucp(np.array(KNOWN_LEVELS), np.array(VAL_LEVELS)))]
    assert out["val/aucp_debiased"] == [pytest.approx(debiased_auc(out["val/aucp"][0], 0.5))]
    assert out["val/auroc"] == plain["val/auroc"]  # the known-healthy rows are not in val/auroc ...
    assert out["val/loss"] == plain["val/loss"]  # ... nor in val/loss (logged for the val batch only)


def test_aucp_never_reads_labels():
    """Relabelling the val rows, or giving the known-healthy rows 'anomalous' labels, leaves val/aucp as it is."""
    base = _validate(_model(), [(0, _val()), (1, _known())])["val/aucp"]
    flipped = _validate(_model(), [(0, _val([1 - y for y in VAL_LABELS])), (1, _known([1, 1, 1, 1]))])
    all_healthy = _validate(_model(), [(0, _val([0] * 6)), (1, _known([0, 0, 0, 0]))])
    assert flipped["val/aucp"] == base == all_healthy["val/aucp"]
    assert flipped["val/auroc"] == [pytest.approx(1 - roc_auc_score(VAL_LABELS, VAL_LEVELS))]


def test_state_dict_has_no_metric_state():
    """Checkpoints keep their keys: the AUCp accumulator holds no persistent state."""
    assert not any("aucp" in k or "auroc" in k for k in _model().state_dict())
