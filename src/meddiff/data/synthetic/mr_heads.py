"""Generic MR-like head phantoms written as NIfTI files (the input of the NIfTI -> HDF5 patch pipeline).

Kept apart from the ADNI phantoms (:mod:`.mri`) so each keeps writing bit-identical files for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddiff.data.synthetic.fields import smooth_noise, yaw_matrix
from meddiff.errors import ConfigError

__all__ = ["write_synthetic_volumes"]


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
