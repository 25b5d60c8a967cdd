"""CoarseGenerator: one manual-optimisation step updates critic and generator, the WGAN-GP penalty, the LR decay,
pool checks, reconstruction for the one scorer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from meddiff.errors import ConfigError, DataError
from meddiff.models.coarse_gan import CoarseGenerator, gradient_penalty, two_pool_batch
from meddiff.nets.gan import BrainomalyGenerator, PatchCritic


def tiny_gan(**kw) -> CoarseGenerator:
    torch.manual_seed(0)
    return CoarseGenerator(BrainomalyGenerator(1, 8, 2, 1), PatchCritic(1, 8, 3), **kw)


def _items(n: int, label: bool) -> list[dict]:
    g = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        item = {"image": torch.rand(1, 32, 32, generator=g) * 2 - 1, "id": f"x{i}"}
        if label:
            item["label"] = torch.tensor(0)
        out.append(item)
    return out


class TwoPools(L.LightningDataModule):
    def train_dataloader(self):
        return {"known_healthy": DataLoader(_items(8, True), batch_size=4),
                "mixed": DataLoader(_items(8, False), batch_size=4)}


def _fit(model: CoarseGenerator, iters: int, **trainer_kw) -> None:
    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, **trainer_kw)
    model.num_iters = iters
    trainer.fit(model, datamodule=TwoPools())


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _changed(before, m) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_one_step_updates_critic_and_generator():
    model = tiny_gan(n_critic=1)
    g0, d0 = _params(model.generator), _params(model.critic)
    _fit(model, 1)
    assert int(model.iterations) == 1
    assert _changed(g0, model.generator) and _changed(d0, model.critic)


def test_generator_waits_for_n_critic_iterations():
    model = tiny_gan(n_critic=2)
    g0, d0 = _params(model.generator), _params(model.critic)
    _fit(model, 1)
    assert _changed(d0, model.critic) and not _changed(g0, model.generator)
    _fit(model, 2)  # the iteration counter is the module's state: the second iteration updates G
    assert int(model.iterations) == 2 and _changed(g0, model.generator)


def test_bf16_step_is_finite():
    model = tiny_gan(n_critic=1)
    _fit(model, 1, precision="bf16-mixed")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_penalty_of_a_linear_critic():
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((1, 1, 2, 2), 0.25))

        def forward(self, x):
            return (x * self.w).sum(dim=(1, 2, 3))

    real, fake = torch.rand(3, 1, 2, 2), torch.rand(5, 1, 2, 2)
    gp = gradient_penalty(Linear(), real, fake)  # grad = w everywhere: ||w|| = 0.5
    assert gp.item() == pytest.approx((0.5 - 1) ** 2)
    gp.backward()  # differentiable w.r.t. the critic (create_graph)


def test_lr_decays_linearly_over_the_last_part():
    model = tiny_gan(num_iters=100, decay_iters=40)
    assert model.lr_factor(0) == 1.0 and model.lr_factor(59) == 1.0
    assert model.lr_factor(60) == pytest.approx(1.0) and model.lr_factor(80) == pytest.approx(0.5)
    assert model.lr_factor(100) == 0.0
    assert tiny_gan(num_iters=100).lr_factor(80) == pytest.approx(20 / 25)  # default: the last quarter


def test_batches_must_come_from_both_pools_and_hide_mixed_labels():
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(DataError, match="train_pools"):
        two_pool_batch({"image": x})
    with pytest.raises(DataError, match="never reach training"):
        two_pool_batch({"known_healthy": {"image": x}, "mixed": {"image": x, "label": torch.ones(2)}})


def test_reconstruct_is_the_healthy_estimate_and_protocol_is_refiner():
    model = tiny_gan().eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(model.reconstruct({"image": x}), model.generator.healthy(x))
    assert model.eval_protocol == "refiner"


@pytest.mark.parametrize("bad", [dict(n_critic=0), dict(lr=0), dict(betas=[0.5]), dict(num_iters=10, decay_iters=20),
                                 dict(aucp_rho=1.0)])
def test_bad_options(bad):
    with pytest.raises(ConfigError):
        tiny_gan(**bad)


def test_checkpoint_hyperparameters_are_plain():
    hp = tiny_gan(scoring={"reduction": "max"}).hparams
    assert hp["scoring"]["reduction"] == "max" and isinstance(hp["betas"], list)


def test_identity_weight_follows_the_official_default():
    """lambda_id = 1 as in the official Brainomaly code, in the model default and in configs/model/coarse_gan.yaml;
    the Brainomaly experiments flip training images (data.hflip) as its training does."""
    from pathlib import Path

    from omegaconf import OmegaConf

    assert tiny_gan().lambda_id == 1.0 and tiny_gan().lambda_gp == 10.0
    configs = Path(__file__).parents[2] / "configs"
    cfg = OmegaConf.load(configs / "model/coarse_gan.yaml")
    assert cfg.lambda_id == 1.0 and cfg.lambda_gp == 10.0
    assert "official" in (configs / "model/coarse_gan.yaml").read_text()
    for name in ("brainomaly_coarse", "brainomaly_refiner"):
        assert OmegaConf.load(configs / f"experiment/{name}.yaml").data.hflip is True, name
