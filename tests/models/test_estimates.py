"""``estimates(batch)``: the named healthy estimates the refiner protocol scores (``{"coarse"}`` for the GAN,
``{"coarse", "refined"}`` for the refiner), equal to the models' own ``reconstruct`` / ``coarse`` and in range."""

from __future__ import annotations

import dataclasses

import torch

from meddiff.diffusion import NoiseSchedule
from meddiff.models.coarse_gan import CoarseGenerator
from meddiff.models.refiner import RefinerDiffusion
from meddiff.nets import build_net
from meddiff.nets.gan import BrainomalyGenerator, PatchCritic
from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY

GEN_CFG = {"_target_": "meddiff.nets.gan.BrainomalyGenerator", "channels": 1, "conv_dim": 8, "num_down": 2,
           "num_res_blocks": 1}


def _batch(b: int = 3) -> dict:
    x = torch.rand(b, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"image": x, "id": [f"s{i}__000.png" for i in range(b)]}


def _gan() -> CoarseGenerator:
    torch.manual_seed(0)
    return CoarseGenerator(BrainomalyGenerator(1, 8, 2, 1), PatchCritic(1, 8, 3)).eval()


def test_coarse_generator_estimates_is_its_reconstruction():
    gan, batch = _gan(), _batch()
    est = gan.estimates(batch)
    assert list(est) == ["coarse"]
    assert est["coarse"].shape == batch["image"].shape
    assert float(est["coarse"].abs().max()) <= 1.0
    assert torch.equal(est["coarse"], gan.reconstruct(batch))


def test_refiner_estimates_are_coarse_and_refined_with_the_configured_steps(tmp_path):
    gan = _gan()
    path = tmp_path / "coarse.ckpt"
    torch.save({"state_dict": gan.state_dict(),
                CKPT_CONFIG_KEY: {"model": {"_target_": "meddiff.models.coarse_gan.CoarseGenerator",
                                            "generator": dict(GEN_CFG)}}}, path)
    net = build_net(dict(in_channels=2, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                         num_res_blocks=1, norm_num_groups=8, num_head_channels=8))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = RefinerDiffusion(net, NoiseSchedule(100, "cosine", prediction_type="sample"), coarse_ckpt=str(path),
                           residual_scale=0.5, sampling={"steps": 3}, ema_decay=0.0).eval()
    batch = _batch()
    est = ref.estimates(batch)
    assert list(est) == ["coarse", "refined"]
    for v in est.values():
        assert v.shape == batch["image"].shape and float(v.abs().max()) <= 1.0
    assert torch.equal(est["coarse"], ref.coarse(batch))
    assert torch.equal(est["refined"], ref.reconstruct(batch))  # sampling.steps=3, noise seeded per id
    one_step = dataclasses.replace(ref.sampling, steps=1)
    assert not torch.equal(est["refined"], ref.refine_with(batch["image"], est["coarse"], one_step, ids=batch["id"]))
