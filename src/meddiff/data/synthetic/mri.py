"""Synthetic brain MRI phantoms written as real NIfTI files, for demos and tests.

Two writers share one smooth-noise generator (:func:`smooth_noise`) and one head rotation (:func:`yaw_matrix`):

* :func:`write_synthetic_volumes`: generic MR-like heads (scalp, CSF, cortex, white matter, ventricles, bias
  field) as ``<dir>/<prefix>_<i:03d>.nii.gz`` float32, RAS affine; input of the HDF5 patch pipeline.
* :func:`write_synthetic_adni` / :func:`generate_volume`: skull-stripped T1-like brains with class-dependent
  atrophy in the ADNI task-dir layout (seed 004), described below.

The two anatomies are kept apart (not one parametrised family) so each keeps writing bit-identical files for a
given seed, which stored demo caches and test expectations rely on.

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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meddiff.errors import ConfigError
from meddiff.utils.io import atomic_write_text

__all__ = [
    "CLASS_DIRS",
    "CLASS_SEVERITY",
    "LABEL_NAMES",
    "generate_volume",
    "smooth_noise",
    "write_synthetic_adni",
    "write_synthetic_volumes",
    "yaw_matrix",
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


def smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], sigma: float, mode: str = "reflect"
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field of ``shape`` smoothed with ``sigma`` voxels (float64).

    ``mode`` is the boundary rule of ``scipy.ndimage.gaussian_filter`` (``"reflect"`` for the ADNI phantoms,
    ``"wrap"`` for the generic heads; each writer keeps its own so its files stay identical for a seed).
    """
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(tuple(int(s) for s in shape)), sigma=sigma, mode=mode)
    return (f - f.mean()) / (f.std() + 1e-12)


def yaw_matrix(angle: float) -> np.ndarray:
    """``[3, 3]`` rotation by ``angle`` radians about the z (inferior-superior) axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"shape={shape!r} must be three integers >= 16, e.g. (64, 64, 64)") from exc
    if len(out) != 3 or min(out) < 16:
        raise ConfigError(f"shape={tuple(shape)!r} must be three integers >= 16, e.g. (64, 64, 64)")
    return out  # type: ignore[return-value]


def generate_volume(
    slice_label: int,
    shape: Sequence[int] = (64, 64, 64),
    rng: np.random.Generator | int | None = None,
    *,
    severity: float | None = None,
    bias_field: bool = True,
    noise_std: float = 0.02,
    return_labels: bool = False,
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

    Returns:
        float32 ``[X, Y, Z]`` with background exactly 0 and brain in roughly ``(0, 1500)`` (white matter ~850);
        with ``return_labels`` a tuple ``(volume, labels uint8 [X, Y, Z])``.
    """
    from scipy.ndimage import gaussian_filter

    if isinstance(slice_label, bool) or slice_label not in CLASS_SEVERITY:
        raise ConfigError(f"slice_label={slice_label!r} must be one of 1..5 (CN, EMCI, MCI, LMCI, AD)")
    if noise_std < 0:
        raise ConfigError(f"noise_std={noise_std} must be >= 0")
    X, Y, Z = _check_shape(shape)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if severity is None:
        s = float(np.clip(CLASS_SEVERITY[int(slice_label)] + rng.normal(0.0, 0.06), 0.0, 1.15))
    else:
        s = float(severity)

    n_max = max(X, Y, Z)
    axes = [(np.arange(n) - (n - 1) / 2.0) / (n_max / 2.0) for n in (X, Y, Z)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # [X, Y, Z, 3], physical-ish units
    centre = rng.uniform(-0.03, 0.03, size=3)
    yaw = rng.uniform(-0.08, 0.08)
    rot = yaw_matrix(yaw)
    p = (g - centre) @ rot.T  # subject coordinates: x right, y anterior, z superior

    def ellipsoid(c: Sequence[float], r: Sequence[float]) -> np.ndarray:
        return (((p - np.asarray(c)) / np.asarray(r)) ** 2).sum(-1) < 1.0

    radii = np.array([0.70, 0.86, 0.72]) * rng.uniform(0.95, 1.05, size=3)
    wobble = 0.025 * smooth_noise(rng, (X, Y, Z), sigma=max(2.0, n_max / 8))
    r = np.sqrt(((p / radii) ** 2).sum(-1)) + wobble  # 1 at the intracranial surface

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
    vol = vol.astype(np.float32)
    return (vol, labels) if return_labels else vol


def write_synthetic_adni(
    root: str | os.PathLike[str],
    n_per_class: int = 4,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    *,
    task: str = "2d_cfg_anom_det",
    bias_field: bool = True,
    noise_std: float = 0.02,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic ADNI task dir in the seed's layout and return it.

    Layout (``<root>/<task>/``)::

        dataset.json                 [{"image": "cn/cn0.nii.gz", "slice_label": 1}, ...]
        cn/cn0.nii.gz ... emci/ mci/ lmci/ ad/

    Volume ``i`` of class ``c`` is drawn from ``np.random.default_rng([seed, c, i])``, so the same ``seed``
    writes the same voxels whatever ``n_per_class``. ``dataset.json`` is written last (atomically): its presence
    means the task dir is complete. Volumes are int16, voxel size ``180 / max(shape)`` mm, LAS affine.

    Args:
        root: dataset dir (the seed's ``--datasetDir``).
        n_per_class: volumes per class (>= 1).
        shape: ``(X, Y, Z)`` voxels per volume (each >= 16; 64³ is CPU-friendly, 128³ matches the seed).
        seed: RNG seed.
        task: task sub-directory name.
        bias_field, noise_std: see :func:`generate_volume`.
        overwrite: replace an existing ``dataset.json`` (otherwise that is a :class:`ConfigError`).
    """
    import nibabel as nib

    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 1:
        raise ConfigError(f"n_per_class={n_per_class!r} must be an integer >= 1")
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
        (task_dir / cdir).mkdir(parents=True, exist_ok=True)
        for i in range(int(n_per_class)):
            vol = generate_volume(
                label,
                shp,
                np.random.default_rng([seed, label, i]),
                bias_field=bias_field,
                noise_std=noise_std,
            )
            data = np.clip(np.rint(vol[::-1]), 0, np.iinfo(np.int16).max).astype(np.int16)  # RAS -> LAS
            img = nib.Nifti1Image(data, affine)
            img.header.set_xyzt_units("mm")
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            rel = f"{cdir}/{cdir}{i}.nii.gz"
            nib.save(img, str(task_dir / rel))
            entries.append({"image": rel, "slice_label": label})
    text = "[" + ",\n ".join(json.dumps(e) for e in entries) + "\n]\n"
    atomic_write_text(json_path, text)
    return task_dir


# ------------------------------------------------------------------------------ generic MR heads
def write_synthetic_volumes(
    directory: str | Path,
    n: int = 4,
    shape: tuple[int, int, int] = (96, 96, 32),
    seed: int = 0,
    prefix: str = "phantom",
    voxel_size: float = 2.0,
) -> list[Path]:
    """Write ``n`` brain-like MR phantoms as ``<directory>/<prefix>_<i:03d>.nii.gz`` (for demos and tests).

    Each phantom is an ellipsoid head: a bright scalp/skull shell, CSF, grey matter cortex, white matter core,
    two ventricles, with a smooth multiplicative bias field and low-frequency tissue texture. Size, position
    and rotation vary per volume. Intensities are MR-like (background 0, white matter ≈ 700) stored as float32
    with a RAS affine of ``voxel_size`` mm.

    Args:
        directory: output folder (created).
        n: number of volumes (>= 1).
        shape: ``(X, Y, Z)`` voxels, each >= 4.
        seed: RNG seed; the same seed writes identical files.

    Returns:
        The written paths, sorted.
    """
    import nibabel as nib

    if n < 1:
        raise ConfigError(f"n={n} must be >= 1")
    if len(shape) != 3 or min(shape) < 4:
        raise ConfigError(f"shape={tuple(shape)} must be three sizes >= 4")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    X, Y, Z = (int(s) for s in shape)
    grid = np.stack(
        np.meshgrid(
            np.linspace(-1, 1, X, dtype=np.float64),
            np.linspace(-1, 1, Y, dtype=np.float64),
            np.linspace(-1, 1, Z, dtype=np.float64),
            indexing="ij",
        ),
        axis=-1,
    )  # [X, Y, Z, 3]
    paths: list[Path] = []
    for i in range(n):
        radii = np.array([0.78, 0.9, 1.1]) * rng.uniform(0.9, 1.05, size=3)
        centre = rng.uniform(-0.05, 0.05, size=3) * np.array([1, 1, 0.3])
        ang = rng.uniform(-0.2, 0.2)
        rot = yaw_matrix(ang)
        p = (grid - centre) @ rot.T
        r = np.sqrt(((p / radii) ** 2).sum(-1))  # 1 at the scalp surface
        # ventricles: two small ellipsoids left/right of the midline
        v_off = rng.uniform(0.1, 0.16)
        v_rad = np.array([0.08, 0.28, 0.25]) * rng.uniform(0.8, 1.3)
        vent = np.zeros(r.shape, dtype=bool)
        for side in (-1.0, 1.0):
            q = (p - np.array([side * v_off, 0.02, 0.0])) / v_rad
            vent |= (q**2).sum(-1) < 1.0
        tex = smooth_noise(rng, shape, sigma=max(1.0, min(shape) / 24), mode="wrap")
        wobble = 0.03 * smooth_noise(rng, shape, sigma=max(2.0, min(shape) / 6), mode="wrap")
        rr = r + wobble  # irregular cortex boundary
        vol = np.zeros(shape, dtype=np.float64)
        vol[rr < 1.0] = 900.0  # scalp / skull
        vol[rr < 0.92] = 60.0  # CSF / skull gap
        vol[rr < 0.88] = 450.0 + 25.0 * tex[rr < 0.88]  # grey matter
        vol[rr < 0.7] = 700.0 + 20.0 * tex[rr < 0.7]  # white matter
        vol[vent & (rr < 0.7)] = 80.0  # ventricles (CSF)
        bias = 1.0 + 0.08 * smooth_noise(rng, shape, sigma=max(3.0, min(shape) / 3), mode="wrap")
        vol = np.clip(vol * bias, 0.0, None).astype(np.float32)
        affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
        affine[:3, 3] = -np.array(shape) * voxel_size / 2
        out = directory / f"{prefix}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), str(out))
        paths.append(out)
    return sorted(paths)
