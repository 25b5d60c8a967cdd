"""Split helpers: whole subjects / patients / volumes per split, optionally stratified, seeded.

Every split is a pure function of (the set of groups, fractions, seed): input order never changes it. One
fraction check (:func:`check_fractions`) serves every DataModule.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from meddiff.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def check_fractions(val_fraction: float, test_fraction: float) -> tuple[float, float]:
    """Both in [0, 1) with a sum < 1, else ConfigError; returns them as floats."""
    vf, tf = float(val_fraction), float(test_fraction)
    if not (0 <= vf < 1 and 0 <= tf < 1 and vf + tf < 1):
        raise ConfigError(f"val_fraction={vf} and test_fraction={tf} must be in [0, 1) with a sum < 1.")
    return vf, tf


def subject_of(name: str, subject_regex: str | None) -> str:
    """The subject id in ``name``: group 1 (or the whole match) of ``subject_regex``; no regex = ``name``."""
    if not subject_regex:
        return name
    m = re.search(subject_regex, name)
    if not m:
        raise ConfigError(f"subject_regex={subject_regex!r} does not match volume name {name!r}")
    return m.group(1) if m.groups() else m.group(0)


def split_groups(groups: Sequence[str], val_fraction: float, test_fraction: float, seed: int = 0
                 ) -> dict[str, list[int]]:
    """Assign items (grouped by ``groups[i]``, e.g. subject ids) to train / val / test; a group never spans two.

    A positive fraction gets at least one group. Returns ``{"train"|"val"|"test": sorted item indices}``.

    Raises:
        ConfigError: bad fractions. DataError: too few groups for train plus one per positive fraction.
    """
    vf, tf = check_fractions(val_fraction, test_fraction)
    uniq = sorted(set(groups))
    G = len(uniq)
    n_test = max(1, round(tf * G)) if tf > 0 else 0
    n_val = max(1, round(vf * G)) if vf > 0 else 0
    if G - n_test - n_val < 1:
        raise DataError(
            f"cannot split {G} subject(s)/volume(s) by volume into train/val/test with val_fraction={vf}, "
            f"test_fraction={tf}: each split needs whole volumes; convert more volumes or set a fraction to 0"
        )
    order = np.random.default_rng(seed).permutation(G)
    which: dict[str, str] = {}
    for rank, g in enumerate(order):
        which[uniq[g]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, g in enumerate(groups):
        out[which[g]].append(i)
    return out


def _allocate(counts: Mapping[int, int], frac: float, room: dict[int, int], rng: np.random.Generator
              ) -> dict[int, int]:
    """Largest-remainder allocation of ``round(frac * total)`` items over classes, at most ``room[c]`` each."""
    total = sum(counts.values())
    target = int(math.floor(frac * total + 0.5))
    exact = {c: frac * n for c, n in counts.items()}
    alloc = {c: min(int(math.floor(x)), room[c]) for c, x in exact.items()}
    order = sorted(counts, key=lambda c: (-(exact[c] - math.floor(exact[c])), rng.random()))
    left = target - sum(alloc.values())
    while left > 0:
        progressed = False
        for c in order:
            if left > 0 and alloc[c] < room[c]:
                alloc[c] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return alloc


def split_groups_stratified(groups: Sequence[str], classes: Sequence[int], val_fraction: float,
                            test_fraction: float, seed: int = 0) -> list[str]:
    """Seeded train/val/test split by group (subject), stratified by class; returns each item's split name.

    A group gets the most common class of its items (ties: the smaller class). ``round(test_fraction · G)`` test
    and ``round(val_fraction · G)`` val groups are spread over the classes by largest remainder (ties broken by
    the seed), never taking a class's last training group; within a class groups are drawn from a seeded
    permutation of their sorted ids, so the split depends only on the set of groups, not on item order.
    """
    vf, tf = check_fractions(val_fraction, test_fraction)
    by_group: dict[str, list[int]] = defaultdict(list)
    for g, c in zip(groups, classes):
        by_group[g].append(int(c))
    group_class = {g: sorted(Counter(cs).items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for g, cs in by_group.items()}
    by_class: dict[int, list[str]] = defaultdict(list)
    for g in sorted(by_group):
        by_class[group_class[g]].append(g)
    rng = np.random.default_rng(seed)
    perm = {c: [gs[i] for i in rng.permutation(len(gs))] for c, gs in sorted(by_class.items())}
    counts = {c: len(g) for c, g in perm.items()}
    room = {c: max(n - 1, 0) for c, n in counts.items()}  # keep >= 1 training group per class
    n_test = _allocate(counts, tf, room, rng)
    room = {c: room[c] - n_test[c] for c in counts}
    n_val = _allocate(counts, vf, room, rng)
    which: dict[str, str] = {}
    for c, gs in perm.items():
        for k, g in enumerate(gs):
            which[g] = "test" if k < n_test[c] else "val" if k < n_test[c] + n_val[c] else "train"
    return [which[g] for g in groups]


def split_patients_by_positive(subjects, val_fraction: float, test_fraction: float, seed: int):
    """Assign patients to train/val/test, stratified by whether they have any positive slice (RSNA).

    Args:
        subjects: a DataFrame, one row per slice, columns ``subject`` and ``any``.
    Returns:
        one row per subject: ``subject``, ``split``, ``n_slices``, ``n_positive``; deterministic for a given set of
        subjects and seed. Every split gets a subject of each stratum that has at least 3.
    """
    vf, tf = check_fractions(val_fraction, test_fraction)
    per = subjects.groupby("subject")["any"].agg(n_slices="size", n_positive="sum").reset_index()
    per = per.sort_values("subject").reset_index(drop=True)
    per["split"] = "train"
    for stratum, has_pos in enumerate((False, True)):
        idx = per.index[(per["n_positive"] > 0) == has_pos].to_numpy()
        idx = idx[np.random.default_rng([seed, stratum]).permutation(idx.size)]
        n_test = int(round(tf * idx.size))
        n_val = int(round(vf * idx.size))
        if idx.size >= 3:  # keep every split populated when the stratum allows it
            n_test = max(n_test, 1 if tf > 0 else 0)
            n_val = max(n_val, 1 if vf > 0 else 0)
        n_test, n_val = min(n_test, idx.size), min(n_val, max(idx.size - n_test, 0))
        per.loc[idx[:n_test], "split"] = "test"
        per.loc[idx[n_test : n_test + n_val], "split"] = "val"
    return per[["subject", "split", "n_slices", "n_positive"]]


def split_indices_by_class(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                           classes: Sequence[int] | None = None, stream: int = 0) -> dict[str, np.ndarray]:
    """Class-stratified split of items (no groups: each item its own subject), e.g. MNIST digits.

    Per class ``c`` (rng stream ``[seed, stream, c]``, so a class's split does not depend on the other classes):
    ``round(val_fraction · n_c)`` to val, ``round(test_fraction · n_c)`` to test, the rest to train; each split is
    then shuffled (stream ``[seed, stream, 100 + k]``). Returns ``{split: int64 indices}``.
    """
    vf, tf = check_fractions(val_fraction, test_fraction)
    labels = np.asarray(labels).reshape(-1)
    classes = sorted({int(c) for c in np.unique(labels)}) if classes is None else sorted({int(c) for c in classes})
    parts: dict[str, list[np.ndarray]] = {k: [] for k in SPLITS}
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            continue
        idx = np.random.default_rng([seed, stream, c]).permutation(idx)
        n_val, n_test = int(round(vf * idx.size)), int(round(tf * idx.size))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    out = {}
    for k, name in enumerate(SPLITS):
        idx = np.concatenate(parts[name]) if parts[name] else np.zeros(0, dtype=np.int64)
        out[name] = np.random.default_rng([seed, stream, 100 + k]).permutation(idx).astype(np.int64)
    return out
