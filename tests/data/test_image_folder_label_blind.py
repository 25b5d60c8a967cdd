"""The unannotated pool is label-blind by construction (issue 17): which label folder holds an image changes nothing
a loader yields — not the items, not their ids or subjects, not the order, not the seeded shuffled batches."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.data.modules.image_folder import ImageFolderAnomalyDataModule
from meddiff.data.synthetic.lesion_folders import write_synthetic_image_folder
from meddiff.errors import DataError

POS, NEG = "train/pos", "train/neg_mixed"


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((16, 16), value, dtype=np.uint8)
    arr[:4] = 255 - value
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folders") / "a"
    write_synthetic_image_folder(root, image_size=16, n_known_healthy=4, n_mixed=(3, 3), n_val=(0, 0), n_test=(1, 1),
                                 slices_per_subject=2, seed=3)
    # two different images of one name in the two label folders (a name clash the ids must resolve label-blind),
    # and an image whose name carries no subject id (its own subject)
    _png(root / POS / "dup__000.png", 200)
    _png(root / NEG / "dup__000.png", 40)
    _png(root / NEG / "scan.png", 120)
    return root


def _permuted(original: Path, dest: Path) -> Path:
    """A copy of ``original`` with the pool's labels permuted: every positive subject moved to neg_mixed, every
    negative one to pos (the same-named pair swaps folders too)."""
    shutil.copytree(original, dest)
    pos, neg = sorted((dest / POS).iterdir()), sorted((dest / NEG).iterdir())
    tmp = dest / "train" / "swap"
    tmp.mkdir()
    for p in pos:
        p.rename(tmp / p.name)
    for p in neg:
        p.rename(dest / POS / p.name)
    for p in sorted(tmp.iterdir()):
        p.rename(dest / NEG / p.name)
    tmp.rmdir()
    return dest


def _module(root: Path, hflip: bool = False) -> ImageFolderAnomalyDataModule:
    d = ImageFolderAnomalyDataModule(str(root), image_size=16, val_fraction=0.25, batch_size=3, seed=7,
                                     train_pools=["known_healthy", "mixed"], hflip=hflip)
    d.setup("fit")
    return d


def _batches(loader) -> list[tuple[list[str], list[str], torch.Tensor]]:
    return [(list(b["id"]), list(b["subject"]), b["image"].clone()) for b in loader]


def _drawn(d: ImageFolderAnomalyDataModule) -> dict[str, list]:
    """What the pool's loaders yield: a seeded shuffled pass, the GAN's training loader, the validation loader."""
    out = {"shuffled": _batches(d.pool_loader("mixed", shuffle=True))}
    out["train_mixed"] = _batches(d.train_dataloader()["mixed"])
    pools = d.val_loader_pools()
    out["val_mixed"] = _batches(d.val_dataloader()[pools.index("mixed")])
    return out


@pytest.mark.parametrize("hflip", [False, True])  # training flips are drawn from the label-blind order
def test_moving_files_between_label_folders_leaves_the_pool_bit_identical(original: Path, tmp_path: Path,
                                                                          hflip: bool) -> None:
    permuted = _permuted(original, tmp_path / "b")
    a, b = _module(original, hflip), _module(permuted, hflip)
    labels_a, labels_b = a.unannotated_labels(), b.unannotated_labels()
    assert set(labels_a) == set(labels_b) and any(labels_a[k] != labels_b[k] for k in labels_a)  # labels did move
    assert all(labels_a[k] + labels_b[k] == 1 for k in labels_a)  # every image changed folder
    drawn_a, drawn_b = _drawn(a), _drawn(b)
    for key in drawn_a:
        assert len(drawn_a[key]) == len(drawn_b[key]) > 0, key
        for (ids_a, subj_a, img_a), (ids_b, subj_b, img_b) in zip(drawn_a[key], drawn_b[key]):
            assert ids_a == ids_b and subj_a == subj_b, key
            assert torch.equal(img_a, img_b), key  # bit-identical images in the same order


def test_pool_items_name_no_label_folder_and_are_ordered_by_subject(original: Path) -> None:
    d = _module(original)
    ds = d.pool_dataset("mixed")
    ids = [ds[i]["id"] for i in range(len(ds))]
    subjects = [ds[i]["subject"] for i in range(len(ds))]
    assert not [i for i in ids + subjects if "pos" in i or "neg" in i]
    assert list(zip(subjects, ids)) == sorted(zip(subjects, ids))  # ordered by (subject, name)
    assert {r.label for r in ds.records} == {-1} and {r.folder for r in ds.records} == {"train"}
    assert "train/scan" in ids and subjects[ids.index("train/scan")] == "train/scan"  # unparsed: its own subject
    dups = [i for i in ids if i.startswith("train/dup__000~")]
    assert len(dups) == 2  # same name in two label folders: told apart by content, not by folder
    labelled = d.pool_dataset("mixed_labelled")
    assert [labelled[i]["id"] for i in range(len(labelled))] == ids  # same images, same order, with labels
    assert {labelled[i]["id"]: int(labelled[i]["label"]) for i in range(len(labelled))} == d.unannotated_labels()


def test_an_image_stored_twice_in_the_pool_is_an_error(original: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(original, root)
    shutil.copy(root / POS / "dup__000.png", root / NEG / "dup__000.png")  # now byte-identical in both folders
    with pytest.raises(DataError, match="stored twice.*train/dup__000"):
        _module(root)


@pytest.mark.parametrize("hflip", [False, True])
def test_a_few_gan_steps_give_bit_identical_weights_and_pool_scores(original: Path, tmp_path: Path,
                                                                    hflip: bool) -> None:
    """The coarse GAN trains on the unannotated pool: permuting its labels changes neither the trained weights nor
    the transductive reconstructions (the pool's scores), with a fixed seed."""
    import lightning as L

    from meddiff.models.coarse_gan import CoarseGenerator
    from meddiff.nets.gan import BrainomalyGenerator, PatchCritic

    def train(root: Path) -> tuple[list[torch.Tensor], torch.Tensor]:
        L.seed_everything(0, verbose=False)
        model = CoarseGenerator(BrainomalyGenerator(1, 8, 2, 1), PatchCritic(1, 8, 3), n_critic=1)
        model.num_iters = 4
        trainer = L.Trainer(max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0)
        d = _module(root, hflip)
        trainer.fit(model, datamodule=d)
        model.eval()
        with torch.no_grad():
            recon = torch.cat([model.reconstruct(b) for b in d.pool_loader("mixed")])
        return [p.detach().clone() for p in model.parameters()], recon

    weights_a, recon_a = train(original)
    weights_b, recon_b = train(_permuted(original, tmp_path / "b"))
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    assert torch.equal(recon_a, recon_b)
