"""data.aucp_holdout: healthy training images held out as the known-healthy pool of val/aucp (seeded, never trained
on, whole patients where patients exist); the val split and its batches unchanged; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from meddiff.data.known_healthy import holdout_split
from meddiff.data.modules.mnist_splotch import MNISTSplotchDataModule
from meddiff.data.modules.rsna_ct import RSNACTDataModule
from meddiff.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


def test_holdout_split_is_seeded_exact_and_disjoint():
    keep, held = holdout_split(50, 7, seed=3)
    assert held.size == 7 and keep.size == 43 and not set(keep) & set(held)
    assert np.array_equal(held, holdout_split(50, 7, seed=3)[1])
    assert not np.array_equal(held, holdout_split(50, 7, seed=4)[1])
    assert holdout_split(50, 0, seed=3)[1].size == 0


def test_holdout_split_takes_whole_groups_independent_of_order():
    groups = [f"p{i // 4}" for i in range(40)]  # 10 patients x 4 slices
    keep, held = holdout_split(40, 6, seed=0, groups=groups)
    held_groups = {groups[i] for i in held}
    assert held.size == 8 and len(held_groups) == 2  # rounded up to whole patients
    assert not held_groups & {groups[i] for i in keep}
    perm = np.random.default_rng(1).permutation(40)
    shuffled = [groups[i] for i in perm]
    _, held2 = holdout_split(40, 6, seed=0, groups=shuffled)
    assert {shuffled[i] for i in held2} == held_groups


@pytest.mark.parametrize("k, n, groups, match", [
    (-1, 10, None, "integer >= 0"),
    (10, 10, None, "smaller than the 10"),
    (3, 4, ["a", "a", "b", "b"], "all 2 subjects"),
    (True, 10, None, "integer >= 0"),
])
def test_holdout_split_errors(k, n, groups, match):
    with pytest.raises(ConfigError, match=match):
        holdout_split(n, k, 0, groups)


def _mnist(**kw) -> MNISTSplotchDataModule:
    args = dict(digits=[0, 1], val_fraction=0.05, test_fraction=0.05, max_train=64, batch_size=16)
    args.update(kw)
    return MNISTSplotchDataModule(**args)


def test_mnist_holds_out_healthy_training_digits_and_keeps_val_and_test():
    off, on = _mnist(), _mnist(aucp_holdout=16)
    off.setup(), on.setup()
    held = set(on.split_indices["known_healthy"].tolist())
    assert len(held) == 16 and len(on.known_healthy_dataset()) == 16
    assert held <= set(off.split_indices["train"].tolist())  # taken from the training split ...
    assert not held & set(on.split_indices["train"].tolist())  # ... and never trained on
    assert len(on.train_dataset) == 64 - 16
    for split in ("val", "test"):
        assert np.array_equal(on.split_indices[split], off.split_indices[split])
    assert not on.known_healthy_dataset().anomaly_flags.any()
    again = _mnist(aucp_holdout=16)
    again.setup()
    assert np.array_equal(again.split_indices["known_healthy"], on.split_indices["known_healthy"])


def test_mnist_val_loaders_are_the_val_split_then_the_known_healthy_pool():
    off, on = _mnist(), _mnist(aucp_holdout=16)
    off.setup(), on.setup()
    assert not isinstance(off.val_dataloader(), list)
    val, known = on.val_dataloader()
    plain = list(off.val_dataloader())
    tagged = list(val)
    assert len(tagged) == len(plain)
    for a, b in zip(plain, tagged):  # the same batches, in the same order, plus the pool tag
        assert a["id"] == b["id"] and (a["image"] == b["image"]).all() and (a["label"] == b["label"]).all()
        assert b["pool"] == ["unannotated_labelled"] * len(b["id"])
    k = [b for b in known]
    assert sum(len(b["id"]) for b in k) == 16 and all(p == "known_healthy" for b in k for p in b["pool"])
    # what labelled selection (the evaluation protocols) reads: the val split alone, untagged
    lab = list(on.val_labelled_dataloader())
    assert [b["id"] for b in lab] == [b["id"] for b in plain] and "pool" not in lab[0]


def test_mnist_holdout_errors():
    with pytest.raises(ConfigError, match="aucp_holdout"):
        _mnist(aucp_holdout=-1)
    dm = _mnist(aucp_holdout=64)
    with pytest.raises(ConfigError, match="smaller than the 64"):
        dm.setup()


def test_configs_default_to_off():
    for name in ("mnist_splotch", "rsna_ct", "adni_slices"):
        assert OmegaConf.load(CONFIGS / f"{name}.yaml").aucp_holdout == 0, name


def test_rsna_holds_out_whole_patients_healthy_slices(tmp_path):
    args = dict(image_size=32, windows=["brain"], batch_size=8, val_fraction=0.2, test_fraction=0.2, seed=0,
                synthetic=True, synthetic_patients=10, synthetic_slices_per_patient=4, synthetic_image_size=64,
                cache_workers=0, chunk_size=16, progress=False)
    off = RSNACTDataModule(tmp_path / "rsna", **args)
    off.setup("fit")
    on = RSNACTDataModule(tmp_path / "rsna", aucp_holdout=3, **args)
    on.setup("fit")
    pool = on.known_healthy_dataset()
    pool_subjects, train_subjects = set(pool.subjects), set(on.datasets["train"].subjects)
    assert len(pool) >= 3 and pool_subjects and not pool_subjects & train_subjects
    assert pool_subjects <= set(off.datasets["train"].subjects)
    assert (pool.labels[:, -1] == 0).all()  # healthy slices only
    assert len(pool) + len(on.datasets["train"]) == len(off.datasets["train"])
    assert on.datasets["val"].ids == off.datasets["val"].ids and on.datasets["test"].ids == off.datasets["test"].ids
    val, known = on.val_dataloader()
    assert all(p == "known_healthy" for b in known for p in b["pool"])
    with pytest.raises(ConfigError, match="aucp_holdout"):
        RSNACTDataModule(tmp_path / "rsna", aucp_holdout=10_000, **args).setup("fit")
