"""RefinerDiffusion: the coarse stage loads weights-only (clear errors when missing / foreign), the net sees
cat([r_t, coarse]) and a real timestep, training is on the residual with the generator frozen, inference samples
the residual (pure noise or t_start), checkpoints are self-contained."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from torch import nn

from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError, DataError
from meddiff.models.coarse_gan import CoarseGenerator
from meddiff.models.frozen import load_coarse_generator
from meddiff.models.refiner import RefinerDiffusion
from meddiff.nets import build_net
from meddiff.nets.gan import BrainomalyGenerator, PatchCritic
from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY

GEN_CFG = {"_target_": "meddiff.nets.gan.BrainomalyGenerator", "channels": 1, "conv_dim": 8, "num_down": 2,
           "num_res_blocks": 1}


def save_coarse(path, seed: int = 0) -> CoarseGenerator:
    """A CoarseGenerator checkpoint as meddiff.train writes it (state_dict + stored config)."""
    torch.manual_seed(seed)
    gan = CoarseGenerator(BrainomalyGenerator(1, 8, 2, 1), PatchCritic(1, 8, 3))
    torch.save({"state_dict": gan.state_dict(),
                CKPT_CONFIG_KEY: {"model": {"_target_": "meddiff.models.coarse_gan.CoarseGenerator",
                                            "generator": dict(GEN_CFG)}}}, path)
    return gan


def tiny_unet(in_channels: int = 2) -> nn.Module:
    net = build_net(dict(in_channels=in_channels, out_channels=1, channels=(8, 16), attention_levels=(False, True),
                         num_res_blocks=1, norm_num_groups=8, num_head_channels=8))
    with torch.no_grad():  # MONAI zero-initialises the output conv: an untrained net would predict exactly 0
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def make_refiner(coarse_path, **kw) -> RefinerDiffusion:
    torch.manual_seed(1)
    sched = NoiseSchedule(100, "cosine", prediction_type=kw.pop("prediction_type", "sample"))
    kw.setdefault("residual_scale", 0.5)
    sampling = {"steps": kw.pop("num_steps", 3)}
    sampling.update({k: kw.pop(k) for k in ("t_start", "sampler") if k in kw})
    return RefinerDiffusion(tiny_unet(kw.pop("in_channels", 2)), sched, sampling=sampling, coarse_ckpt=str(coarse_path),
                            ema_decay=0.0, **kw)


@pytest.fixture
def coarse_path(tmp_path):
    path = tmp_path / "coarse.ckpt"
    save_coarse(path)
    return path


def images(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loads_the_coarse_generator_frozen(coarse_path):
    gan = save_coarse(coarse_path)
    model = make_refiner(coarse_path)
    for (k, a), b in zip(gan.generator.state_dict().items(), model.coarse_net.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in model.coarse_net.parameters())
    model.train()
    assert not model.coarse_net.training  # stays in inference mode
    x = images()
    assert torch.equal(model.coarse({"image": x}), gan.generator.healthy(x).detach())


def test_missing_foreign_and_unsafe_coarse_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="Train the coarse stage first"):
        make_refiner(tmp_path / "nope.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(1)},
                CKPT_CONFIG_KEY: {"model": {"_target_": "meddiff.models.UnconditionalDiffusion"}}}, foreign)
    with pytest.raises(ConfigError, match="not a CoarseGenerator checkpoint"):
        make_refiner(foreign)
    unsafe = tmp_path / "unsafe.ckpt"
    with open(unsafe, "wb") as fh:
        pickle.dump({"state_dict": {}, "x": ConfigError("code")}, fh)
    with pytest.raises(DataError, match="refuses to load it"):
        make_refiner(unsafe)
    with pytest.raises(ConfigError, match="coarse_ckpt"):
        RefinerDiffusion(tiny_unet(), NoiseSchedule(100), coarse_ckpt=None)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"generator.w": torch.zeros(1)},
                CKPT_CONFIG_KEY: {"model": {"_target_": "x.CoarseGenerator", "generator": {"_target_": "os.system"}}}},
               evil)
    with pytest.raises(ConfigError, match="not an allowed generator"):
        load_coarse_generator(evil, CKPT_CONFIG_KEY)


@pytest.mark.parametrize("target", ["os.system", "meddiff.utils.io.atomic_write_text", "torch.nn.Conv2d",
                                    "torch.optim.AdamW", "meddiff.models.coarse_gan.CoarseGenerator"])
def test_the_generator_class_comes_from_the_one_trust_list_and_must_be_a_network(target):
    """frozen.py keeps no list of its own: a name off meddiff.utils.safety's list, or a trusted class that is not a
    network, is refused with the same clear error; both spellings of the shipped generator pass."""
    from meddiff.models.frozen import generator_class

    with pytest.raises(ConfigError, match=f"coarse generator class '{target}' is not an allowed generator class"):
        generator_class(target)
    assert generator_class("meddiff.nets.gan.BrainomalyGenerator") is BrainomalyGenerator
    assert generator_class("meddiff.nets.BrainomalyGenerator") is BrainomalyGenerator


def test_frozen_keeps_no_allow_list_of_its_own():
    import meddiff.models.frozen as frozen

    assert not any(isinstance(v, dict | set | frozenset) and any("BrainomalyGenerator" in str(k) for k in v)
                   for v in vars(frozen).values())


def test_run_dir_resolves_to_its_aucp_checkpoint(tmp_path):
    ckdir = tmp_path / "run" / "checkpoints"
    ckdir.mkdir(parents=True)
    save_coarse(ckdir / "best.ckpt", seed=3)
    last = torch.load(ckdir / "best.ckpt", weights_only=True)
    last["callbacks"] = {"ModelCheckpoint{'monitor': 'val/aucp'}": {"monitor": "val/aucp",
                                                                    "best_model_path": str(ckdir / "best.ckpt")}}
    torch.save(last, ckdir / "last.ckpt")
    _, _, info = load_coarse_generator(tmp_path / "run", CKPT_CONFIG_KEY)
    assert info["rule"] == "aucp" and info["path"].endswith("best.ckpt")


def test_net_input_is_residual_and_coarse_with_a_real_timestep(coarse_path):
    model = make_refiner(coarse_path)
    seen = {}

    def spy(module, args):
        seen["x"], seen["t"] = args[0].detach().clone(), args[1].detach().clone()

    model.net.register_forward_pre_hook(spy)
    x = images()
    batch = {"image": x}
    model.train()
    model.diffusion_loss(batch)
    c = model.coarse(batch)
    assert seen["x"].shape == (2, 2, 32, 32)
    assert torch.equal(seen["x"][:, 1:], c)  # the second channel is the coarse estimate
    assert seen["t"].dtype == torch.long and seen["t"].shape == (2,)
    # the timestep matters: same input, different t, different output
    inp = model.net_input(torch.zeros_like(x), {"coarse": c})
    out_a = model.net(inp, torch.full((2,), 5))
    out_b = model.net(inp, torch.full((2,), 90))
    assert not torch.allclose(out_a, out_b)


def test_training_target_is_the_scaled_residual(coarse_path):
    model = make_refiner(coarse_path, residual_scale=0.25)
    x = images()
    rb = model._residual_batch({"image": x})
    assert torch.allclose(rb["image"], (x - model.coarse({"image": x})) / 0.25)


def test_auto_residual_scale_is_estimated_once_and_kept(coarse_path):
    model = make_refiner(coarse_path, residual_scale="auto")
    with pytest.raises(ConfigError, match="not been estimated"):
        model.reconstruct({"image": images()})
    x = images(4)
    model.train()
    model.diffusion_loss({"image": x})
    expected = float((x - model.coarse({"image": x})).std())
    assert float(model.residual_std) == pytest.approx(expected, rel=1e-5)
    model.diffusion_loss({"image": images(4, seed=9)})
    assert float(model.residual_std) == pytest.approx(expected, rel=1e-5)
    assert "residual_std" in model.state_dict()


def test_a_training_step_moves_the_denoiser_not_the_generator(coarse_path):
    model = make_refiner(coarse_path)
    g0 = [p.clone() for p in model.coarse_net.parameters()]
    n0 = [p.clone() for p in model.net.parameters()]
    opt = torch.optim.SGD(model.net.parameters(), lr=0.1)
    model.train()
    loss = model.diffusion_loss({"image": images()})
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(g0, model.coarse_net.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(n0, model.net.parameters()))


def test_training_rejects_anything_but_known_healthy(coarse_path):
    model = make_refiner(coarse_path)
    x = images()
    with pytest.raises(DataError, match="known-healthy"):
        model.training_step({"known_healthy": {"image": x}, "mixed": {"image": x}}, 0)
    with pytest.raises(DataError, match="label != 0"):
        model.training_step({"image": x, "label": torch.tensor([0, 1])}, 0)


@pytest.mark.parametrize("t_start", [None, 40])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_refined_is_coarse_plus_a_sampled_residual(coarse_path, t_start, sampler):
    model = make_refiner(coarse_path, t_start=t_start, sampler=sampler).eval()
    x = images()
    batch = {"image": x}
    r1, r2 = model.reconstruct(batch), model.reconstruct(batch)
    assert r1.shape == x.shape and r1.abs().max() <= 1
    assert torch.equal(r1, r2)  # seeded
    assert not torch.allclose(r1, model.coarse(batch))
    assert model.refine_with(x, model.coarse(batch), dataclasses.replace(model.sampling, steps=1)).shape == x.shape


def test_steps_range_and_config_errors(coarse_path):
    model = make_refiner(coarse_path)
    with pytest.raises(ConfigError, match="1-50"):
        model.refine_with(images(), model.coarse({"image": images()}), dataclasses.replace(model.sampling, steps=51))
    with pytest.raises(ConfigError, match="sampling.steps"):
        make_refiner(coarse_path, num_steps=0)
    with pytest.raises(ConfigError, match="val_sampling.steps"):
        make_refiner(coarse_path, val_sampling={"steps": 51})
    with pytest.raises(ConfigError, match="sampling.clip=.* is not used by the refiner"):
        RefinerDiffusion(tiny_unet(2), NoiseSchedule(100), sampling={"steps": 3, "clip": True},
                         coarse_ckpt=str(coarse_path), residual_scale=0.5, ema_decay=0.0)
    with pytest.raises(ConfigError, match="in_channels"):
        make_refiner(coarse_path, in_channels=1)
    with pytest.raises(ConfigError, match="residual_scale"):
        make_refiner(coarse_path, residual_scale=0)
    with pytest.raises(ConfigError, match="t_start"):
        make_refiner(coarse_path, t_start=100)


def test_checkpoints_are_self_contained(coarse_path, tmp_path):
    model = make_refiner(coarse_path)
    ckpt = {CKPT_CONFIG_KEY: {"model": {"coarse_ckpt": str(coarse_path)}}, "state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    arch = ckpt[CKPT_CONFIG_KEY]["model"]["coarse_net"]
    assert "_target_" not in arch and arch["class"] == GEN_CFG["_target_"]  # Hydra must not build it on its own
    assert torch.load(coarse_path, weights_only=True)  # untouched
    coarse_path.unlink()  # the coarse file is gone: the refiner still rebuilds from its own checkpoint
    again = make_refiner(coarse_path, coarse_net=arch)
    again.load_state_dict(ckpt["state_dict"])
    x = images()
    assert torch.equal(again.eval().reconstruct({"image": x}), model.eval().reconstruct({"image": x}))
    assert again.eval_protocol == "refiner"
    assert isinstance(model.hparams["coarse_source"], dict)
