"""protocols/common: the healthy-set baselines, the margin over the best baseline chosen on validation, tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.errors import ConfigError, DataError
from meddiff.protocols.common import (
    HEALTHY_BASELINES,
    auroc_margin,
    build_healthy_baselines,
    check_healthy_baselines,
    load_healthy_reference,
    margin_summary,
    mean_margin,
    summary_floats,
    write_csv,
)

NN, MH = HEALTHY_BASELINES["nearest_healthy"], HEALTHY_BASELINES["mean_healthy"]


def test_healthy_baselines_reconstruct_from_the_reference_and_count_their_cost():
    ref = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 0.5)])
    built = build_healthy_baselines(ref, ["nearest_healthy", "mean_healthy"], n_healthy_total=10, fit_seconds=0.5)
    assert list(built) == [NN, MH]
    x = torch.full((2, 1, 4, 4), 0.4)
    assert torch.equal(built[NN].reconstruct(x, None), torch.full_like(x, 0.5))
    assert torch.allclose(built[MH].reconstruct(x, None), torch.full_like(x, -1.0 / 6))
    cost = built[NN].cost.as_dict()
    assert cost["n_queries"] == 2 and cost["n_reference"] == 3 and cost["n_healthy_total"] == 10
    assert built[MH].cost.fit_seconds >= 0.5
    assert list(build_healthy_baselines(ref, ["mean_healthy"])) == [MH]


def test_the_reference_is_a_seeded_subset_of_healthy_items():
    data = [{"image": torch.full((1, 2, 2), float(i)), "label": torch.tensor(i % 2)} for i in range(10)]
    images, total, _ = load_healthy_reference(data, max_items=100, seed=0)
    assert total == 10 and sorted(images[:, 0, 0, 0].tolist()) == [0.0, 2.0, 4.0, 6.0, 8.0]
    with pytest.raises(DataError, match="no healthy"):
        load_healthy_reference([d for d in data if int(d["label"]) == 1])
    with pytest.raises(ConfigError, match="eval.baselines"):
        check_healthy_baselines(["nearest"])
    with pytest.raises(ConfigError, match="baseline_max_items"):
        check_healthy_baselines(["nearest_healthy"], 0)
    assert check_healthy_baselines(("mean_healthy", "nearest_healthy")) == ["nearest_healthy", "mean_healthy"]


def test_the_best_baseline_is_chosen_on_validation_not_test():
    """On test 'strong' is the better baseline, on validation 'weak' was: the margin is taken over 'weak'.
    Picking on test (the rule broken) would compare with 'strong' and change the margin."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    model = y + rng.normal(0, 0.6, 100)
    strong, weak = y + rng.normal(0, 0.3, 100), y + rng.normal(0, 2.0, 100)
    m = auroc_margin(model, {"strong": strong, "weak": weak}, y, {"strong": 0.6, "weak": 0.7}, n_boot=50)
    assert m["baseline"] == "weak" and m["baseline_chosen_on"] == "validation"
    assert m["baseline_val_auroc"] == {"strong": 0.6, "weak": 0.7} and "chosen on validation" in m["verdict"]
    fallback = auroc_margin(model, {"strong": strong, "weak": weak}, y, {"weak": 0.7, "strong": float("nan")},
                            n_boot=0)
    assert fallback["baseline"] == "strong" and fallback["baseline_chosen_on"] == "test"
    assert "no verdict" in fallback["verdict"]
    s = margin_summary(m, "image_auroc")
    assert set(s) == {"best_baseline_image_auroc", "margin_image_auroc", "margin_image_auroc_ci_lo",
                      "margin_image_auroc_ci_hi", "model_beats_best_baseline"}
    assert margin_summary(None, "auroc") == {}


def test_mean_margin_is_positive_when_the_model_is_better_for_either_direction():
    model, a, b = np.full(20, 30.0), np.full(20, 25.0), np.full(20, 28.0)
    m = mean_margin(model + np.linspace(0, 1, 20), {"a": a, "b": b}, {"a": 27.0, "b": 26.0}, n_boot=50)
    assert m["baseline"] == "a" and m["baseline_chosen_on"] == "validation" and m["diff"] > 0
    assert m["verdict"].startswith("The model beats")
    mae = mean_margin(np.full(20, 0.1), {"a": np.full(20, 0.2)}, {"a": 0.2}, higher_is_better=False, n_boot=10)
    assert mae["diff"] == pytest.approx(0.1)


def test_tables(tmp_path):
    assert summary_floats({"a": np.float32(1.5), "n": 3, "ok": True}) == {"a": 1.5, "n": 3.0, "ok": 1.0}
    write_csv(tmp_path / "t.csv", [{"x": 1.23456789, "y": "v", "z": 0}], ["x", "y"])
    assert (tmp_path / "t.csv").read_text().splitlines() == ["x,y", "1.23457,v"]
