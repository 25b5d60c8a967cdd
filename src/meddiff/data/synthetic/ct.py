"""Synthetic head-CT phantoms with intracranial hemorrhages, written as an RSNA-format dataset.

No package ships a real head CT, so demos and tests use these phantoms. Values are in Hounsfield units:
air -1000, scalp soft tissue ~40 with a fat layer ~-80, skull 700-1500 (dense tables, lighter diploe),
cortex (grey matter) 35-40, white matter 24-29, deep grey nuclei ~35, CSF (ventricles, sulci, a thin rim
under the skull) ~5, Gaussian noise 3-6 HU. Shapes vary per synthetic patient (size, aspect, rotation, low-order
boundary harmonics, ventricle size, sulcal pattern) and are consistent across the patient's slices (an
ellipsoid-like head sliced at several heights).

Hemorrhages of the five RSNA subtypes are hyperdense (lesion HU 60-85 before noise) regions:
epidural (biconvex lens against the inner skull table, short arc), subdural (thin crescent along a long arc),
intraparenchymal (lobulated blob in the white matter with a faint hypodense edema rim outside the mask),
intraventricular (dependent layer inside one lateral ventricle) and subarachnoid (blood filling the sulci and
the CSF rim of one sector). Each lesion is 3D: it spans a contiguous range of slices, largest in its middle.

:func:`write_synthetic_rsna` writes the Kaggle layout (``stage_2_train/ID_<hex>.dcm`` real DICOMs via
pydicom, ``stage_2_train.csv``) plus ``masks/ID_<hex>.png`` (uint8 label maps: 0 none, ``k`` = subtype
``SUBTYPES[k-1]``) and ``synthetic_info.json``, with the header variety of the real data: 16-bit signed,
12-bit unsigned, the 12-bit intercept quirk (the reader's fix is needed to get air at -1000), intercepts -1024,
-1000, 0 and 1, multi-valued WindowCenter/WindowWidth, one non-square non-512 image (638 x 490 scaled), one
near-empty vertex slice and one truncated file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pydicom.config
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage as ndi

from meddiff.data.formats.rsna_labels import LABEL_COLUMNS, SUBTYPES, write_rsna_labels
from meddiff.errors import ConfigError

__all__ = [
    "HEADER_VARIANTS",
    "Anatomy",
    "Lesion",
    "sample_anatomy",
    "sample_lesions",
    "phantom_slice",
    "lesion_mask",
    "hu_to_stored",
    "synthetic_patient",
    "write_synthetic_rsna",
]

#: header variants: name -> (BitsStored, PixelRepresentation, RescaleIntercept); "quirk12" stores px = HU mod 4096
HEADER_VARIANTS: dict[str, tuple[int, int, float]] = {
    "signed16": (16, 1, -1024.0),
    "unsigned12": (12, 0, -1024.0),
    "quirk12": (12, 0, 0.0),
    "quirk12_i1": (12, 0, 1.0),
    "unsigned16_m1000": (16, 0, -1000.0),
    "signed16_i0": (16, 1, 0.0),
}

_Z_RANGE = (-0.5, 0.8)  # relative heights of a patient's slices (0 = widest cross-section)


@dataclass
class Anatomy:
    """Per-patient head geometry and tissue values (lengths as fractions of the image side)."""

    center: tuple[float, float]  # (row, col) offset of the head centre from the image centre
    semi_axes: tuple[float, float]  # (a, b) of the outer head ellipse at z = 0
    angle: float  # in-plane rotation, radians
    harmonics: list[tuple[int, float, float]]  # (order, amplitude, phase) of the boundary perturbation
    scalp: float
    skull: float
    csf_rim: float
    cortex: float
    ventricle_offset: float  # lateral half-distance between the ventricles (fraction of the brain radius)
    ventricle_size: tuple[float, float]  # semi-axes (fraction of the brain radius)
    ventricle_z: float  # relative height of the ventricles' centre
    sulci_angles: list[float]
    sulci_depth: list[float]
    gm_hu: float
    wm_hu: float
    csf_hu: float
    noise_sigma: float


@dataclass
class Lesion:
    """One 3D hemorrhage of a synthetic patient."""

    subtype: str  # one of SUBTYPES
    z_center: float  # relative height where the lesion is largest
    z_extent: float  # half-extent in relative height
    theta: float  # angular position (radians, head frame)
    size: float  # main size parameter (fraction of the image side)
    span: float  # angular half-span (radians) for epidural/subdural/subarachnoid
    hu: float  # lesion density before noise
    pos: tuple[float, float] = (0.0, 0.0)  # (u, v) position (fraction of the brain radius), intraparenchymal
    lobes: list[tuple[int, float, float]] = field(default_factory=list)  # boundary harmonics of a blob
    side: int = 1  # which lateral ventricle (intraventricular)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Random but plausible head geometry for one synthetic patient."""
    a = rng.uniform(0.34, 0.42)
    n_sulci = int(rng.integers(14, 24))
    base = np.linspace(-math.pi, math.pi, n_sulci, endpoint=False)
    return Anatomy(
        center=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))),
        semi_axes=(float(a), float(a * rng.uniform(0.78, 0.9))),
        angle=float(rng.uniform(-0.35, 0.35)),
        harmonics=[(k, float(rng.uniform(0.0, 0.025)), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3, 4)],
        scalp=float(rng.uniform(0.015, 0.025)),
        skull=float(rng.uniform(0.022, 0.035)),
        csf_rim=float(rng.uniform(0.005, 0.009)),
        cortex=float(rng.uniform(0.03, 0.045)),
        ventricle_offset=float(rng.uniform(0.09, 0.15)),
        ventricle_size=(float(rng.uniform(0.05, 0.09)), float(rng.uniform(0.22, 0.32))),
        ventricle_z=float(rng.uniform(-0.05, 0.2)),
        sulci_angles=(base + rng.uniform(-0.1, 0.1, n_sulci)).tolist(),
        sulci_depth=rng.uniform(0.6, 1.5, n_sulci).tolist(),
        gm_hu=float(rng.uniform(35.0, 40.0)),
        wm_hu=float(rng.uniform(24.0, 29.0)),
        csf_hu=float(rng.uniform(3.0, 8.0)),
        noise_sigma=float(rng.uniform(3.0, 6.0)),
    )


def _wrap(x: np.ndarray | float) -> np.ndarray | float:
    return (np.asarray(x) + math.pi) % (2 * math.pi) - math.pi


def _ventricle_scale(anat: Anatomy, zrel: float) -> float:
    return float(max(0.0, 1.0 - ((zrel - anat.ventricle_z) / 0.4) ** 2)) ** 0.5


def phantom_slice(size: int, anat: Anatomy, zrel: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One noiseless head slice: HU float32 ``[size, size]`` and geometry ``parts`` for placing lesions.

    ``parts`` holds bool masks ``intracranial``, ``skull``, ``ventricles`` (and ``ventricle_l``/``_r``),
    ``sulci``, ``rim`` (CSF under the skull), float maps ``dist`` (px from the inner skull table, 0 outside),
    ``phi`` (head-frame angle), ``u``/``v`` (head-frame coordinates in units of the brain radius), and the
    scalar ``radius`` (brain radius in px).
    """
    s = math.sqrt(max(1.0 - zrel * zrel, 0.04))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = (0.5 + anat.center[0]) * size - 0.5, (0.5 + anat.center[1]) * size - 0.5
    dy, dx = yy - cy, xx - cx
    ca, sa = math.cos(anat.angle), math.sin(anat.angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy  # head frame: u left-right, v front-back
    a, b = anat.semi_axes[0] * size * s, anat.semi_axes[1] * size * s
    phi = np.arctan2(u / a, -v / b)  # 0 = front (anterior), increasing clockwise
    wobble = 1.0 + sum(amp * np.cos(k * phi + ph) for k, amp, ph in anat.harmonics)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble  # < 1 inside the head
    radius = math.sqrt(a * b)
    t_scalp, t_skull = anat.scalp * size, anat.skull * size
    r_skull_out = 1.0 - t_scalp / radius
    r_skull_in = 1.0 - (t_scalp + t_skull) / radius

    hu = np.full((size, size), -1000.0, dtype=np.float32)
    head = r < 1.0
    hu[head] = 40.0
    fat = head & (r > 1.0 - 0.55 * t_scalp / radius) & (r < 1.0 - 0.2 * t_scalp / radius)
    hu[fat] = -80.0
    skull = (r < r_skull_out) & (r >= r_skull_in)
    depth = np.clip((r_skull_out - r) / max(r_skull_out - r_skull_in, 1e-6), 0, 1)  # 0 outer .. 1 inner table
    skull_hu = 1500.0 - 750.0 * np.exp(-(((depth - 0.5) / 0.22) ** 2))
    hu[skull] = skull_hu[skull]
    intracranial = r < r_skull_in
    dist = ndi.distance_transform_edt(intracranial).astype(np.float32)
    brain_r = radius * r_skull_in
    un, vn = u / brain_r, v / brain_r

    rim_px, cortex_px = max(anat.csf_rim * size, 0.8), max(anat.cortex * size, 2.0)
    hu[intracranial] = anat.wm_hu
    cortex = intracranial & (dist <= rim_px + cortex_px)
    hu[cortex] = anat.gm_hu
    # deep grey nuclei lateral to the ventricles
    vs = _ventricle_scale(anat, zrel)
    for side in (-1, 1):
        nuc = intracranial & ((((un - side * 0.32) / 0.13) ** 2 + ((vn - 0.05) / 0.2) ** 2) < vs)
        hu[nuc] = anat.gm_hu - 2.0
    # sulci: radial CSF clefts from the surface, with per-sulcus depth
    band = intracranial & (dist <= rim_px + max(anat.sulci_depth) * cortex_px)  # only where sulci can be
    b_phi, b_dist = phi[band], dist[band]
    b_rad = np.sqrt(dx[band] ** 2 + dy[band] ** 2)
    b_sulci = np.zeros(b_phi.shape, dtype=bool)
    for ang, dep in zip(anat.sulci_angles, anat.sulci_depth):
        arc = np.abs(_wrap(b_phi - ang - 0.04 * np.sin(b_dist / 2.0))) * b_rad
        b_sulci |= (arc < 0.6 + 0.004 * size) & (b_dist <= rim_px + dep * cortex_px)
    sulci = np.zeros_like(intracranial)
    sulci[band] = b_sulci
    rim = intracranial & (dist <= rim_px)
    ventricles = np.zeros_like(intracranial)
    vparts: dict[str, np.ndarray] = {}
    if vs > 0.15:
        va, vb = anat.ventricle_size[0] * vs, anat.ventricle_size[1] * vs
        for side, name in ((-1, "ventricle_l"), (1, "ventricle_r")):
            tilt = side * 0.25
            cu, cv = un - side * anat.ventricle_offset, vn + 0.02
            ru = math.cos(tilt) * cu + math.sin(tilt) * cv
            rv = -math.sin(tilt) * cu + math.cos(tilt) * cv
            vent = intracranial & (((ru / va) ** 2 + (rv / vb) ** 2) < 1.0)
            vparts[name] = vent
            ventricles |= vent
    csf = sulci | rim | ventricles
    hu[csf] = anat.csf_hu
    # faint low-frequency texture inside the brain
    tex = ndi.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=max(size / 40, 1.0))
    tex *= 1.5 / max(float(tex.std()), 1e-6)
    hu[intracranial] += tex[intracranial]
    parts = dict(
        intracranial=intracranial, skull=skull, ventricles=ventricles, sulci=sulci, rim=rim, dist=dist, phi=phi,
        u=un, v=vn, radius=float(brain_r), **vparts,
    )
    parts.setdefault("ventricle_l", np.zeros_like(intracranial))
    parts.setdefault("ventricle_r", np.zeros_like(intracranial))
    return hu, parts


def sample_lesions(rng: np.random.Generator, anat: Anatomy, subtypes: list[str]) -> list[Lesion]:
    """3D lesions of the given subtypes for one patient (placed around the middle slices)."""
    lesions = []
    for st in subtypes:
        zc = float(rng.uniform(-0.2, 0.35))
        hu = float(rng.uniform(62.0, 82.0))
        theta = float(rng.uniform(-math.pi, math.pi))
        if st == "epidural":
            les = Lesion(st, zc, float(rng.uniform(0.35, 0.5)), theta, float(rng.uniform(0.05, 0.075)),
                         float(rng.uniform(0.22, 0.38)), hu)
        elif st == "subdural":
            les = Lesion(st, zc, float(rng.uniform(0.45, 0.65)), theta, float(rng.uniform(0.02, 0.035)),
                         float(rng.uniform(0.6, 1.1)), hu)
        elif st == "intraparenchymal":
            ang, rr = float(rng.uniform(-math.pi, math.pi)), float(rng.uniform(0.25, 0.55))
            les = Lesion(st, zc, float(rng.uniform(0.3, 0.45)), theta, float(rng.uniform(0.04, 0.075)), 0.0, hu,
                         pos=(rr * math.sin(ang), -rr * math.cos(ang)),
                         lobes=[(k, float(rng.uniform(0, 0.18)), float(rng.uniform(0, 6.3))) for k in (2, 3, 5)])
        elif st == "intraventricular":
            les = Lesion(st, anat.ventricle_z + float(rng.uniform(-0.05, 0.05)), float(rng.uniform(0.25, 0.35)),
                         theta, float(rng.uniform(0.3, 0.6)), 0.0, hu, side=int(rng.choice([-1, 1])))
        elif st == "subarachnoid":
            les = Lesion(st, zc, float(rng.uniform(0.4, 0.6)), theta, 0.0, float(rng.uniform(0.5, 0.9)), hu)
        else:
            raise ConfigError(f"unknown hemorrhage subtype {st!r}; use one of {list(SUBTYPES)}.")
        lesions.append(les)
    return lesions


def lesion_mask(les: Lesion, parts: dict, zrel: float, size: int) -> np.ndarray:
    """Bool ``[size, size]`` mask of one lesion on the slice at ``zrel`` (empty outside its z range)."""
    f2 = 1.0 - ((zrel - les.z_center) / les.z_extent) ** 2
    if f2 <= 0.05:
        return np.zeros(parts["intracranial"].shape, dtype=bool)
    f = math.sqrt(f2)
    ic, dist, dphi = parts["intracranial"], parts["dist"], np.abs(_wrap(parts["phi"] - les.theta))
    if les.subtype in ("epidural", "subdural"):
        x = np.clip(dphi / (les.span * (0.6 + 0.4 * f)), 0.0, 1.0)
        profile = np.sqrt(1.0 - x**2) if les.subtype == "epidural" else np.cos(0.5 * math.pi * x)
        return ic & (dphi < les.span) & (dist < les.size * size * f * profile)
    if les.subtype == "intraparenchymal":
        du, dv = parts["u"] - les.pos[0], parts["v"] - les.pos[1]
        psi = np.arctan2(du, dv)
        rr = np.sqrt(du * du + dv * dv) * parts["radius"]
        edge = les.size * size * f * (1.0 + sum(a * np.cos(k * psi + p) for k, a, p in les.lobes))
        return ic & ~parts["ventricles"] & (rr < edge)
    if les.subtype == "intraventricular":
        vent = parts["ventricle_r" if les.side > 0 else "ventricle_l"]
        if not vent.any():
            return vent.copy()
        vs = parts["v"][vent]
        cut = np.quantile(vs, 1.0 - les.size * f)  # dependent (posterior) share of the ventricle
        return vent & (parts["v"] >= cut)
    if les.subtype == "subarachnoid":
        sector = dphi < les.span * (0.5 + 0.5 * f)
        return (parts["sulci"] | parts["rim"]) & sector & ~parts["ventricles"]
    raise ConfigError(f"unknown hemorrhage subtype {les.subtype!r}")


def synthetic_patient(
    rng: np.random.Generator,
    size: int,
    n_slices: int,
    subtypes: list[str] | None = None,
    z_override: dict[int, float] | None = None,
    min_lesion_px: int = 4,
) -> list[dict[str, Any]]:
    """Slices of one synthetic patient: list of dicts ``hu`` float32 ``[size, size]`` (with noise),
    ``mask`` uint8 ``[size, size]`` label map (0 none, k = ``SUBTYPES[k-1]``), ``labels`` {column: 0/1} over
    :data:`LABEL_COLUMNS`, ``zrel``.

    Lesion fragments smaller than ``min_lesion_px`` pixels on a slice are not drawn, so every drawn lesion is
    labelled and every label has a visible lesion.
    """
    anat = sample_anatomy(rng)
    lesions = sample_lesions(rng, anat, subtypes or [])
    zs = np.linspace(*_Z_RANGE, n_slices) if n_slices > 1 else np.array([0.0])
    out = []
    for i, z in enumerate(zs):
        zrel = float((z_override or {}).get(i, z))
        hu, parts = phantom_slice(size, anat, zrel, rng)
        label_map = np.zeros((size, size), dtype=np.uint8)
        labels = dict.fromkeys(LABEL_COLUMNS, 0)
        for les in lesions:
            m = lesion_mask(les, parts, zrel, size)
            if int(m.sum()) < min_lesion_px:
                continue
            k = SUBTYPES.index(les.subtype) + 1
            hu[m] = les.hu
            if les.subtype == "intraparenchymal":  # faint hypodense edema just outside the blob
                ring = ndi.binary_dilation(m, iterations=max(1, size // 100)) & ~m & parts["intracranial"]
                ring &= ~(label_map > 0) & ~parts["ventricles"]
                hu[ring] -= 5.0
            label_map[m] = k
            labels[les.subtype] = 1
        # a drawn lesion can be overpainted by a later one: labels follow what is visible
        for k, st in enumerate(SUBTYPES, start=1):
            labels[st] = int(bool((label_map == k).sum() >= min_lesion_px))
        labels["any"] = int(any(labels[st] for st in SUBTYPES))
        hu = hu + rng.normal(0.0, anat.noise_sigma, hu.shape).astype(np.float32)
        np.clip(hu, -1024.0, 3071.0, out=hu)
        out.append({"hu": hu, "mask": label_map, "labels": labels, "zrel": zrel})
    return out


# ------------------------------------------------------------------------------------------------ DICOM writing
@contextmanager
def _no_write_validation():
    """RSNA uses ``ID_...`` strings as UIDs; silence pydicom's validation (on assignment and on writing)."""
    settings = pydicom.config.settings
    old = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.writing_validation_mode, settings.reading_validation_mode = old


def hu_to_stored(hu: np.ndarray, variant: str) -> tuple[np.ndarray, int, int, float]:
    """Encode HU as stored pixels for a header variant: ``(px, BitsStored, PixelRepresentation, intercept)``.

    ``quirk12`` variants store ``px = HU mod 4096`` (HU clipped to [-1000, 3095]) with a wrong intercept (0/1),
    exactly what the community fix (``px + 1000`` wrapped at 4096, intercept -1000) undoes.
    """
    bits, rep, intercept = HEADER_VARIANTS[variant]
    h = np.rint(hu).astype(np.int32)
    if variant.startswith("quirk12"):
        px = np.mod(np.clip(h, -1000, 3095), 4096)
    else:
        px = h - int(intercept)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if rep == 1 else (0, 2**bits - 1)
        px = np.clip(px, lo, hi)
    return px.astype(np.int16 if rep == 1 else np.uint16), bits, rep, intercept


def _write_dicom(
    path: Path, hu: np.ndarray, variant: str, image_id: str, patient_id: str, study_uid: str, series_uid: str,
    z_mm: float, instance: int, pixel_mm: float, multi_window: bool,
) -> None:
    px, bits, rep, intercept = hu_to_stored(hu, variant)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = image_id
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = image_id
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-125.0, -125.0, z_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [round(pixel_mm, 6), round(pixel_mm, 6)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(px.shape[0]), int(px.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = rep
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = "1"
    if multi_window:
        ds.WindowCenter = ["00040", "00036"]
        ds.WindowWidth = ["00080", "00080"]
    else:
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
    ds.PixelData = np.ascontiguousarray(px).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _place(arr: np.ndarray, shape: tuple[int, int], fill: float) -> np.ndarray:
    """Centre ``arr`` on a canvas of ``shape`` (cropping or padding with ``fill``)."""
    out = np.full(shape, fill, dtype=arr.dtype)
    h, w = arr.shape
    H, W = shape
    sr, dr = max((h - H) // 2, 0), max((H - h) // 2, 0)
    sc, dc = max((w - W) // 2, 0), max((W - w) // 2, 0)
    nh, nw = min(h, H), min(w, W)
    out[dr : dr + nh, dc : dc + nw] = arr[sr : sr + nh, sc : sc + nw]
    return out


def write_synthetic_rsna(
    root: str | os.PathLike,
    n_patients: int = 24,
    slices_per_patient: int = 8,
    image_size: int = 128,
    hemorrhage_fraction: float = 0.5,
    seed: int = 0,
    n_duplicate_images: int = 2,
    truncate: bool = True,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write a synthetic dataset in the Kaggle RSNA layout under ``root``.

    Args:
        root: output folder; gets ``stage_2_train/ID_<hex>.dcm``, ``stage_2_train.csv``, ``masks/ID_<hex>.png``
            and ``synthetic_info.json``.
        n_patients: synthetic patients (one study and series each).
        slices_per_patient: axial slices per patient (consistent anatomy across them).
        image_size: side of the square images (one image is non-square: ``(490, 638) * image_size / 512``).
        hemorrhage_fraction: share of patients with hemorrhage (subtypes cycle through the five so all occur;
            a quarter of them get a second subtype); their lesions span a contiguous range of slices.
        seed: RNG seed (the dataset is fully determined by the arguments).
        n_duplicate_images: images whose six CSV rows are repeated at the end (as in the real file).
        truncate: cut one healthy file's pixel data short (the reader must skip and report it).
        overwrite: replace an existing dataset in ``root`` (else a :class:`ConfigError` is raised).

    Returns:
        one row per image: id, patient_id, study_uid, series_uid, z, variant, rows, cols, the six label
        columns, and flags truncated / near_empty.
    """
    if n_patients < 1 or slices_per_patient < 1:
        raise ConfigError(f"n_patients={n_patients} and slices_per_patient={slices_per_patient} must be >= 1.")
    if image_size < 32:
        raise ConfigError(f"image_size={image_size} is too small for a head phantom; use >= 32.")
    if not 0.0 <= hemorrhage_fraction <= 1.0:
        raise ConfigError(f"hemorrhage_fraction={hemorrhage_fraction} must be in [0, 1].")
    root = Path(root)
    if (root / "stage_2_train.csv").exists() or (root / "stage_2_train").exists():
        if not overwrite:
            raise ConfigError(f"{root} already holds an RSNA-layout dataset; pass overwrite=True (CLI: --overwrite) to replace it.")
        (root / "stage_2_train.csv").unlink(missing_ok=True)
        for sub in ("stage_2_train", "masks"):
            if (root / sub).is_dir():
                shutil.rmtree(root / sub)
    (root / "stage_2_train").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    master = np.random.default_rng(seed)
    used_ids: set[str] = set()

    def new_id(n: int) -> str:
        while True:
            h = "ID_" + "".join(master.choice(list("0123456789abcdef"), n))
            if h not in used_ids:
                used_ids.add(h)
                return h

    n_hem = int(round(hemorrhage_fraction * n_patients))
    hem_patients = set(master.permutation(n_patients)[:n_hem].tolist())
    fixed_variants = ["quirk12", "signed16", "unsigned12", "quirk12_i1", "unsigned16_m1000", "signed16_i0"]
    odd_shape = (int(round(490 * image_size / 512)), int(round(638 * image_size / 512)))
    pixel_mm = 250.0 / image_size
    rows: list[dict[str, Any]] = []
    hem_count = 0
    with _no_write_validation():
        for p in range(n_patients):
            prng = np.random.default_rng([seed, p])
            subtypes: list[str] = []
            if p in hem_patients:
                subtypes = [SUBTYPES[hem_count % len(SUBTYPES)]]
                if prng.random() < 0.25:
                    subtypes.append(str(prng.choice([s for s in SUBTYPES if s != subtypes[0]])))
                hem_count += 1
            z_override = {slices_per_patient - 1: 0.97} if p == 0 and slices_per_patient > 2 else None
            slices = synthetic_patient(prng, image_size, slices_per_patient, subtypes, z_override)
            variant = (
                fixed_variants[p] if p < len(fixed_variants)
                else str(prng.choice(list(HEADER_VARIANTS), p=[0.3, 0.15, 0.2, 0.1, 0.15, 0.1]))
            )
            patient_id, study, series = new_id(9), new_id(10), new_id(10)
            multi_window = bool(prng.random() < 0.4)
            z0 = float(prng.uniform(-50, 50))
            for i, sl in enumerate(slices):
                image_id = new_id(9)
                z_mm = round(z0 + 5.0 * i, 3)
                hu, mask = sl["hu"], sl["mask"]
                if p == n_patients - 1 and i == slices_per_patient // 2:
                    hu, mask = _place(hu, odd_shape, -1000.0), _place(mask, odd_shape, 0)
                path = root / "stage_2_train" / f"{image_id}.dcm"
                _write_dicom(path, hu, variant, image_id, patient_id, study, series, z_mm, i + 1,
                             pixel_mm, multi_window)
                Image.fromarray(mask).save(root / "masks" / f"{image_id}.png")
                rows.append({
                    "id": image_id, "patient_id": patient_id, "study_uid": study, "series_uid": series,
                    "z": z_mm, "variant": variant, "rows": int(hu.shape[0]), "cols": int(hu.shape[1]),
                    **sl["labels"], "truncated": False, "near_empty": bool(sl["zrel"] > 0.95),
                })
    table = pd.DataFrame(rows)
    if truncate:
        healthy = table.index[(table["any"] == 0) & ~table["near_empty"] & (table["rows"] == table["cols"])]
        victim = int(healthy[len(healthy) // 2]) if len(healthy) else len(table) - 1
        path = root / "stage_2_train" / f"{table.at[victim, 'id']}.dcm"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - (image_size * image_size)])  # drop half of the pixel bytes
        table.loc[victim, "truncated"] = True
    labels = table.set_index("id")[list(LABEL_COLUMNS)]
    dups = tuple(table["id"].iloc[[0, len(table) // 3]].tolist()[:n_duplicate_images]) if n_duplicate_images else ()
    write_rsna_labels(labels, root / "stage_2_train.csv", duplicate_ids=dups)
    info = {
        "generator": "meddiff.data.synthetic.ct.write_synthetic_rsna",
        "args": dict(n_patients=n_patients, slices_per_patient=slices_per_patient, image_size=image_size,
                     hemorrhage_fraction=hemorrhage_fraction, seed=seed),
        "mask_values": {str(k): st for k, st in enumerate(SUBTYPES, start=1)},
        "truncated": table.loc[table["truncated"], "id"].tolist(),
        "near_empty": table.loc[table["near_empty"], "id"].tolist(),
        "non_square": table.loc[table["rows"] != table["cols"], "id"].tolist(),
        "quirk12": table.loc[table["variant"].str.startswith("quirk12"), "id"].tolist(),
        "duplicated_in_csv": list(dups),
    }
    (root / "synthetic_info.json").write_text(json.dumps(info, indent=2))
    table.to_csv(root / "synthetic_images.csv", index=False)
    return table
