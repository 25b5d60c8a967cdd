"""ADNI data.aucp_holdout: whole CN training subjects (all their slices) held out as the known-healthy pool of
val/aucp; never trained on; seeded; val/test unchanged; k = 0 changes nothing; clear errors; a guided model's
validation logs val/aucp with the pool."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from meddiff.data.formats.adni_json import read_dataset_json
from meddiff.data.modules.adni.datamodule import ADNISliceDataModule
from meddiff.data.preprocess.mri_slices import slice_range
from meddiff.data.synthetic.mri import write_synthetic_adni
from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError
from meddiff.models.guided import GuidedDiffusion
from meddiff.nets import build_net

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "adni_slices.yaml"
SHAPE = (16, 16, 16)
PER_VOLUME = len(slice_range(16))  # one axis: 7 slices per volume
TASK = "2d_cfg_anom_det"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """13 CN + 1 EMCI/MCI/LMCI + 4 AD volumes; cn0..cn11 paired into the all-CN subjects C0..C5 (2 volumes each),
    cn12 and ad0 form subject M (one CN, one AD volume: not healthy, never held out); the rest are one volume each."""
    r = tmp_path_factory.mktemp("adni_aucp")
    write_synthetic_adni(r, n_per_class=[13, 1, 1, 1, 4], shape=SHAPE, seed=0)
    path = r / TASK / "dataset.json"
    records = json.loads(path.read_text())
    for rec in records:
        name = Path(rec["image"]).name.split(".")[0]  # cn3, ad0, ...
        if name in ("cn12", "ad0"):
            rec["subject"] = "M"
        elif name.startswith("cn"):
            rec["subject"] = f"C{int(name[2:]) // 2}"
    path.write_text(json.dumps(records))
    return r


def _dm(root: Path, **kw) -> ADNISliceDataModule:
    args = dict(root=str(root), image_size=16, axes=(2,), val_fraction=0.1, test_fraction=0.1, seed=0,
                batch_size=8, cache_dir=None)
    args.update(kw)
    return ADNISliceDataModule(**args)


def _subjects_of(root: Path) -> dict[str, set[int]]:
    """subject -> the slice labels of its volumes (whole dataset.json)."""
    out: dict[str, set[int]] = {}
    for e in read_dataset_json(root / TASK / "dataset.json"):
        out.setdefault(e.subject, set()).add(e.slice_label)
    return out


def _ids(ds) -> list[str]:
    return [ds[i]["id"] for i in range(len(ds))]


def _train_subjects(dm: ADNISliceDataModule) -> set[str]:
    return {e.subject for e in dm.dataset("train").volumes}


def test_fixture_has_mixed_subject_in_train(root: Path) -> None:
    dm = _dm(root)
    assert "M" in _train_subjects(dm)  # so the CN-only rule below is exercised
    assert _subjects_of(root)["M"] == {1, 5}


def test_holds_out_whole_cn_subjects_never_trained_on(root: Path) -> None:
    off, on = _dm(root), _dm(root, aucp_holdout=10)
    pool = on.known_healthy_dataset()
    pool_subjects = {e.subject for e in pool.volumes}
    classes = _subjects_of(root)
    assert len(pool) >= 10 and len(pool_subjects) >= 1
    assert not pool_subjects & _train_subjects(on)  # disjoint from what is trained on
    assert pool_subjects <= _train_subjects(off)  # taken from the training split
    assert all(classes[s] == {1} for s in pool_subjects)  # only all-CN subjects
    assert all(int(pool[i]["label"]) == 0 and int(pool[i]["class_label"]) == 0 for i in range(len(pool)))
    # whole subjects: every slice of every volume of a held subject is in the pool
    off_train = off.dataset("train")
    items = [off_train[i] for i in range(len(off_train))]
    assert set(_ids(pool)) == {it["id"] for it in items if it["subject"] in pool_subjects}
    assert sorted(_ids(pool) + _ids(on.dataset("train"))) == sorted(_ids(off_train))
    for split in ("val", "test"):
        assert _ids(on.dataset(split)) == _ids(off.dataset(split))


@pytest.mark.parametrize("train_classes", [None, ["CN"]])
def test_only_subjects_with_all_volumes_cn_are_held_out(root: Path, train_classes) -> None:
    """Over several data seeds, a pool of all CN-only training subjects but two never takes subject M (a CN and an
    AD volume; also when train_classes=[CN] drops M's AD volume from training) nor any non-CN subject."""
    classes, seen_m = _subjects_of(root), 0
    for seed in range(6):
        off = _dm(root, seed=seed, train_classes=train_classes)
        train = off.dataset("train")
        seen_m += "M" in _train_subjects(off)
        cn_only = sum(len(train.volume_indices(e.volume_id)) for e in train.volumes if classes[e.subject] == {1})
        pool = _dm(root, seed=seed, train_classes=train_classes, aucp_holdout=cn_only - 4 * PER_VOLUME)
        held = {e.subject for e in pool.known_healthy_dataset().volumes}
        assert held and all(classes[s] == {1} for s in held), (seed, held)
    assert seen_m >= 3  # the rule was exercised


def test_k_zero_changes_nothing(root: Path) -> None:
    default, zero = _dm(root), _dm(root, aucp_holdout=0)
    assert _ids(zero.dataset("train")) == _ids(default.dataset("train"))
    assert not isinstance(zero.val_dataloader(), list) and zero.known_healthy is None
    torch.manual_seed(0)
    a = [b["id"] for b in default.train_dataloader()]
    torch.manual_seed(0)
    b = [b["id"] for b in zero.train_dataloader()]
    assert a == b
    assert OmegaConf.load(CONFIG).aucp_holdout == 0


def test_pool_is_deterministic_from_the_data_seed(root: Path) -> None:
    pools = [_ids(_dm(root, aucp_holdout=10).known_healthy_dataset()) for _ in range(2)]
    assert pools[0] == pools[1]
    # the hold-out draw is not a fixed choice: over a few seeds the held-out subjects vary
    held = {frozenset(e.subject for e in _dm(root, aucp_holdout=5, seed=s).known_healthy_dataset().volumes)
            for s in range(4)}
    assert len(held) > 1


def test_val_loaders_are_the_val_split_then_the_pool(root: Path) -> None:
    off, on = _dm(root), _dm(root, aucp_holdout=10)
    val, known = on.val_dataloader()
    plain = list(off.val_dataloader())
    tagged = list(val)
    assert [b["id"] for b in tagged] == [b["id"] for b in plain]
    assert all(p == "unannotated_labelled" for b in tagged for p in b["pool"])
    assert all(p == "known_healthy" for b in known for p in b["pool"])
    assert [b["id"] for b in on.val_labelled_dataloader()] == [b["id"] for b in plain]


def test_errors(root: Path) -> None:
    with pytest.raises(ConfigError, match="aucp_holdout"):
        _dm(root, aucp_holdout=-1)
    off = _dm(root)
    classes = _subjects_of(root)
    cn_only = sum(len(off.dataset("train").volume_indices(e.volume_id)) for e in off.dataset("train").volumes
                  if classes[e.subject] == {1})
    # every CN-only training subject would be needed (subject M, with an AD volume, does not count)
    with pytest.raises(ConfigError, match="aucp_holdout"):
        _dm(root, aucp_holdout=cn_only).setup("fit")
    with pytest.raises(ConfigError, match="aucp_holdout"):
        _dm(root, aucp_holdout=cn_only - PER_VOLUME + 1).setup("fit")
    with pytest.raises(ConfigError, match="no CN subject"):
        _dm(root, aucp_holdout=1, train_classes=["AD"]).setup("fit")


def test_guided_validation_logs_val_aucp_with_the_pool(root: Path) -> None:
    torch.manual_seed(0)
    net = build_net(dict(in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                         num_res_blocks=1, norm_num_groups=8, num_head_channels=8, num_class_embeds=6))
    model = GuidedDiffusion(net=net, schedule=NoiseSchedule(20), ema_decay=0, val_batches=1,
                            sampling={"t_start": 5, "steps": 1})
    dm = _dm(root, aucp_holdout=10, batch_size=32)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=dm, verbose=False)
    assert len(trainer.num_val_batches) == 2  # the val split and the known-healthy pool
    aucp = float(trainer.callback_metrics["val/aucp"])
    assert 0.0 <= aucp <= 1.0
