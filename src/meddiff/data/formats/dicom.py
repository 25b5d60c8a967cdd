"""Reading CT DICOM slices into Hounsfield units (HU) with pydicom 3.

The one entry point most callers need is :func:`read_dicom`, which returns a :class:`CTSlice` holding the
slice in HU (float32 ``[H, W]``) and the header fields the data layer needs (patient / study / series ids, z
position, rescale parameters). Every failure (missing file, not a DICOM, truncated or undecodable pixel data,
multi-frame data) raises :class:`meddiff.errors.DataError`, so loops over thousands of files can catch one
exception type, skip the file and report it.

RSNA quirk handled here (see ``FIELD-NOTES.md``): about half of the Kaggle RSNA files store 12-bit unsigned
pixels whose ``RescaleIntercept`` is wrong (0 or 1 instead of about -1000). The community fix, applied by
:func:`rescale_to_hu`, is: if ``BitsStored == 12 and PixelRepresentation == 0 and RescaleIntercept > -100``
then ``px = px + 1000; px[px >= 4096] -= 4096; intercept = -1000``; then ``HU = px * slope + intercept``.

Missing ``RescaleIntercept`` (0028,1052) (or an empty value): the file is refused with
:class:`MissingRescaleError` (a :class:`DataError`), never decoded with an assumed intercept. CT stores HU as
``px * slope + intercept`` with intercepts of -1024, -1000, 0 or 1 in RSNA alone, so no default is right: 0 turns
a -1024 file into HU + 1024 (brain reads as bone, the slice then looks near-empty and vanishes silently). The
12-bit fix above is the only intercept rule applied, and only with the tag present (it corrects a stored value;
it does not invent one). The cache lists such files in ``skipped.csv`` (kind ``missing_rescale_intercept``); add
the tag to the file and rerun: the cache notices the changed file and decodes it again. A missing
``RescaleSlope`` counts as 1 (the identity every RSNA file stores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from meddiff.errors import DataError

# RSNA files use ``ID_...`` strings as UIDs, which pydicom's validation warns about on every read.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

__all__ = [
    "CTSlice",
    "MissingRescaleError",
    "needs_intercept_fix",
    "rescale_to_hu",
    "read_dicom",
    "read_dicom_header",
]


class MissingRescaleError(DataError):
    """A CT DICOM without ``RescaleIntercept``: its Hounsfield units are ambiguous, so it is not decoded."""


@dataclass(frozen=True)
class CTSlice:
    """One decoded CT slice.

    Attributes:
        hu: float32 ``[H, W]`` Hounsfield units (air ≈ -1000, water 0, brain 20-45, bone > 300).
        patient_id: ``PatientID`` ('' when absent).
        study_uid: ``StudyInstanceUID`` ('' when absent).
        series_uid: ``SeriesInstanceUID`` ('' when absent).
        sop_uid: ``SOPInstanceUID`` ('' when absent).
        z: ``ImagePositionPatient[2]`` in mm, or ``None`` when the tag is absent or malformed.
        slope: ``RescaleSlope`` as read (1.0 when absent).
        intercept: the intercept actually used (``-1000`` after the 12-bit fix, else as read).
        bits_stored: ``BitsStored`` as read.
        pixel_representation: ``PixelRepresentation`` (0 unsigned, 1 signed).
        intercept_fixed: whether the 12-bit intercept fix was applied.
    """

    hu: np.ndarray
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    z: float | None
    slope: float
    intercept: float
    bits_stored: int
    pixel_representation: int
    intercept_fixed: bool

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the slice."""
        return (int(self.hu.shape[0]), int(self.hu.shape[1]))

    @property
    def subject(self) -> str:
        """Grouping key for leakage-free splits: ``PatientID``, falling back to ``StudyInstanceUID``."""
        return self.patient_id or self.study_uid


def needs_intercept_fix(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """True when the RSNA 12-bit intercept quirk applies (BitsStored 12, unsigned, intercept > -100)."""
    return int(bits_stored) == 12 and int(pixel_representation) == 0 and float(intercept) > -100


def rescale_to_hu(
    px: np.ndarray, slope: float, intercept: float, bits_stored: int, pixel_representation: int
) -> tuple[np.ndarray, float, bool]:
    """Stored pixel values -> HU, with the community 12-bit intercept fix.

    Args:
        px: integer ``[H, W]`` stored values (``Dataset.pixel_array``); not modified.
        slope, intercept: ``RescaleSlope`` / ``RescaleIntercept`` from the header.
        bits_stored, pixel_representation: ``BitsStored`` / ``PixelRepresentation`` from the header.

    Returns:
        ``(hu, intercept_used, fixed)`` with ``hu`` float32 ``[H, W]``.
    """
    values = np.asarray(px).astype(np.int32, copy=True)  # int32: +1000 must not overflow uint16/int16
    fixed = needs_intercept_fix(bits_stored, pixel_representation, intercept)
    if fixed:
        values += 1000
        values[values >= 4096] -= 4096
        intercept = -1000.0
    hu = values.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return hu, float(intercept), fixed


def _str_tag(ds: pydicom.Dataset, name: str) -> str:
    value = ds.get(name, "")
    return "" if value is None else str(value).strip()


def _float_tag(ds: pydicom.Dataset, name: str, default: float | None) -> float | None:
    value = ds.get(name, None)
    if value is None or value == "" or (isinstance(value, MultiValue | list | tuple) and len(value) == 0):
        return default
    if isinstance(value, MultiValue | list | tuple):  # malformed but seen in the wild
        value = value[0]
    return float(value)


def _z_position(ds: pydicom.Dataset) -> float | None:
    ipp = ds.get("ImagePositionPatient", None)
    try:
        return float(ipp[2]) if ipp is not None and len(ipp) >= 3 else None
    except (TypeError, ValueError):
        return None


def _open(path: str | os.PathLike, stop_before_pixels: bool) -> pydicom.Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"DICOM file {str(path)!r} does not exist (or is not a file); check the data root.")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as e:
        raise DataError(f"{str(path)!r} is not a DICOM file ({e}); remove it or regenerate it.") from e
    except Exception as e:  # truncated headers raise EOFError, struct.error, OSError, ...
        raise DataError(f"cannot read DICOM {str(path)!r}: {type(e).__name__}: {e}") from e


def read_dicom_header(path: str | os.PathLike) -> dict[str, object]:
    """Header fields only (pixels not read): patient_id, study_uid, series_uid, sop_uid, z, rows, cols.

    Raises:
        DataError: missing file or not a DICOM.
    """
    ds = _open(path, stop_before_pixels=True)
    return {
        "patient_id": _str_tag(ds, "PatientID"),
        "study_uid": _str_tag(ds, "StudyInstanceUID"),
        "series_uid": _str_tag(ds, "SeriesInstanceUID"),
        "sop_uid": _str_tag(ds, "SOPInstanceUID"),
        "z": _z_position(ds),
        "rows": int(ds.get("Rows", 0) or 0),
        "cols": int(ds.get("Columns", 0) or 0),
    }


def read_dicom(path: str | os.PathLike) -> CTSlice:
    """Read one single-frame CT DICOM into HU (float32 ``[H, W]``) plus header info.

    Window tags in the file (``WindowCenter``/``WindowWidth``, sometimes multi-valued in RSNA) are ignored on
    purpose: windowing uses fixed presets (:mod:`meddiff.data.preprocess.ct_windows`).

    Raises:
        MissingRescaleError: no (or an empty) ``RescaleIntercept``: HU would be a guess (see the module docstring).
        DataError: missing file, not a DICOM, no or truncated pixel data, decoding failure, not a 2D slice.
    """
    ds = _open(path, stop_before_pixels=False)
    if "PixelData" not in ds:
        raise DataError(f"DICOM {str(path)!r} has no PixelData element; it cannot be used as an image.")
    try:
        px = ds.pixel_array
    except Exception as e:  # truncated pixel data -> ValueError; odd transfer syntaxes -> NotImplementedError...
        raise DataError(f"cannot decode pixel data of {str(path)!r}: {type(e).__name__}: {e}") from e
    if px.ndim != 2:
        raise DataError(
            f"DICOM {str(path)!r} has pixel array of shape {tuple(px.shape)}; expected a single 2D slice [H, W]."
        )
    try:
        slope = _float_tag(ds, "RescaleSlope", 1.0)
        intercept = _float_tag(ds, "RescaleIntercept", None)
        bits_stored = int(ds.get("BitsStored", 16) or 16)
        pixel_rep = int(ds.get("PixelRepresentation", 0) or 0)
    except (TypeError, ValueError) as e:
        raise DataError(f"malformed rescale tags in {str(path)!r}: {e}") from e
    if intercept is None:
        raise MissingRescaleError(
            f"DICOM {str(path)!r} has no RescaleIntercept (0028,1052): its Hounsfield units are ambiguous (RSNA files "
            f"use -1024, -1000, 0 or 1), so it is skipped; add the tag to the file (e.g. with pydicom) and rerun."
        )
    hu, intercept_used, fixed = rescale_to_hu(px, slope, intercept, bits_stored, pixel_rep)
    if not np.isfinite(hu).all():
        raise DataError(f"DICOM {str(path)!r} decodes to non-finite HU values; check its rescale tags.")
    return CTSlice(
        hu=hu,
        patient_id=_str_tag(ds, "PatientID"),
        study_uid=_str_tag(ds, "StudyInstanceUID"),
        series_uid=_str_tag(ds, "SeriesInstanceUID"),
        sop_uid=_str_tag(ds, "SOPInstanceUID"),
        z=_z_position(ds),
        slope=slope,
        intercept=intercept_used,
        bits_stored=bits_stored,
        pixel_representation=pixel_rep,
        intercept_fixed=fixed,
    )
