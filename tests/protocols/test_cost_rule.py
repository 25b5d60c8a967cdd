"""The cost-aware validation rule: the cheapest sampling setting within delta of the best validation AUROC."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from meddiff.anomaly.scoring import ScoringConfig
from meddiff.diffusion import NoiseSchedule
from meddiff.diffusion.partial import PartialSampling
from meddiff.errors import ConfigError
from meddiff.protocols.anomaly import EvalOptions, evaluate_anomaly_detection
from meddiff.protocols.anomaly.cost import choose, unet_cost


class NoisyRecon:
    """Reconstructs the black background plus noise whose std falls with the draws (1 / sqrt(draws)): more draws =
    a cleaner map = a higher AUROC, at a higher cost. Records the draws of every call."""

    def __init__(self) -> None:
        self.anomaly_val = SimpleNamespace(scoring=ScoringConfig())
        self.sampling = PartialSampling(t_start=10, draws=1)
        self.schedule = NoiseSchedule(num_train_timesteps=100)
        self.seen: list[int] = []

    def reconstruct(self, batch, sampling=None):
        cfg = sampling or self.sampling
        self.seen.append(cfg.draws)
        g = torch.Generator().manual_seed(len(self.seen))
        x = batch["image"]
        noise = torch.randn(x.shape, generator=g) * (0.6 / cfg.draws ** 0.5)
        return (-torch.ones_like(x) + noise).clamp(-1, 1)


def _batches(seed: int, n: int = 60):
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 8, 8)
    label = torch.arange(n) % 2
    for i in range(n):
        if label[i]:
            r, c = (int(v) for v in torch.randint(0, 6, (2,), generator=g))
            x[i, :, r:r + 2, c:c + 2] = -0.5
    return [{"image": x[j:j + 10], "label": label[j:j + 10]} for j in range(0, n, 10)]


def test_choose_is_the_best_without_delta_and_the_cheapest_within_delta():
    assert choose([0.90, 0.95, 0.95], [1, 4, 8], None) == 1  # best AUROC, first of ties (today's rule)
    assert choose([0.90, 0.948, 0.95], [1, 4, 8], 0.005) == 1  # cheapest within 0.005 of 0.95
    assert choose([0.90, 0.948, 0.95], [1, 4, 8], 0.1) == 0
    assert choose([0.90, 0.948, 0.95], [1, 4, 8], 0.0) == 2
    assert unet_cost(PartialSampling(t_start=10, draws=4)) == 4
    assert unet_cost(PartialSampling(t_start=10, sampler="ddim", steps=5, draws=2)) == 10


def test_cost_rule_is_applied_on_validation_and_recorded():
    opts = EvalOptions(median_size=[1], reduction=["mean"], n_boot=0, baselines=[], draws=[1, 4, 16])
    best_model = NoisyRecon()
    best = evaluate_anomaly_detection(best_model, _batches(0), _batches(1), opts)
    rule = best["selection"]["cost_rule"]
    by_draws = {r["draws"]: r["val_auroc"] for r in best["selection"]["candidates"]}
    assert best["reconstruction"]["draws"] == max(by_draws, key=lambda d: (by_draws[d], -d))
    assert rule["delta"] is None and rule["val_auroc_given_up"] == 0.0
    # validation passes reconstruct at 1, 4, 16 draws (6 batches each), the test pass only at the chosen setting
    assert best_model.seen[:18] == [1] * 6 + [4] * 6 + [16] * 6 and set(best_model.seen[18:]) == {best["reconstruction"]["draws"]}

    delta = 1.0  # everything is within 1.0: the cheapest (1 draw) wins
    cheap = evaluate_anomaly_detection(NoisyRecon(), _batches(0), _batches(1),
                                       EvalOptions(**{**opts.__dict__, "cost_delta": delta}))
    rule = cheap["selection"]["cost_rule"]
    assert cheap["reconstruction"]["draws"] == 1 and rule["chosen_unet_cost"] == 1
    assert rule["delta"] == delta and rule["chosen_on"] == "validation"
    assert rule["val_auroc_given_up"] == pytest.approx(rule["best_val_auroc"] - rule["chosen_val_auroc"])
    assert rule["chosen_val_auroc"] == by_draws[1]  # the validation AUROC, not a test number
    # a delta between: the cheapest of the settings within delta of the best on validation
    assert by_draws[16] > by_draws[4] > by_draws[1]
    delta = (by_draws[16] - by_draws[4] + by_draws[16] - by_draws[1]) / 2
    mid = evaluate_anomaly_detection(NoisyRecon(), _batches(0), _batches(1),
                                     EvalOptions(**{**opts.__dict__, "cost_delta": delta}))
    assert mid["reconstruction"]["draws"] == 4


def test_sampling_candidates_need_a_reconstruction_config():
    class NoConfig:
        anomaly_val = SimpleNamespace(scoring=ScoringConfig())

        def reconstruct(self, batch):
            return torch.zeros_like(batch["image"]) - 1

    with pytest.raises(ConfigError, match="eval.draws"):
        evaluate_anomaly_detection(NoConfig(), _batches(0), _batches(1), EvalOptions(draws=[1, 2], n_boot=0))
