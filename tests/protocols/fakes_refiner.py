"""A tiny fake refiner model and pool datamodule for the refiner protocol's tests and the protocol contract test.

``make(tmp_path) -> (model, datamodule, eval_cfg)``. Images are ``[1, 16, 16]`` in ``[-1, 1]``: a fixed healthy
template plus per-image noise; anomalous images add a bright disc (its ``mask`` where the pool has masks).
Subjects have two slices each. The datamodule counts what is read (``reads[pool]`` items, ``test_loaders``) so a
test can check that the test split is read once.

The fake refiner: ``coarse`` = the template (a perfect healthy estimate), ``refine_with(x, c, sampling)`` = coarse
plus noise seeded by image id whose size grows with ``sampling.steps`` (1 step: none), so its configured
``model.sampling.steps`` = 3 is *worse* than 1 step: a protocol that let the steps sweep pick the headline would
report a different number.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from meddiff.anomaly.scoring import ScoringConfig
from meddiff.errors import ConfigError

SIZE = 16


def template() -> torch.Tensor:
    """The healthy template ``[1, SIZE, SIZE]`` in [-0.5, 0.5]: a smooth gradient."""
    g = torch.linspace(-0.5, 0.5, SIZE)
    return ((g[:, None] + g[None, :]) / 2)[None]


def _noise(key: str, shape: Sequence[int], scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return scale * torch.randn(*shape, generator=gen)


@dataclass
class Record:
    """One image of a pool (what ``pool_dataset(name).records`` lists)."""

    id: str
    subject: str
    label: int
    image: torch.Tensor
    mask: torch.Tensor


def make_image(key: str, anomalous: bool, base: torch.Tensor | None = None, noise: float = 0.05,
               lesion: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image [1, S, S] in [-1, 1], mask bool [1, S, S])`` of one image (``key`` seeds its noise and disc)."""
    x = (template() if base is None else base) + _noise(key, (1, SIZE, SIZE), noise)
    mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    if anomalous:
        g = torch.Generator().manual_seed(zlib.crc32(("disc" + key).encode()))
        cy, cx = (int(v) for v in torch.randint(4, SIZE - 4, (2,), generator=g))
        yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) <= 9)[None]
        x = torch.where(mask, x + lesion, x)
    return x.clamp(-1, 1), mask


def pool_records(prefix: str, n_pos: int, n_neg: int, slices: int = 2, lesion: float = 0.8) -> list[Record]:
    """``n_pos`` anomalous and ``n_neg`` healthy subjects of ``slices`` images each (disc contrast ``lesion``)."""
    out = []
    for label, n in ((1, n_pos), (0, n_neg)):
        for k in range(n):
            subject = f"{prefix}{'p' if label else 'n'}{k}"
            for z in range(slices):
                rid = f"{subject}__{z:03d}.png"
                img, mask = make_image(rid, bool(label), lesion=lesion)
                out.append(Record(rid, subject, label, img, mask))
    return out


class PoolDataset(Dataset):
    """Items ``{"image", "id", "subject", "pool"}`` (+ ``label``, ``mask``), counting reads into ``counter``."""

    def __init__(self, records: list[Record], name: str, with_labels: bool, with_masks: bool,
                 counter: dict[str, int]) -> None:
        self.records, self.name = records, name
        self.with_labels, self.with_masks, self.counter = with_labels, with_masks, counter

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        self.counter[self.name] = self.counter.get(self.name, 0) + 1
        r = self.records[i]
        item: dict[str, Any] = {"image": r.image.clone(), "id": r.id, "subject": r.subject, "pool": self.name}
        if self.with_labels:
            item["label"] = torch.tensor(r.label, dtype=torch.long)
        if self.with_masks:
            item["mask"] = r.mask.clone()
        return item


class FakePools:
    """The pools interface of ``ImageFolderAnomalyDataModule`` over in-memory records.

    ``pools``: name -> records (``known_healthy``, ``known_healthy_val``, ``mixed``, ``labelled_val``, ``test``;
    ``mixed_labelled`` is ``mixed`` with labels). ``masks``: pools whose items carry ``mask``.
    """

    def __init__(self, pools: dict[str, list[Record]], masks: Sequence[str] = (), batch_size: int = 4) -> None:
        self.pools = dict(pools)
        self.masks = set(masks)
        self.batch_size = batch_size
        self.reads: dict[str, int] = {}
        self.test_loaders = 0
        self._datasets: dict[str, PoolDataset] = {}

    def val_loader_pools(self) -> list[str]:
        return [p for p in ("known_healthy_val", "mixed", "labelled_val") if self.has_pool(p)]

    def has_pool(self, name: str) -> bool:
        src = "mixed" if name == "mixed_labelled" else name
        return bool(self.pools.get(src))

    def pool_dataset(self, name: str) -> PoolDataset:
        if name not in self._datasets:
            src = "mixed" if name == "mixed_labelled" else name
            if not self.pools.get(src):
                raise ConfigError(f"no pool {name!r}")
            self._datasets[name] = PoolDataset(self.pools[src], name, with_labels=name != "mixed",
                                               with_masks=src in self.masks, counter=self.reads)
        return self._datasets[name]

    def pool_loader(self, name: str, shuffle: bool = False, max_items: int | None = None) -> DataLoader:
        return DataLoader(self.pool_dataset(name), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self.pool_loader("known_healthy")

    def val_dataloader(self) -> list[DataLoader]:
        return [self.pool_loader(p) for p in self.val_loader_pools()]

    def test_dataloader(self) -> DataLoader:
        self.test_loaders += 1
        return self.pool_loader("test")


@dataclass
class FakeSampling:
    """The fake's ``model.sampling`` (the fields the protocol reads; replaced with ``dataclasses.replace``)."""

    sampler: str = "fake"
    steps: int = 3
    t_start: int | None = None
    eta: float = 0.0
    spacing: str = "trailing"


class FakeRefiner(nn.Module):
    """``estimates(batch) -> {"coarse", "refined"}`` like ``RefinerDiffusion`` (see the module docstring)."""

    eval_protocol = "refiner"

    def __init__(self, num_steps: int = 3, noise_per_step: float = 0.4) -> None:
        super().__init__()
        self.anomaly_val = SimpleNamespace(scoring=ScoringConfig())  # the scorer protocols read
        self.sampling = FakeSampling(steps=int(num_steps))
        self.noise_per_step = float(noise_per_step)
        self.w = nn.Parameter(torch.ones(1))  # weights to compare before / after a protocol run

    def coarse(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"]
        return (template().to(x) * self.w).expand_as(x).clone()

    def check_sampling(self, cfg: FakeSampling, where: str) -> None:
        if not 1 <= int(cfg.steps) <= 10:
            raise ConfigError(f"{where}.steps={cfg.steps} is outside [1, 10].")

    def refine_with(self, x: torch.Tensor, coarse: torch.Tensor, cfg: FakeSampling,
                    generator: torch.Generator | None = None, ids: Sequence[str] | None = None) -> torch.Tensor:
        self.check_sampling(cfg, "sampling")
        steps = int(cfg.steps)
        ids = list(ids) if ids is not None else [str(i) for i in range(x.shape[0])]
        z = torch.stack([_noise(f"refine{i}", x.shape[1:], 1.0) for i in ids]).to(x)
        return (coarse + self.noise_per_step * (steps - 1) * z).clamp(-1, 1)

    @torch.no_grad()
    def estimates(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        c = self.coarse(batch)
        return {"coarse": c, "refined": self.refine_with(batch["image"], c, self.sampling, ids=batch.get("id"))}


def parse_id(rid: str) -> tuple[str, int]:
    """``(pool prefix, label)`` of a fake record id ``<prefix><p|n><k>__<zzz>.png`` (``pool_records``)."""
    subject = rid.split("__")[0].rstrip("0123456789")
    return subject[:-1], int(subject[-1] == "p")


class CraftedCheckpoints(nn.Module):
    """A model whose weights set how well it separates each pool, for checkpoints with known selector numbers.

    ``reconstruct(batch) = x - s``, so an image's L1 score is ``s = gain[pool] * label + r``: ``r`` in ``[0, 0.5)`` for
    anomalous images and in ``[0.5, 1)`` for healthy ones (from the id), ``gain`` one weight per pool family (the
    mixed set ``mx``, labelled validation ``va``, test ``te``; healthy pools have no anomalies). A pool's AUROC is
    0 at gain 0 and 1 at gain >= 1; AUCp (held-out healthy vs the mixed set) grows with the mixed set's gain.
    """

    eval_protocol = "refiner"
    POOLS = {"mx": 0, "va": 1, "te": 2}

    def __init__(self, gains: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        super().__init__()
        self.anomaly_val = SimpleNamespace(scoring=ScoringConfig())  # the scorer protocols read
        self.gain = nn.Parameter(torch.tensor([float(g) for g in gains]))

    def shift(self, rid: str) -> float:
        """The score ``s`` of image ``rid`` (see the class docstring)."""
        prefix, label = parse_id(rid)
        r = (zlib.crc32(rid.encode()) % 1000) / 1000 * 0.5 + (0.0 if label else 0.5)
        g = float(self.gain.detach()[self.POOLS[prefix]]) if prefix in self.POOLS else 0.0
        return g * label + r

    def reconstruct(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"]
        s = torch.tensor([self.shift(str(i)) for i in batch["id"]], dtype=x.dtype).view(-1, 1, 1, 1)
        return x - s


def default_pools() -> dict[str, list[Record]]:
    return {
        "known_healthy": pool_records("kh", 0, 6),
        "known_healthy_val": pool_records("khv", 0, 3),
        "mixed": pool_records("mx", 3, 3),
        "labelled_val": pool_records("va", 3, 3),
        "test": pool_records("te", 4, 4),
    }


def make(tmp_path: Path, masks: bool = True) -> tuple[FakeRefiner, FakePools, dict[str, Any]]:
    """A fake refiner, fake pools (masks on labelled_val and test) and quick eval options."""
    torch.manual_seed(0)
    data = FakePools(default_pools(), masks=("labelled_val", "test") if masks else ())
    eval_cfg = {"n_boot": 50, "seed": 0, "steps": [1, 2], "figures": False, "compare_checkpoints": True,
                "checkpoint_dir": str(Path(tmp_path) / "no_checkpoints")}
    return FakeRefiner(), data, eval_cfg
