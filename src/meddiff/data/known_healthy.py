"""The known-healthy pool of ``data.aucp_holdout``: healthy training images held out for label-free selection (AUCp).

With ``aucp_holdout: k > 0`` a :class:`~meddiff.data.base.SplitDataModule` holds ``k`` images of its healthy
*training* split out of training (never trained on) and validates on two loaders (``meddiff.data.base``):

- loader 0: the validation split exactly as without the option, each item tagged ``pool`` = ``unannotated_labelled``
  (it carries ``label``: AUCp counts it as the unannotated pool, label 1, and never reads its labels; ``val/auroc``
  still scores its labels) or ``unannotated`` (items without ``label``);
- loader 1: the held-out images, tagged ``pool`` = ``known_healthy`` (AUCp label 0; any ``label`` they carry is
  ignored and they never enter ``val/auroc``).

The tags are the vocabulary of :mod:`meddiff.models.validation`. Which images are held out is a pure function
of (the training split, ``k``, the data seed): :func:`holdout_split`. Subject-level data hold out whole subjects
(no subject both trained on and in the pool), so the pool can be slightly larger than ``k``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from meddiff.errors import ConfigError

__all__ = ["KNOWN_HEALTHY", "UNANNOTATED", "UNANNOTATED_LABELLED", "PoolTagged", "check_holdout", "holdout_split"]

#: pool tags (the vocabulary of meddiff.models.validation; data does not import models)
KNOWN_HEALTHY, UNANNOTATED, UNANNOTATED_LABELLED = "known_healthy", "unannotated", "unannotated_labelled"

#: rng stream of the hold-out draw: np.random.default_rng([seed, _STREAM]) (apart from every DataModule's split
#: streams, so turning the option on never changes the val/test split)
_STREAM = 0xA0C


def check_holdout(k: Any) -> int:
    """``data.aucp_holdout`` as an int >= 0, else ConfigError."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral | np.integer) or k < 0:
        raise ConfigError(f"data.aucp_holdout={k!r} is invalid: use an integer >= 0 (0 = off; k > 0 holds k healthy "
                          "training images out as the known-healthy pool of val/aucp).")
    return int(k)


def holdout_split(n: int, k: int, seed: int, groups: Sequence[str] | None = None, what: str = "training images"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` training items into (kept for training, held out): int64 positions into ``0..n-1``, sorted.

    Without ``groups`` exactly ``k`` seeded-random items are held out. With ``groups`` (one subject id per item)
    whole groups are held out, in a seeded order of the sorted group ids, until at least ``k`` items are (the
    result depends on the set of groups, not on item order). ``k = 0`` holds nothing out.

    Raises:
        ConfigError: ``k`` negative, or leaving no training item (group).
    """
    k, n = check_holdout(k), int(n)
    everything = np.arange(n, dtype=np.int64)
    if k == 0:
        return everything, np.zeros(0, dtype=np.int64)
    if k >= n:
        raise ConfigError(f"data.aucp_holdout={k} must be smaller than the {n} {what} it is taken from (at least one "
                          f"must stay for training); lower data.aucp_holdout or use more training data.")
    rng = np.random.default_rng([int(seed), _STREAM])
    if groups is None:
        held = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    else:
        groups = [str(g) for g in groups]
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} items")
        uniq = sorted(set(groups))
        size = {g: 0 for g in uniq}
        for g in groups:
            size[g] += 1
        chosen: set[str] = set()
        total = 0
        for i in rng.permutation(len(uniq)):
            if total >= k:
                break
            chosen.add(uniq[i])
            total += size[uniq[i]]
        if len(chosen) == len(uniq):
            raise ConfigError(f"data.aucp_holdout={k} takes all {len(uniq)} subjects of the {n} {what} (whole subjects "
                              "are held out, so none would stay for training); lower data.aucp_holdout.")
        held = np.flatnonzero([g in chosen for g in groups]).astype(np.int64)
    keep = np.setdiff1d(everything, held, assume_unique=True)
    return keep, held


class PoolTagged(Dataset):
    """``dataset``'s items with a ``pool`` tag: ``pool`` for every item, or (``pool=None``) ``unannotated_labelled``
    for items with a ``label`` and ``unannotated`` for the others."""

    def __init__(self, dataset: Dataset, pool: str | None = None) -> None:
        self.dataset, self.pool = dataset, pool

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["pool"] = self.pool or (UNANNOTATED_LABELLED if "label" in item else UNANNOTATED)
        return item
