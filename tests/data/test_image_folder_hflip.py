"""``data.hflip``: random left-right flips of the training images (Brainomaly's official augmentation) — in the
training loaders only, image and masks together, about half the items per epoch, drawn from (seed, epoch) so a
resumed run flips exactly as an uninterrupted one; never in validation, test or the protocols' pools."""

from __future__ import annotations

import pytest
import torch

from meddiff.data.modules.image_folder import ImageFolderAnomalyDataModule
from meddiff.data.synthetic.lesion_folders import write_synthetic_image_folder
from meddiff.errors import ConfigError


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    r = tmp_path_factory.mktemp("hflip") / "data"
    write_synthetic_image_folder(r, image_size=16, n_known_healthy=8, n_mixed=(3, 3), n_val=(0, 0), n_test=(2, 2),
                                 slices_per_subject=2, seed=1)
    return r


def _module(root, hflip: bool, **kw) -> ImageFolderAnomalyDataModule:
    d = ImageFolderAnomalyDataModule(str(root), image_size=16, val_fraction=0.25, batch_size=4, seed=3,
                                     foreground_mask=True, hflip=hflip, **kw)
    d.setup("fit")
    return d


def _epoch(loader, epoch: int) -> dict[str, dict[str, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return {i: {"image": b["image"][k], "brain_mask": b["brain_mask"][k]}
            for b in loader for k, i in enumerate(b["id"])}


def test_training_items_are_flipped_with_their_masks_about_half_the_time(root):
    d = _module(root, hflip=True)
    ds = d.pool_dataset("known_healthy")
    plain = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    loader = d.train_dataloader()
    flipped_per_epoch = []
    for epoch in range(4):
        seen = _epoch(loader, epoch)
        assert set(seen) == set(plain)  # every item once per epoch
        flipped = set()
        for i, item in seen.items():
            if torch.equal(item["image"], plain[i]["image"]):
                assert torch.equal(item["brain_mask"], plain[i]["brain_mask"])
            else:
                assert torch.equal(item["image"], plain[i]["image"].flip(-1))
                assert torch.equal(item["brain_mask"], plain[i]["brain_mask"].flip(-1))  # the mask follows
                flipped.add(i)
        flipped_per_epoch.append(flipped)
    n = len(plain)
    total = sum(len(f) for f in flipped_per_epoch)
    assert 0.25 * 4 * n < total < 0.75 * 4 * n  # a fair coin per item and epoch
    assert len({frozenset(f) for f in flipped_per_epoch}) > 1  # new flips each epoch
    again = _epoch(_module(root, hflip=True).train_dataloader(), 2)  # a new module: the same (seed, epoch) flips
    assert all(torch.equal(again[i]["image"], v["image"]) for i, v in _epoch(loader, 2).items())


def test_flips_are_training_only_and_off_by_default(root):
    d = _module(root, hflip=True)
    off = _module(root, hflip=False)
    assert ImageFolderAnomalyDataModule(str(root)).hflip is False
    for name in ("known_healthy", "known_healthy_val", "mixed", "test"):  # the protocols' pools: never flipped
        a, b = d.pool_loader(name), off.pool_loader(name)
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b)), name
    for loader_a, loader_b in ((d.val_dataloader(), off.val_dataloader()),):
        for la, lb in zip(loader_a, loader_b):
            assert all(torch.equal(x["image"], y["image"]) for x, y in zip(la, lb))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(d.test_dataloader(), off.test_dataloader()))
    assert any(not torch.equal(x["image"], y["image"])  # the training loader does flip (same order, seeded)
               for x, y in zip(d.train_dataloader(), off.train_dataloader()))


def test_the_gan_flips_both_of_its_pools(root):
    d = _module(root, hflip=True, train_pools=["known_healthy", "mixed"])
    loaders = d.train_dataloader()
    assert set(loaders) == {"known_healthy", "mixed"}
    ds = d.pool_dataset("mixed")
    plain = {ds[i]["id"]: ds[i]["image"] for i in range(len(ds))}
    seen = _epoch(loaders["mixed"], 0)
    assert "label" not in next(iter(loaders["mixed"]))  # the unannotated pool stays label-free
    assert any(not torch.equal(v["image"], plain[i]) for i, v in seen.items())


def test_a_resumed_epoch_flips_as_the_uninterrupted_one(root):
    d = _module(root, hflip=True)
    full = [b["image"] for b in _loader_at(d, 1)]
    state = {"meddiff_resumable_loader": True, "seed": 3, "epoch": 1, "batches_done": 1}
    resumed = _loader_at(d, 1)
    resumed.load_state_dict(state)
    rest = [b["image"] for b in resumed]
    assert len(rest) == len(full) - 1 and all(torch.equal(a, b) for a, b in zip(rest, full[1:]))


def _loader_at(d: ImageFolderAnomalyDataModule, epoch: int):
    loader = d.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return loader


def test_bad_hflip(root):
    with pytest.raises(ConfigError, match="data.hflip"):
        ImageFolderAnomalyDataModule(str(root), hflip="yes")
