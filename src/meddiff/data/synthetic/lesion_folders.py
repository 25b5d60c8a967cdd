"""Synthetic anomaly image folders from the project's MRI phantoms, in the Brainomaly or BMAD layout.

Every subject is a healthy T1-like phantom (``generate_volume``: random anatomy, tissue contrast, bias field and
Rician noise) of which ``slices_per_subject`` axial slices around the centre are written as 8-bit PNGs
``<subject>__<zzz>.png``. A *diseased* subject gets one lesion: an ellipsoid of random size (radii 4-12 % of the
field of view), position (inside the brain) and kind — hyperintense (x1.3-1.6 of the local tissue) or hypointense
(x0.3-0.6), half each, with soft edges — so that neither brightness nor size alone separates the classes; only
slices that cut the lesion (>= ``min_lesion_px`` pixels) are written, so a diseased subject's slices all show it.
Masks are the lesion voxels of the slice (0 / 255 PNGs with the image's file name): BMAD ``<split>/Ungood/anomaly_mask``;
Brainomaly ``val/anomaly_mask`` and ``test/anomaly_mask`` for the labelled diseased images (BMAD-like, beside the image
folders; ``ImageFolderAnomalyDataModule`` reads them) — never for the unannotated mixed set, whose labels a mask
folder would reveal.

Subjects per group (disjoint, so no subject spans two splits): known-healthy, the unannotated mixed set
(diseased + healthy), a labelled validation set and a labelled test set. Layouts
(``meddiff.data.formats.folder_layout``):

- ``brainomaly``: ``train/neg``, ``train/pos``, ``train/neg_mixed``, ``val/pos``, ``val/neg``, ``test/pos``, ``test/neg``;
- ``bmad``: ``train/good``, ``valid/good``, ``valid/Ungood/{img,anomaly_mask}``, ``test/good``,
  ``test/Ungood/{img,anomaly_mask}`` (the mixed-set subjects go to ``valid/``, BMAD's unannotated pool).

Subject ``k`` of group ``g`` is drawn from ``default_rng([seed, g, k])``. ``.meddiff_synthetic.json`` is written last
(atomically): its presence means the folder is complete; a folder written with other settings is an error unless
``overwrite``; one written by an older version of this writer with the same settings is completed in place (the
images are the same; newer versions add files, e.g. the Brainomaly masks of version 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.synthetic.mri import generate_volume
from meddiff.errors import ConfigError
from meddiff.utils.io import atomic_write, atomic_write_text

MARKER = ".meddiff_synthetic.json"
_GROUPS = {"known_healthy": 0, "mixed_pos": 1, "mixed_neg": 2, "val_pos": 3, "val_neg": 4, "test_pos": 5,
           "test_neg": 6}
_FOLDERS = {
    "brainomaly": {"known_healthy": "train/neg", "mixed_pos": "train/pos", "mixed_neg": "train/neg_mixed",
                   "val_pos": "val/pos", "val_neg": "val/neg", "test_pos": "test/pos", "test_neg": "test/neg"},
    "bmad": {"known_healthy": "train/good", "mixed_pos": "valid/Ungood/img", "mixed_neg": "valid/good",
             "val_pos": "valid/Ungood/img", "val_neg": "valid/good", "test_pos": "test/Ungood/img",
             "test_neg": "test/good"},
}
#: where each layout writes the lesion masks of a diseased group (relative to root); absent = no masks
_MASK_FOLDERS = {
    "brainomaly": {"val_pos": "val/anomaly_mask", "test_pos": "test/anomaly_mask"},
    "bmad": {"mixed_pos": "valid/Ungood/anomaly_mask", "val_pos": "valid/Ungood/anomaly_mask",
             "test_pos": "test/Ungood/anomaly_mask"},
}
#: the writer's version: 2 adds the Brainomaly masks (the images are those of version 1)
VERSION = 2


def _lesion(rng: np.random.Generator, labels: np.ndarray, z_lo: int, z_hi: int) -> tuple[np.ndarray, float]:
    """A soft ellipsoid weight map ``[X, Y, Z]`` in [0, 1] inside the brain, and its intensity factor."""
    from scipy.ndimage import gaussian_filter

    X, Y, Z = labels.shape
    brain = np.isin(labels, (2, 3, 5))  # grey / white matter, hippocampus
    n = max(X, Y)
    for _ in range(100):
        radii = rng.uniform(0.04, 0.12, size=3) * n
        radii[2] = min(radii[2], max(2.0, (z_hi - z_lo) / 2))
        cz = rng.uniform(z_lo + 1, z_hi - 1)
        cands = np.argwhere(brain[:, :, int(round(cz))])
        if len(cands) == 0:
            continue
        cx, cy = cands[rng.integers(len(cands))] + rng.uniform(-0.5, 0.5, size=2)
        g = np.stack(np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij"), -1).astype(np.float64)
        d = (((g - np.array([cx, cy, cz])) / radii) ** 2).sum(-1)
        w = gaussian_filter((d < 1.0).astype(np.float64), 0.7) * brain
        if (w > 0.5).sum() >= 8:
            factor = rng.uniform(1.3, 1.6) if rng.random() < 0.5 else rng.uniform(0.3, 0.6)
            return np.clip(w, 0.0, 1.0), float(factor)
    raise RuntimeError("could not place a lesion inside the phantom brain")  # pragma: no cover


def _subject(group: str, k: int, seed: int, size: int, n_slices: int, min_lesion_px: int
             ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``[(z, uint8 slice [size, size], bool mask [size, size])]`` of one subject."""
    rng = np.random.default_rng([seed, _GROUPS[group], k])
    depth = max(2 * n_slices, 16)  # the phantom generator needs >= 16 voxels per axis
    vol, labels = generate_volume(1, (size, size, depth), rng, severity=float(np.clip(rng.normal(0.0, 0.08), 0, 0.3)),
                                  return_labels=True)
    brain = labels > 0
    ref = float(np.percentile(vol[brain], 99.0)) if brain.any() else 1.0
    mask = np.zeros_like(brain)
    if group.endswith("_pos"):
        w, factor = _lesion(rng, labels, 1, depth - 1)
        vol = vol * (1.0 + (factor - 1.0) * w)
        mask = w > 0.5
    img = np.clip(vol / ref * 220.0, 0, 255).round().astype(np.uint8)
    zs = list(range(0, depth, max(1, depth // n_slices)))[:n_slices]
    if group.endswith("_pos"):
        zs = [z for z in range(depth) if mask[:, :, z].sum() >= min_lesion_px]
        if len(zs) > n_slices:
            zs = [zs[i] for i in np.linspace(0, len(zs) - 1, n_slices).round().astype(int)]
    return [(z, img[:, :, z], mask[:, :, z]) for z in zs]


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def write_synthetic_image_folder(
    root: str | Path,
    layout: str = "brainomaly",
    image_size: int = 64,
    n_known_healthy: int = 24,
    n_mixed: tuple[int, int] | list[int] = (12, 12),
    n_val: tuple[int, int] | list[int] = (4, 4),
    n_test: tuple[int, int] | list[int] = (8, 8),
    slices_per_subject: int = 8,
    min_lesion_px: int = 6,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the phantom set into ``root`` (see the module docstring) unless it is already there; returns ``root``.

    ``n_mixed``, ``n_val``, ``n_test`` are ``(diseased, healthy)`` subject counts; ``n_val = (0, 0)`` writes no
    validation set.
    """
    if layout not in _FOLDERS:
        raise ConfigError(f"synthetic layout={layout!r} is unknown; choose one of {sorted(_FOLDERS)}.")
    counts = {"known_healthy": int(n_known_healthy), "mixed_pos": int(n_mixed[0]), "mixed_neg": int(n_mixed[1]),
              "val_pos": int(n_val[0]), "val_neg": int(n_val[1]), "test_pos": int(n_test[0]),
              "test_neg": int(n_test[1])}
    if counts["known_healthy"] < 2 or counts["mixed_pos"] < 1 or counts["test_pos"] < 1 or counts["test_neg"] < 1:
        raise ConfigError(f"synthetic image folder counts {counts} need >= 2 known-healthy subjects and >= 1 diseased "
                          "mixed, diseased test and healthy test subject.")
    if int(image_size) < 16 or int(slices_per_subject) < 1:
        raise ConfigError(f"image_size={image_size} must be >= 16 and slices_per_subject={slices_per_subject} >= 1.")
    root = Path(root).expanduser()
    settings: dict[str, Any] = {"layout": layout, "image_size": int(image_size), "counts": counts,
                                "slices_per_subject": int(slices_per_subject), "min_lesion_px": int(min_lesion_px),
                                "seed": int(seed), "version": VERSION}
    marker = root / MARKER
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old == settings:
            return root
        older = {**old, "version": VERSION} == settings and int(old.get("version", 0)) < VERSION
        if not (overwrite or older):
            raise ConfigError(f"{root} holds a synthetic set written with other settings ({marker}); choose another "
                              "data.root or pass overwrite=True.")
    if overwrite and root.exists():
        for sub in ("train", "val", "valid", "test"):
            shutil.rmtree(root / sub, ignore_errors=True)
        marker.unlink(missing_ok=True)
    folders, mask_folders = _FOLDERS[layout], _MASK_FOLDERS[layout]
    for group, n in counts.items():
        for k in range(n):
            subject = f"{group.split('_')[0]}{'p' if group.endswith('_pos') else 'h'}{k:03d}"
            for z, img, mask in _subject(group, k, int(seed), int(image_size), int(slices_per_subject),
                                         int(min_lesion_px)):
                name = f"{subject}__{z:03d}.png"
                _write_png(root / folders[group] / name, img)
                if group in mask_folders:
                    _write_png(root / mask_folders[group] / name, (mask * 255).astype(np.uint8))
    atomic_write_text(marker, json.dumps(settings, indent=2) + "\n")
    return root
