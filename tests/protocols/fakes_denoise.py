"""A tiny fake model and data for the denoise protocol: ``make(tmp_path) -> (model, datamodule, eval_cfg)``.

The protocol runs on them in a few seconds (every method, the supervised baseline, the quality bar). They provide
exactly the interfaces the protocol declares (``meddiff.protocols.denoise.interfaces``: ``DenoiseModel``,
``DenoiseData``) and nothing of a real DataModule or model class. The data counts what is read:
``datamodule.reads`` lists every ``noisy_dataset(split, ...)`` call as ``(split, noise_std)`` and
``datamodule.items_read[split]`` every item index read, so a test can check that the test split was read once
(each selected test patch exactly once per noise level).

Self-contained (torch and numpy only) so a contract test can load it by path.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

PATCH = 8  # patch size; slices are 16 x 16, so 4 patches (stride 8) per slice
SLICE = 16
SPLITS = {"train": [0, 1], "val": [2], "test": [3, 4]}  # volume rows per split
SLICES_PER_VOLUME = 2

#: a small net for the supervised U-Net baseline (``meddiff.nets.build_net``; channels set by the protocol)
NET = dict(in_channels=1, out_channels=1, channels=[8, 16], attention_levels=[False, False], num_res_blocks=1,
           norm_num_groups=8, num_head_channels=8)


@dataclass
class FakeSampling:
    """The model's ``sampling``: the fields the protocol changes in its copies (``dataclasses.replace``) and
    records."""

    sampler: str = "ddim"
    steps: int | None = 2
    spacing: str = "leading"
    eta: float = 0.0
    clip: bool = True
    seed: int = 0
    draws: int = 1


class FakeDenoiser(torch.nn.Module):
    """``reconstruct({"cond": ...}, sampling)``: a 3 x 3 box blur blended with the input (``weight``), plus noise of
    scale ``1e-3 * steps`` seeded with ``sampling.seed`` (so samplers differ a little and seeds matter)."""

    image_channels = cond_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.6))
        self.schedule = SimpleNamespace(num_train_timesteps=4, prediction_type="sample")
        self.sampling = FakeSampling()

    def reconstruct(self, batch: dict[str, Any], sampling: FakeSampling | None = None) -> torch.Tensor:
        cfg = self.sampling if sampling is None else sampling
        cond = batch["cond"]
        with torch.no_grad():
            blur = torch.nn.functional.avg_pool2d(cond, 3, stride=1, padding=1, count_include_pad=False)
            out = self.weight * blur + (1 - self.weight) * cond
            n = self.schedule.num_train_timesteps if cfg.steps is None else cfg.steps
            generator = torch.Generator(device=cond.device).manual_seed(cfg.seed)
            noise = torch.randn(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
            return (out + 1e-3 * n * noise).clamp(-1, 1)


def _clean_slice(volume: int, index: int) -> np.ndarray:
    """A smooth ``[SLICE, SLICE]`` image in ``[-1, 1]``: background -1 and a bright disc (deterministic)."""
    g = np.random.default_rng(1000 * volume + index)
    yy, xx = np.mgrid[:SLICE, :SLICE]
    cy, cx = g.uniform(5, 11, size=2)
    r = g.uniform(3, 6)
    img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, g.uniform(0.2, 0.8), -1.0)
    return img.astype(np.float32)


class FakePatches(torch.utils.data.Dataset):
    """The (noisy, clean) patch pairs of one split at one noise level, deterministic noise per item."""

    def __init__(self, split: str, noise_std: float, reads: list[int], info: Any) -> None:
        self.split, self.noise_std, self._reads, self.info = split, float(noise_std), reads, info
        self.volumes = list(SPLITS[split])
        rows = [(v, s, y, x) for v in self.volumes for s in range(SLICES_PER_VOLUME)
                for y in range(0, SLICE, PATCH) for x in range(0, SLICE, PATCH)]
        self.coords = np.asarray(rows, dtype=np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self._reads.append(int(i))
        v, s, y, x = (int(c) for c in self.coords[i])
        clean = _clean_slice(v, s)[y:y + PATCH, x:x + PATCH][None]
        # the split enters the seed by its position (str hashes are salted per process)
        g = np.random.default_rng([list(SPLITS).index(self.split), i, int(round(self.noise_std * 1e6))])
        noisy = clean + self.noise_std * g.standard_normal(clean.shape).astype(np.float32)
        return {"image": torch.from_numpy(clean), "cond": torch.from_numpy(noisy),
                "coords": torch.as_tensor(self.coords[i])}


class FakeDenoiseData:
    """``DenoiseData``: ``noise_std``, ``noisy_dataset(split, noise_std)``, ``split_names()``,
    ``train_dataloader()``; records every read (see the module)."""

    def __init__(self, tmp_path: str | Path, noise_std: float = 0.1) -> None:
        self.noise_std = noise_std
        self.batch_size = 8
        n_volumes = max(v for vs in SPLITS.values() for v in vs) + 1
        self.info = SimpleNamespace(path=str(Path(tmp_path) / "fake_patches.h5"), sha256=["0" * 64],
                                    slice_shapes=np.full((n_volumes, 2), SLICE, dtype=np.int64))
        self.reads: list[tuple[str, float | None]] = []
        self.items_read: dict[str, list[int]] = defaultdict(list)

    def noisy_dataset(self, split: str, noise_std: float | None = None) -> FakePatches:
        self.reads.append((split, noise_std))
        level = self.noise_std if noise_std is None else noise_std
        return FakePatches(split, level, self.items_read[split], self.info)

    def split_names(self) -> dict[str, list[str]]:
        return {k: [f"vol{v}" for v in vs] for k, vs in SPLITS.items()}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.noisy_dataset("train"), batch_size=self.batch_size, shuffle=False)


def make(tmp_path: str | Path) -> tuple[FakeDenoiser, FakeDenoiseData, dict[str, Any]]:
    """``(model, datamodule, eval_cfg)`` on which ``meddiff.protocols.denoise.run`` takes a few seconds."""
    torch.manual_seed(0)
    cfg = dict(ddim_steps=[2, 3], ddpm=True, batch_size=8, nlm_h_factors=[0.5, 1.0], val_patches=4, bm3d=False,
               supervised=dict(steps=2, net=dict(NET)), n_boot=50, n_slices_out=1, write_tiff=False,
               write_nifti=False, figures=False, progress=False)
    return FakeDenoiser(), FakeDenoiseData(tmp_path), cfg
