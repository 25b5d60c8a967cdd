"""Synthetic ADNI brain MRI phantoms written as real NIfTI files in the ADNI task-dir layout, for demos and tests.

:func:`write_synthetic_adni` / :func:`generate_volume`: skull-stripped T1-like brains with class-dependent
atrophy (seed 004), described below; :func:`ensure_synthetic_adni` writes a task dir once and checks that an
existing one was written with the asked options (what a DataModule's ``prepare_data`` calls). The generic MR heads
of the HDF5 patch pipeline are in :mod:`meddiff.data.synthetic.mr_heads` (kept apart so each writer keeps writing
bit-identical files for a given seed, which stored demo caches and test expectations rely on).

ADNI phantoms
-------------

The five ADNI classes get an increasing atrophy *severity* ``s`` (per-subject jitter added, clipped to
``[0, 1.15]``):

==========  ==============  ===========
class       ``slice_label``  mean ``s``
==========  ==============  ===========
CN          1                0.00
EMCI        2                0.25
MCI         3                0.50
LMCI        4                0.75
AD          5                1.00
==========  ==============  ===========

Atrophy acts on the anatomy as (all sizes relative to the intracranial envelope):

* lateral ventricles (and the third ventricle) grow: radii ``x (1 + 0.75 s)``;
* the cortex thins: thickness ``x (1 - 0.45 s)``; sulci widen (more CSF cut into the cortex);
* the brain shrinks inside the intracranial envelope (more extra-cerebral CSF);
* hippocampi shrink (``x (1 - 0.35 s)``) while the temporal horns around them widen.

This is ``atrophy="global"`` (the default; its files stay bit-identical for a seed). Its tissue loss raises the CSF
share with severity, so the mean intensity of a volume alone separates AD from CN (AUROC 1.0 on the demo). With
``atrophy="matched"`` the mean intensity does not tell the classes apart: atrophy is local and of varied size
(``s`` = class mean x U(0.4, 1.4): ventricles x ``(1 + 0.5 s)`` on top of healthy size variation, temporal horns
x ``(1 + 0.5 s)``, hippocampi x ``(1 - 0.35 s)``), in a head whose every default slice keeps the mean tissue
intensity of the subject's healthy twin (the extra-cerebral CSF of the same slices gives back what the ventricles
take), the twin's CSF and grey-matter shares being drawn independently of the class; a monotone mid-tone curve
then sets the normalised mean intensity to a class-independent level (:data:`MATCHED`, :func:`_matched_anatomy`).
Head pose and size vary more (:data:`MATCHED_POSE`). What is left to see is where the tissue is.

Each subject also gets random head size, position, small yaw, boundary wobble, tissue intensities, global gain,
texture, Rician noise and (optionally) a smooth multiplicative bias field. Volumes are skull-stripped like
preprocessed ADNI data (background exactly 0), stored as int16 ``.nii.gz`` (white matter around 850) with an
**LAS** affine (radiological storage, as FSL writes it), so readers must reorient to canonical RAS to recover the
generator's array (``nibabel.as_closest_canonical`` does).

This module is numpy/scipy/nibabel only (no torch) so the CLI ``scripts/make_synthetic_adni.py`` starts fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.synthetic.fields import smooth_noise, yaw_matrix
from meddiff.errors import ConfigError, DataError
from meddiff.utils.io import atomic_write_text

__all__ = [
    "ATROPHY",
    "CLASS_DIRS",
    "CLASS_SEVERITY",
    "LABEL_NAMES",
    "MATCHED",
    "class_counts",
    "ensure_synthetic_adni",
    "generate_volume",
    "synthetic_options",
    "write_synthetic_adni",
]

#: sub-directory per ``slice_label`` (1..5), as in the seed's task dir layout
CLASS_DIRS: dict[int, str] = {1: "cn", 2: "emci", 3: "mci", 4: "lmci", 5: "ad"}
#: mean atrophy severity per ``slice_label``
CLASS_SEVERITY: dict[int, float] = {1: 0.0, 2: 0.25, 3: 0.5, 4: 0.75, 5: 1.0}
#: tissue label ids of ``generate_volume(..., return_labels=True)``
LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "csf",
    2: "grey_matter",
    3: "white_matter",
    4: "ventricle",
    5: "hippocampus",
}


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"shape={shape!r} must be three integers >= 16, e.g. (64, 64, 64)") from exc
    if len(out) != 3 or min(out) < 16:
        raise ConfigError(f"shape={tuple(shape)!r} must be three integers >= 16, e.g. (64, 64, 64)")
    return out  # type: ignore[return-value]


#: ``atrophy`` options of :func:`generate_volume` / :func:`write_synthetic_adni`
ATROPHY: dict[str, str] = {
    "global": "whole-brain tissue loss (brain shrinks, cortex thins, sulci widen, ventricles grow): the CSF share "
    "grows with severity, so the mean intensity alone separates AD from CN",
    "matched": "local atrophy of varied size (ventricles and temporal horns grow, hippocampi shrink) in a head whose "
    "every default slice keeps the mean tissue intensity of the subject's healthy twin (the extra-cerebral CSF of "
    "the same slices gives back what the ventricles take), so the mean intensity does not tell the classes apart",
}

#: parameters of ``atrophy="matched"`` (relative to the intracranial envelope; ``s`` = severity)
MATCHED: dict[str, tuple[float, float]] = {
    "severity_factor": (0.4, 1.4),  # s = class mean severity x U(a, b): subtle to marked within a class
    "csf_share": (0.17, 0.23),  # healthy twin: CSF share of the envelope (slice-weighted), U(a, b), any class
    "gm_share": (0.24, 0.30),  # healthy twin: grey matter share (cortex + hippocampi), U(a, b), any class
    "sulcus_width": (0.16, 0.30),  # sulcal CSF cut into the cortex, U(a, b), whatever the class
    "ventricle_sd": (0.0, 0.15),  # healthy ventricle size: exp(N(a, b)) ...
    "ventricle_growth": (0.5, 0.0),  # ... x (1 + a s)
    "horn_growth": (0.5, 0.0),  # temporal horns x (1 + a s)
    "hippocampus_loss": (0.35, 0.0),  # hippocampi x (1 - a s)
    "mean_level": (0.58, 0.62),  # normalised mean intensity of the slices, U(a, b), whatever the class
    "slice_band": (0.35, 0.75),  # where the default slices are taken (slice_range): what is matched
}
#: head pose and size variation of ``atrophy="matched"`` (``"global"``: 0.03, 0.08 rad, 5 %)
MATCHED_POSE: dict[str, float] = {"centre": 0.05, "yaw": 0.12, "size": 0.08}


def _check_atrophy(atrophy: str) -> str:
    if atrophy not in ATROPHY:
        raise ConfigError(f"atrophy={atrophy!r} must be one of {sorted(ATROPHY)}")
    return atrophy


def _slice_weight(shape: Sequence[int], band: tuple[float, float]) -> np.ndarray:
    """``float64 [X, Y, Z]``: how many slices of the band (fractions of each axis, the rule of
    :func:`meddiff.data.preprocess.mri_slices.slice_range`) pass through each voxel (0..3)."""
    weight = np.zeros(tuple(shape), dtype=np.float64)
    for a, n in enumerate(shape):
        axis_band = np.zeros(n)
        axis_band[_band_indices(n, band)] = 1.0
        weight += axis_band.reshape([-1 if k == a else 1 for k in range(3)])
    return weight


def _band_indices(n: int, band: tuple[float, float]) -> np.ndarray:
    """Indices ``[floor(lo n), floor(hi n))`` of an axis of ``n`` voxels (at least one), as ``slice_range``."""
    start = min(int(np.floor(band[0] * n + 1e-6)), n - 1)
    stop = max(min(int(np.floor(band[1] * n + 1e-6)), n), start + 1)
    return np.arange(start, stop)


def _matched_anatomy(
    rng: np.random.Generator,
    r: np.ndarray,
    ellipsoid: Callable[[Sequence[float], Sequence[float]], np.ndarray],
    s: float,
    n_max: int,
) -> np.ndarray:
    """Label map ``uint8 [X, Y, Z]`` of ``atrophy="matched"``: local atrophy of severity ``s`` in a head whose
    default slices keep the mean tissue intensity of the subject's healthy twin.

    1. The healthy twin (``s = 0``, same random head): its gap between brain and envelope (extra-cerebral CSF)
       and cortical thickness are set by nested bisection so that CSF and grey matter make up shares of the
       envelope drawn independently of the class (each voxel counted as often as the default slices show it).
    2. The subject: ventricles and temporal horns grow and hippocampi shrink with ``s``; the gap then varies per
       slab (a sum of one profile per axis, fitted slab by slab over the default slices, a few rounds) so that
       every default slice has its twin's mean nominal tissue intensity: the CSF the ventricles take is given
       back by the extra-cerebral CSF *of the same slices*. (A single global gap kept the volume's mean but left
       the slices through the ventricles darker and the others brighter, which a per-slice maximum picks up.)
    """
    m = MATCHED
    shape = r.shape
    envelope = r < 1.0
    folds = np.abs(smooth_noise(rng, shape, sigma=max(1.0, n_max / 20)))
    sulcus_width = float(rng.uniform(*m["sulcus_width"]))
    csf_target = float(rng.uniform(*m["csf_share"]))
    gm_target = float(rng.uniform(*m["gm_share"]))
    v_base = float(np.exp(rng.normal(*m["ventricle_sd"])))
    h_scale = float(np.exp(rng.normal(0.0, 0.08)))

    def structures(sev: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(temporal horns, hippocampi, ventricles) at severity ``sev``."""
        horns = np.zeros(shape, dtype=bool)
        hippo = np.zeros(shape, dtype=bool)
        for side in (-1.0, 1.0):
            c = (side * 0.33, -0.12, -0.28)
            horns |= ellipsoid(c, np.array([0.075, 0.18, 0.075]) * h_scale * (1.0 + m["horn_growth"][0] * sev))
            hippo |= ellipsoid(c, np.array([0.06, 0.16, 0.06]) * h_scale * (1.0 - m["hippocampus_loss"][0] * sev))
        vent = np.zeros(shape, dtype=bool)
        v_scale = v_base * (1.0 + m["ventricle_growth"][0] * sev)
        for side in (-1.0, 1.0):
            vent |= ellipsoid((side * 0.11 * (1.0 + 0.2 * sev), 0.02, 0.12), np.array([0.08, 0.27, 0.12]) * v_scale)
        vent |= ellipsoid((0.0, -0.02, 0.0), np.array([0.02 * (1.0 + 0.5 * sev), 0.10, 0.08]))
        return horns, hippo, vent

    def anatomy(gap: float | np.ndarray, thick: float, parts: tuple[np.ndarray, ...], sl: tuple = ()) -> np.ndarray:
        rr, horns, hippo, vent = r[sl], parts[0][sl], parts[1][sl], parts[2][sl]
        brain = rr < 1.0 - gap
        labels = np.zeros(rr.shape, dtype=np.uint8)
        labels[envelope[sl]] = 1  # extra-cerebral CSF
        labels[brain] = 3  # white matter
        labels[brain & (rr >= 1.0 - gap - thick)] = 2  # grey matter
        labels[brain & (rr >= 1.0 - gap - 1.15 * thick) & (folds[sl] < sulcus_width)] = 1  # sulci
        labels[horns & brain] = 4
        labels[hippo & brain] = 5
        labels[vent & brain] = 4
        return labels

    # 1. the healthy twin
    twin_parts = structures(0.0)
    weight = _slice_weight(shape, m["slice_band"]) * envelope
    w_env = max(float(weight.sum()), 1.0)

    def shares(labels: np.ndarray) -> tuple[float, float]:
        csf = float(weight[(labels == 1) | (labels == 4)].sum()) / w_env
        gm = float(weight[(labels == 2) | (labels == 5)].sum()) / w_env
        return csf, gm

    def gap_for(thick: float) -> float:  # the CSF share grows with the gap
        lo, hi = 0.0, 0.4
        for _ in range(14):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if shares(anatomy(mid, thick, twin_parts))[0] < csf_target else (lo, mid)
        return 0.5 * (lo + hi)

    lo, hi = 0.04, 0.30  # the grey matter share grows with the cortical thickness
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if shares(anatomy(gap_for(mid), mid, twin_parts))[1] < gm_target else (lo, mid)
    thick = 0.5 * (lo + hi)
    gap0 = gap_for(thick)
    twin = anatomy(gap0, thick, twin_parts)
    if s == 0.0:
        return twin

    # 2. the atrophic subject, slice by slice at the twin's mean nominal intensity
    lut = np.array([0.0, 0.12, 0.55, 0.85, 0.12, 0.55])
    parts = structures(s)
    band = [_band_indices(n, m["slice_band"]) for n in shape]  # the default slices of each axis
    profiles = [np.zeros(n) for n in shape]

    def slab(a: int, k: int) -> tuple:
        return tuple(k if j == a else slice(None) for j in range(3))

    def gap_field(skip: int | None = None) -> np.ndarray:
        g = np.full(shape, gap0)
        for a, prof in enumerate(profiles):
            if a != skip:
                g = g + prof.reshape([-1 if j == a else 1 for j in range(3)])
        return g

    for _ in range(3):
        for a in range(3):
            others = gap_field(skip=a)
            for k in band[a]:
                sl = slab(a, k)
                env = envelope[sl]
                if not env.any():
                    continue
                target = float(lut[twin[sl][env]].mean())
                lo_d, hi_d = -0.3, 0.3  # the slice darkens as its gap grows
                for _ in range(12):
                    mid = 0.5 * (lo_d + hi_d)
                    value = float(lut[anatomy(np.clip(others[sl] + mid, 0.0, 0.5), thick, parts, sl)][env].mean())
                    lo_d, hi_d = (mid, hi_d) if value > target else (lo_d, mid)
                profiles[a][k] = 0.5 * (lo_d + hi_d)
    return anatomy(np.clip(gap_field(), 0.0, 0.5), thick, parts)


def generate_volume(
    slice_label: int,
    shape: Sequence[int] = (64, 64, 64),
    rng: np.random.Generator | int | None = None,
    *,
    severity: float | None = None,
    bias_field: bool = True,
    noise_std: float = 0.02,
    return_labels: bool = False,
    atrophy: str = "global",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One skull-stripped T1-like phantom in RAS voxel order.

    Args:
        slice_label: ADNI class 1..5 (CN, EMCI, MCI, LMCI, AD); sets the mean atrophy severity.
        shape: ``(X, Y, Z)`` voxels (R-L, A-P, S-I axes), each >= 16. Voxels are isotropic; the head keeps its
            physical proportions when the shape is anisotropic.
        rng: numpy Generator or int seed (``None``: fresh entropy).
        severity: override the atrophy severity (0 = healthy, 1 = AD-like); default: class mean + N(0, 0.06).
        bias_field: multiply by a smooth bias field (about +-12 %).
        noise_std: Rician noise std relative to white matter intensity (~0.85 before gain).
        return_labels: also return the tissue label map (see :data:`LABEL_NAMES`).
        atrophy: ``"global"`` (default; the phantoms of the seed-004 demo, bit-identical for a seed) or
            ``"matched"`` (tissue composition matched across classes; see :data:`ATROPHY`).

    Returns:
        float32 ``[X, Y, Z]`` with background exactly 0 and brain in roughly ``(0, 1500)`` (white matter ~850);
        with ``return_labels`` a tuple ``(volume, labels uint8 [X, Y, Z])``.
    """
    if isinstance(slice_label, bool) or slice_label not in CLASS_SEVERITY:
        raise ConfigError(f"slice_label={slice_label!r} must be one of 1..5 (CN, EMCI, MCI, LMCI, AD)")
    if noise_std < 0:
        raise ConfigError(f"noise_std={noise_std} must be >= 0")
    X, Y, Z = _check_shape(shape)
    atrophy = _check_atrophy(atrophy)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if severity is not None:
        s = float(severity)
    elif atrophy == "matched":  # varied: an AD subject's severity anywhere in [0.4, 1.4]
        s = CLASS_SEVERITY[int(slice_label)] * float(rng.uniform(*MATCHED["severity_factor"]))
    else:
        s = float(np.clip(CLASS_SEVERITY[int(slice_label)] + rng.normal(0.0, 0.06), 0.0, 1.15))

    n_max = max(X, Y, Z)
    axes = [(np.arange(n) - (n - 1) / 2.0) / (n_max / 2.0) for n in (X, Y, Z)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # [X, Y, Z, 3], physical-ish units
    # head pose and size (matched: wider, so that pixel-wise comparison with other heads is harder)
    pose = MATCHED_POSE if atrophy == "matched" else {"centre": 0.03, "yaw": 0.08, "size": 0.05}
    centre = rng.uniform(-pose["centre"], pose["centre"], size=3)
    yaw = rng.uniform(-pose["yaw"], pose["yaw"])
    rot = yaw_matrix(yaw)
    p = (g - centre) @ rot.T  # subject coordinates: x right, y anterior, z superior

    def ellipsoid(c: Sequence[float], r: Sequence[float]) -> np.ndarray:
        return (((p - np.asarray(c)) / np.asarray(r)) ** 2).sum(-1) < 1.0

    radii = np.array([0.70, 0.86, 0.72]) * rng.uniform(1.0 - pose["size"], 1.0 + pose["size"], size=3)
    wobble = 0.025 * smooth_noise(rng, (X, Y, Z), sigma=max(2.0, n_max / 8))
    r = np.sqrt(((p / radii) ** 2).sum(-1)) + wobble  # 1 at the intracranial surface

    if atrophy == "matched":
        labels = _matched_anatomy(rng, r, ellipsoid, s, n_max)
        level = float(rng.uniform(*MATCHED["mean_level"]))
        return _render(rng, labels, r < 1.0, bias_field, noise_std, n_max, return_labels, level)

    shrink = 0.04 + 0.08 * s
    thick = 0.14 * (1.0 - 0.45 * s) * rng.uniform(0.92, 1.08)
    envelope = r < 1.0
    brain = r < 1.0 - shrink
    cortex = brain & (r >= 1.0 - shrink - thick)

    labels = np.zeros((X, Y, Z), dtype=np.uint8)
    labels[envelope] = 1  # extra-cerebral CSF
    labels[brain] = 3  # white matter
    labels[cortex] = 2  # grey matter
    folds = smooth_noise(rng, (X, Y, Z), sigma=max(1.0, n_max / 20))
    sulcus_width = 0.18 + 0.32 * s
    sulci = brain & (r >= 1.0 - shrink - 1.15 * thick) & (np.abs(folds) < sulcus_width)
    labels[sulci] = 1

    # temporal horns (CSF) with the hippocampi (grey matter) inside: horns widen, hippocampi shrink
    for side in (-1.0, 1.0):
        c = (side * 0.33, -0.12, -0.28)
        labels[ellipsoid(c, np.array([0.075, 0.18, 0.075]) * (1.0 + 0.5 * s)) & brain] = 4
        labels[ellipsoid(c, np.array([0.06, 0.16, 0.06]) * (1.0 - 0.35 * s)) & brain] = 5
    # lateral ventricles + third ventricle
    v_scale = (1.0 + 0.75 * s) * rng.uniform(0.88, 1.12)
    vent = np.zeros_like(brain)
    for side in (-1.0, 1.0):
        vent |= ellipsoid((side * 0.11 * (1.0 + 0.3 * s), 0.02, 0.12), np.array([0.07, 0.26, 0.11]) * v_scale)
    vent |= ellipsoid((0.0, -0.02, 0.0), np.array([0.02 * (1.0 + s), 0.10, 0.08]))
    labels[vent & brain] = 4
    return _render(rng, labels, envelope, bias_field, noise_std, n_max, return_labels)


def _render(
    rng: np.random.Generator,
    labels: np.ndarray,
    envelope: np.ndarray,
    bias_field: bool,
    noise_std: float,
    n_max: int,
    return_labels: bool,
    mean_level: float | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Intensities of a label map: T1 tissue contrast with per-subject jitter, texture, partial volume, bias
    field, Rician noise, skull stripping (background 0) and scanner gain; float32 ``[X, Y, Z]``.

    ``mean_level`` (``atrophy="matched"``): afterwards a power curve between the foreground's 1st and 99th
    percentiles (which it keeps, so the loaders' robust normalisation maps them to -1 and +1 as before) sets the
    slice-weighted mean of the normalised intensities to this level in ``(0, 1)`` (0 = 1st, 1 = 99th percentile).
    """
    from scipy.ndimage import gaussian_filter

    X, Y, Z = labels.shape
    # intensities (T1: WM bright, GM mid, CSF dark)
    csf, gm, wm = 0.12 + rng.normal(0, 0.015), 0.55 + rng.normal(0, 0.03), 0.85 + rng.normal(0, 0.03)
    lut = np.array([0.0, csf, gm, wm, csf, gm], dtype=np.float64)
    vol = lut[labels]
    vol *= 1.0 + 0.03 * smooth_noise(rng, (X, Y, Z), sigma=1.5)  # tissue texture
    vol = gaussian_filter(vol, sigma=0.6)  # partial volume
    if bias_field:
        vol *= np.exp(0.12 * smooth_noise(rng, (X, Y, Z), sigma=max(3.0, n_max / 3)))
    if noise_std > 0:
        n1, n2 = rng.standard_normal((2, X, Y, Z))
        vol = np.sqrt((vol + noise_std * n1) ** 2 + (noise_std * n2) ** 2)  # Rician magnitude
    vol = np.where(envelope, vol, 0.0) * 1000.0 * rng.uniform(0.85, 1.15)  # skull-stripped, scanner gain
    if mean_level is not None:
        vol = _set_mean_level(vol, envelope, mean_level)
    vol = vol.astype(np.float32)
    return (vol, labels) if return_labels else vol


def _set_mean_level(vol: np.ndarray, envelope: np.ndarray, level: float) -> np.ndarray:
    """``vol`` with ``u = (v - p1) / (p99 - p1)`` (foreground percentiles) replaced by ``u ** g`` inside
    ``[p1, p99]``, ``g`` chosen by bisection so the mean of ``clip(u, 0, 1) ** g`` over the default slices
    (:func:`_slice_weight`) is ``level``. Monotone, and ``p1``, ``p99`` stay put (up to the percentile interpolation
    between neighbouring voxels, < 0.5 % of the range), so the rank order and the normalisation range of the volume
    are kept; only the mid-tones move."""
    fg = envelope & (vol > 0)
    p1, p99 = np.percentile(vol[fg], [1.0, 99.0])
    if not p99 > p1:
        return vol
    weight = _slice_weight(vol.shape, MATCHED["slice_band"])[fg]
    u = np.clip((vol[fg] - p1) / (p99 - p1), 0.0, 1.0)
    lo, hi = -3.0, 3.0  # log2 of the power; the mean falls as the power grows
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float((weight * u ** (2.0**mid)).sum() / weight.sum()) > level else (lo, mid)
    g = 2.0 ** (0.5 * (lo + hi))
    out = vol.copy()
    inside = fg & (vol > p1) & (vol < p99)
    out[inside] = p1 + (p99 - p1) * ((vol[inside] - p1) / (p99 - p1)) ** g
    return out


def class_counts(n_per_class: int | Sequence[int] | Mapping[Any, int]) -> dict[int, int]:
    """``{slice_label: volumes}`` from one count for every class or five counts (CN, EMCI, MCI, LMCI, AD).

    A mapping may name classes by slice label (1..5) or directory name (``cn`` .. ``ad``). Counts are integers
    >= 0 with at least one volume in total; anything else is a :class:`ConfigError`.
    """
    what = (
        f"n_per_class={n_per_class!r} must be an integer >= 1 or five integers >= 0 (CN, EMCI, MCI, LMCI, AD), "
        "e.g. [40, 5, 5, 5, 40]"
    )
    if isinstance(n_per_class, Mapping):
        by_name = {v: k for k, v in CLASS_DIRS.items()}
        raw = {}
        for k, v in n_per_class.items():
            key = by_name.get(str(k).lower(), k)
            if key not in CLASS_DIRS:
                raise ConfigError(f"{what}; unknown class {k!r}")
            raw[int(key)] = v
        values = [raw.get(label, 0) for label in CLASS_DIRS]
    elif isinstance(n_per_class, (int, np.integer)) and not isinstance(n_per_class, bool):
        if n_per_class < 1:
            raise ConfigError(what)
        values = [n_per_class] * len(CLASS_DIRS)
    elif isinstance(n_per_class, Sequence) and not isinstance(n_per_class, str):
        values = list(n_per_class)
    else:
        raise ConfigError(what)
    if len(values) != len(CLASS_DIRS) or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in values
    ) or sum(values) < 1:
        raise ConfigError(what)
    return {label: int(v) for label, v in zip(CLASS_DIRS, values)}


def synthetic_options(
    n_per_class: int | Sequence[int] | Mapping[Any, int] = 4,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    *,
    bias_field: bool = True,
    noise_std: float = 0.02,
    atrophy: str = "global",
) -> dict[str, Any]:
    """The generator options of :func:`write_synthetic_adni`, checked and in the JSON form it records in the task
    dir (``synthetic.json``), so a reader can tell whether an existing task dir was written with them."""
    options: dict[str, Any] = {
        "generator": "meddiff.data.synthetic.mri.write_synthetic_adni",
        "n_per_class": list(class_counts(n_per_class).values()),
        "shape": list(_check_shape(shape)),
        "seed": int(seed),
        "atrophy": _check_atrophy(atrophy),
        "bias_field": bool(bias_field),
        "noise_std": float(noise_std),
    }
    if atrophy == "matched":  # its parameters may still be tuned: a task dir written with others is stale
        options["matched"] = {k: list(v) for k, v in MATCHED.items()} | {"pose": dict(MATCHED_POSE)}
    return options


def write_synthetic_adni(
    root: str | os.PathLike[str],
    n_per_class: int | Sequence[int] | Mapping[Any, int] = 4,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    *,
    task: str = "2d_cfg_anom_det",
    bias_field: bool = True,
    noise_std: float = 0.02,
    atrophy: str = "global",
    overwrite: bool = False,
) -> Path:
    """Write a synthetic ADNI task dir in the seed's layout and return it.

    Layout (``<root>/<task>/``)::

        dataset.json                 [{"image": "cn/cn0.nii.gz", "slice_label": 1}, ...]
        synthetic.json               the generator options (:func:`synthetic_options`)
        cn/cn0.nii.gz ... emci/ mci/ lmci/ ad/

    Volume ``i`` of class ``c`` is drawn from ``np.random.default_rng([seed, c, i])``, so the same ``seed``
    writes the same voxels whatever ``n_per_class``. ``dataset.json`` is written last (atomically): its presence
    means the task dir is complete. Volumes are int16, voxel size ``180 / max(shape)`` mm, LAS affine.

    Args:
        root: dataset dir (the seed's ``--datasetDir``).
        n_per_class: volumes per class (>= 1), or five counts >= 0 for CN, EMCI, MCI, LMCI, AD (a class with 0
            volumes gets no directory); see :func:`class_counts`.
        shape: ``(X, Y, Z)`` voxels per volume (each >= 16; 64³ is CPU-friendly, 128³ matches the seed).
        seed: RNG seed.
        task: task sub-directory name.
        bias_field, noise_std, atrophy: see :func:`generate_volume` (``atrophy``: :data:`ATROPHY`).
        overwrite: replace an existing ``dataset.json`` (otherwise that is a :class:`ConfigError`).
    """
    import nibabel as nib

    options = synthetic_options(n_per_class, shape, seed, bias_field=bias_field, noise_std=noise_std,
                                atrophy=atrophy)
    counts = class_counts(n_per_class)
    shp = _check_shape(shape)
    task_dir = Path(root) / task
    json_path = task_dir / "dataset.json"
    if json_path.exists() and not overwrite:
        raise ConfigError(
            f"{json_path} already exists; pass overwrite=True (--overwrite) or choose another root"
        )
    vs = 180.0 / max(shp)
    affine = np.diag([-vs, vs, vs, 1.0])  # LAS storage: voxel axis 0 runs right -> left
    affine[:3, 3] = [(shp[0] - 1) * vs / 2.0, -(shp[1] - 1) * vs / 2.0, -(shp[2] - 1) * vs / 2.0]
    entries: list[dict[str, object]] = []
    for label, cdir in CLASS_DIRS.items():
        if counts[label]:
            (task_dir / cdir).mkdir(parents=True, exist_ok=True)
        for i in range(counts[label]):
            vol = generate_volume(
                label,
                shp,
                np.random.default_rng([seed, label, i]),
                bias_field=bias_field,
                noise_std=noise_std,
                atrophy=atrophy,
            )
            data = np.clip(np.rint(vol[::-1]), 0, np.iinfo(np.int16).max).astype(np.int16)  # RAS -> LAS
            img = nib.Nifti1Image(data, affine)
            img.header.set_xyzt_units("mm")
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            rel = f"{cdir}/{cdir}{i}.nii.gz"
            nib.save(img, str(task_dir / rel))
            entries.append({"image": rel, "slice_label": label})
    atomic_write_text(task_dir / "synthetic.json", json.dumps(options, indent=1) + "\n")
    text = "[" + ",\n ".join(json.dumps(e) for e in entries) + "\n]\n"
    atomic_write_text(json_path, text)
    return task_dir


def ensure_synthetic_adni(
    root: str | os.PathLike[str],
    task: str,
    n_per_class: int | Sequence[int] | Mapping[Any, int] = 4,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    atrophy: str = "global",
) -> Path:
    """The synthetic task dir ``<root>/<task>``: written by :func:`write_synthetic_adni` when it has no
    ``dataset.json``, otherwise checked against its ``synthetic.json`` (task dirs written before that file existed
    are not checked).

    Raises:
        ConfigError: the existing task dir was written with other options (it would be reused silently otherwise).
        DataError: its ``synthetic.json`` is unreadable.
    """
    task_dir = Path(root) / task
    if not (task_dir / "dataset.json").is_file():
        return write_synthetic_adni(root, n_per_class, shape, seed, task=task, atrophy=atrophy)
    record = task_dir / "synthetic.json"
    if not record.is_file():
        return task_dir
    try:
        written = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{str(record)!r} is unreadable ({exc}); delete {str(task_dir)!r} to regenerate it") from exc
    wanted = synthetic_options(n_per_class, shape, seed, atrophy=atrophy)
    diff = {k: (written.get(k), v) for k, v in wanted.items() if k != "generator" and written.get(k) != v}
    if diff:
        listing = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
        raise ConfigError(
            f"the synthetic task dir {str(task_dir)!r} was written with other options ({listing}); "
            "choose another data.task for these options or delete the dir to regenerate it"
        )
    return task_dir
