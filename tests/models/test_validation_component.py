"""AUCp in validation (label-free selection): known cases, equality with meddiff.metrics.aucp, the rho correction,
pool labels never used, NaN (not a made-up number) when a pool is missing."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from meddiff.errors import ConfigError
from meddiff.metrics.aucp import aucp, debiased_auc
from meddiff.models.validation import AnomalyValidation, chosen_batches


class Logged(AnomalyValidation):
    """The component as the label-free families use it, logging into a dict."""

    def __init__(self, rho=None):
        super().__init__(aucp_rho=rho, label_free=True)
        self.logged: dict[str, float] = {}

    def log(self, name, value, **kw):
        self.logged[name] = float(value)


def batch(scores, pool, labels=None):
    b = {"image": torch.zeros(len(scores), 1, 2, 2), "pool": [pool] * len(scores)}
    if labels is not None:
        b["label"] = torch.tensor(labels)
    return b, torch.tensor(scores, dtype=torch.float32)


def run(m: Logged, *batches) -> dict[str, float]:
    for b, s in batches:
        m.update(b, s)
    m.log_epoch(m.log)
    return dict(m.logged)


def test_known_cases():
    assert run(Logged(), batch([0.0, 0.1], "known_healthy"), batch([1.0, 2.0], "unannotated"))["val/aucp"] == 1.0
    assert run(Logged(), batch([0.0, 1.0], "known_healthy"), batch([0.0, 1.0], "unannotated"))["val/aucp"] == 0.5
    assert run(Logged(), batch([1.0, 2.0], "known_healthy"), batch([0.0, 0.5], "unannotated"))["val/aucp"] == 0.0


def test_equals_the_metric_over_many_batches():
    rng = np.random.default_rng(0)
    h, u = rng.normal(size=37), rng.normal(0.7, size=53)
    m = Logged()
    out = run(m, batch(h[:20].tolist(), "known_healthy"), batch(u[:30].tolist(), "unannotated"),
              batch(h[20:].tolist(), "known_healthy"), batch(u[30:].tolist(), "unannotated"))
    assert out["val/aucp"] == pytest.approx(aucp(h, u), abs=1e-6)
    out2 = run(m, batch(u.tolist(), "known_healthy"), batch(h.tolist(), "unannotated"))  # state was reset
    assert out2["val/aucp"] == pytest.approx(1 - aucp(h, u), abs=1e-6)


def test_rho_correction_recovers_the_true_auc():
    rng = np.random.default_rng(1)
    known = rng.normal(size=200)
    pool_healthy, pool_sick = known[:150].copy(), rng.normal(1.5, size=50)  # pool healthy scored like known healthy
    rho = 150 / 200
    out = run(Logged(rho), batch(known.tolist(), "known_healthy"),
              batch(np.r_[pool_healthy, pool_sick].tolist(), "unannotated"))
    true_auc = roc_auc_score(np.r_[np.zeros(200), np.ones(50)], np.r_[known, pool_sick])
    assert out["val/aucp_debiased"] == pytest.approx(debiased_auc(out["val/aucp"], rho), abs=1e-6)
    assert out["val/aucp_debiased"] == pytest.approx(true_auc, abs=0.02)
    assert "val/aucp_debiased" not in run(Logged(), batch([0.0], "known_healthy"), batch([1.0], "unannotated"))


def test_labels_of_the_unannotated_pool_are_never_used():
    h, u = [0.1, 0.5, 0.2], [0.4, 0.9, 0.05]
    plain = run(Logged(), batch(h, "known_healthy"), batch(u, "unannotated"))
    planted = run(Logged(), batch(h, "known_healthy"), batch(u, "unannotated", labels=[1, 0, 1]))
    flipped = run(Logged(), batch(h, "known_healthy"), batch(u, "unannotated", labels=[0, 1, 0]))
    assert plain["val/aucp"] == planted["val/aucp"] == flipped["val/aucp"]
    assert "val/auroc" not in planted


def test_labelled_pool_gives_val_auroc():
    out = run(Logged(), batch([0.1, 0.2], "known_healthy"), batch([0.3], "unannotated"),
              batch([0.1, 0.9, 0.3, 0.2], "labelled", labels=[0, 1, 1, 0]))
    assert out["val/auroc"] == pytest.approx(1.0)
    assert out["val/aucp"] == pytest.approx(1.0)  # labelled rows are not part of AUCp


def test_missing_pool_is_nan_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        out = run(Logged(), batch([0.1, 0.2], "known_healthy"))
    assert np.isnan(out["val/aucp"]) and any("val/aucp is NaN" in r.message for r in caplog.records)
    assert np.isnan(run(Logged(), batch([0.1], "known_healthy"), batch([0.2], "unannotated"),
                        batch([0.3, 0.4], "labelled", labels=[1, 1]))["val/auroc"])  # one class


def test_batches_without_pools_and_bad_pools():
    m = Logged()
    m.update({"image": torch.zeros(2, 1, 2, 2), "label": torch.tensor([0, 1])}, torch.tensor([0.1, 0.9]))
    m.update({"image": torch.zeros(1, 1, 2, 2)}, torch.tensor([0.5]))  # no label: known healthy
    assert m._pool_counts == {"known_healthy": 1, "unannotated": 0, "labelled": 2, "unannotated_labelled": 0}
    with pytest.raises(ConfigError, match="pool"):
        m.update({"image": torch.zeros(1, 1, 2, 2), "pool": ["test"]}, torch.tensor([0.5]))
    with pytest.raises(ConfigError, match="aucp_rho"):
        Logged(rho=1.0)


def test_scores_outside_0_1_in_some_batches_only():
    """torchmetrics' BinaryAUROC would squash only the batches with a score > 1 (sigmoid) and mix scales."""
    h, u = [0.1, 0.3, 0.7, 0.5], [0.2, 1.8, 0.6, 1.4, 1.0, 0.4]
    out = run(Logged(), batch(u, "unannotated"), batch(h, "known_healthy"))
    assert out["val/aucp"] == pytest.approx(aucp(np.array(h), np.array(u)))  # 0.75, not 0.875


def test_unannotated_labelled_rows_are_aucp_positives_and_scored_for_val_auroc():
    h, u, y = [0.1, 0.5, 0.2], [0.4, 0.9, 0.05], [0, 1, 0]
    out = run(Logged(), batch(h, "known_healthy"), batch(u, "unannotated_labelled", labels=y))
    assert out["val/aucp"] == pytest.approx(aucp(np.array(h), np.array(u)))
    assert out["val/auroc"] == pytest.approx(roc_auc_score(y, u))
    flipped = run(Logged(), batch(h, "known_healthy", labels=[1, 1, 1]),
                  batch(u, "unannotated_labelled", labels=[1 - v for v in y]))
    assert flipped["val/aucp"] == out["val/aucp"]  # labels never enter AUCp
    assert flipped["val/auroc"] == pytest.approx(1 - out["val/auroc"])  # known-healthy labels never enter val/auroc


def test_which_batches_policy():
    assert chosen_batches(None, 10, spread=True) is None  # all
    assert chosen_batches(0, 10, spread=False) == set()  # loss only
    assert chosen_batches(3, 10, spread=False) == {0, 1, 2}  # the first ones
    assert chosen_batches(3, 10, spread=True) == {0, 4, 9}  # spread evenly, first and last included
    assert chosen_batches(1, 10, spread=True) == {0}
    assert chosen_batches(4, None, spread=True) == {0, 1, 2, 3} == chosen_batches(4, 3, spread=True)
    assert chosen_batches(2, float("inf"), spread=True) == {0, 1}
