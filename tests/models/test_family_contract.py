"""The contract every model family keeps, checked on each family config (configs/model/*.yaml) with tiny nets:
it builds from its config, takes one training step (and a validation step), round-trips through a checkpoint with
the same outputs, `reconstruct(batch)` is [B, C, H, W] in [-1, 1], and its `eval_protocol` is registered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from meddiff.protocols import PROTOCOLS
from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY, load_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FAMILIES = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml") if p.stem != "diffusion_base")
B, H = 4, 16
TINY_GAN = ["net=brainomaly_gan", "net.generator.conv_dim=8", "net.generator.num_res_blocks=1",
            "net.critic.conv_dim=8", "net.critic.num_layers=3"]
#: per family: overrides that make its config tiny (and fit its data); families not listed fail loudly
OVERRIDES: dict[str, list[str]] = {
    "unconditional": ["net=unet_tiny", "model.sampling.t_start=20", "model.patch_size=8"],
    "conditional": ["net=unet_tiny", "net.in_channels=2", "model.sampling.steps=3", "model.val_sampling.steps=2"],
    "guided": ["net=unet_tiny", "+net.num_class_embeds=6", "model.sampling.t_start=20", "model.sampling.steps=2"],
    "refiner": ["net=unet_tiny", "net.in_channels=2", "model.sampling.steps=2", "model.residual_scale=0.5"],
    "coarse_gan": TINY_GAN,
    "dae": ["net=unet_tiny", "model.noise_downsample=4"],
    "cddpm": ["net=unet_tiny", "net.in_channels=5", "model.latent_dim=4", "model.encoder_channels=[8,8]",
              "model.sampling.t_start=20"],
}


def _images(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, H, H, generator=g) * 2 - 1


def batches(family: str, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a training batch, a validation batch) of the dict contract for ``family``."""
    x, label = _images(seed), torch.tensor([0, 1, 0, 1])
    if family == "coarse_gan":
        return {"known_healthy": {"image": x}, "mixed": {"image": _images(seed + 1)}}, {"image": x, "label": label}
    if family == "conditional":
        b = {"image": x, "cond": (x + 0.1 * _images(seed + 1)).clamp(-1, 1)}
        return b, b
    if family == "guided":
        b = {"image": x, "class_label": torch.tensor([0, 4, 0, 4]), "label": label}
        return b, b
    if family == "refiner":
        return {"image": x}, {"image": x, "label": label}
    return {"image": x, "label": torch.zeros(B, dtype=torch.long)}, {"image": x, "label": label}


class _Fixed(Dataset):
    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batch


@pytest.fixture(scope="module")
def coarse_ckpt(tmp_path_factory) -> Path:
    """A tiny trained-for-zero-steps CoarseGenerator checkpoint: the refiner's frozen first stage."""
    gan_cfg = _config("coarse_gan", tmp_path_factory.mktemp("gan"))
    gan = instantiate(gan_cfg.model)
    path = tmp_path_factory.mktemp("coarse") / "coarse.ckpt"
    from omegaconf import OmegaConf

    torch.save({"state_dict": gan.state_dict(),
                CKPT_CONFIG_KEY: {"model": OmegaConf.to_container(gan_cfg.model, resolve=True)}}, path)
    return path


def _config(family: str, tmp: Path, extra: list[str] = ()):  # noqa: ANN202 - DictConfig
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"model={family}", f"paths.root_dir={tmp}", "data.batch_size=4",
                                           *OVERRIDES[family], *extra])


def _build(family: str, tmp: Path, coarse: Path | None):  # noqa: ANN202
    extra = [f"model.coarse_ckpt={coarse}"] if family == "refiner" else []
    cfg = _config(family, tmp, extra)
    torch.manual_seed(0)
    return instantiate(cfg.model), cfg


def test_every_family_config_is_covered():
    assert set(FAMILIES) == set(OVERRIDES), f"add the new family to OVERRIDES: {sorted(set(FAMILIES) ^ set(OVERRIDES))}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_contract(family: str, tmp_path: Path, coarse_ckpt: Path) -> None:
    model, cfg = _build(family, tmp_path, coarse_ckpt)
    assert model.eval_protocol in PROTOCOLS, f"{family}: eval_protocol {model.eval_protocol!r} is not registered"

    train_b, val_b = batches(family)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(_Fixed(train_b), batch_size=None), DataLoader(_Fixed(val_b), batch_size=None))
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, f"{family}: one training step changed no weight"

    model.eval()
    out = model.reconstruct(val_b)
    assert out.shape == val_b["image"].shape, f"{family}: reconstruct gives {tuple(out.shape)}"
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1, f"{family}: outside [-1, 1]"

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = load_checkpoint(path)  # weights-only, as meddiff.eval reads it
    again, _ = _build(family, tmp_path, coarse_ckpt)
    again.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(again.eval().reconstruct(val_b), out, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_validates_over_several_loaders(family: str, tmp_path: Path, coarse_ckpt: Path) -> None:
    """Validation loaders are pools of one validation set (image folders: known-healthy + labelled): every family
    validates over two of them, and a diffusion family logs one ``val/loss`` over both (Lightning refuses a key
    logged from several loaders, which stopped label-selected families on image folders at their first validation)."""
    from meddiff.models.base import DiffusionModule

    model, _ = _build(family, tmp_path, coarse_ckpt)
    train_b, val_b = batches(family)
    other = {**val_b, "label": torch.zeros(B, dtype=torch.long)} if "label" in val_b else val_b
    if getattr(getattr(model, "anomaly_val", None), "label_free", False):  # its val/loss: the known-healthy pool
        other = {"image": other["image"], "pool": ["known_healthy"] * B}
    trainer = L.Trainer(max_steps=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        default_root_dir=str(tmp_path))
    loaders = [DataLoader(_Fixed(val_b), batch_size=None), DataLoader(_Fixed(other), batch_size=None)]
    trainer.fit(model, DataLoader(_Fixed(train_b), batch_size=None), loaders)
    if isinstance(model, DiffusionModule):
        assert "val/loss" in trainer.callback_metrics, f"{family}: no val/loss"
        assert torch.isfinite(trainer.callback_metrics["val/loss"])
        assert not [k for k in trainer.callback_metrics if k.startswith("val/loss/")], "one val/loss, no suffix"
