"""The per-record preprocessing of RSNA brain-CT slices for the cache: DICOM -> HU -> windows, brain mask, crop,
resize (:func:`meddiff.data.preprocess.ct_windows.preprocess_hu`), plus the lesion label map of synthetic data.

A DICOM without ``RescaleIntercept`` is skipped on purpose (kind ``missing_rescale_intercept`` in the cache's
``skipped.csv``; why: :mod:`meddiff.data.formats.dicom`); every other unreadable file is skipped and listed too."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from meddiff.data.formats.dicom import MissingRescaleError, read_dicom
from meddiff.data.preprocess.cache_chunks import Processed, SkipRecord
from meddiff.data.preprocess.ct_windows import preprocess_hu
from meddiff.errors import DataError

__all__ = ["MISSING_INTERCEPT", "RSNAPreprocess"]

MISSING_INTERCEPT = "missing_rescale_intercept"  # the skip kind of a DICOM without RescaleIntercept


@dataclass(frozen=True)
class RSNAPreprocess:
    """Picklable ``record -> Processed`` for the cache: DICOM -> HU -> windows/brain mask/crop/resize.

    Records come from :func:`meddiff.data.formats.rsna_layout.rsna_records` (``file`` and ``mask_file`` relative
    to ``root``). Arrays: ``image`` float16 ``[C, S, S]`` in ``[-1, 1]``, ``brain_mask`` bool ``[1, S, S]`` and,
    when ``with_masks``, ``mask`` bool ``[1, S, S]``. Meta: subject, patient/study/series ids, z, rows, cols,
    intercept_fixed, brain_fraction (of the original slice; near-empty filtering happens at setup).
    """

    root: str
    windows: tuple[tuple[str, float, float], ...]
    image_size: int
    crop_to_brain: bool = True
    with_masks: bool = False

    def load(self, record: Mapping[str, Any]) -> tuple[Any, np.ndarray | None]:
        """Decode the record's DICOM (and its lesion label map when ``with_masks``).

        Raises:
            SkipRecord: kind ``missing_rescale_intercept`` (the reason names the file and the tag).
            DataError: any other unreadable file.
        """
        try:
            sl = read_dicom(Path(self.root) / record["file"])
        except MissingRescaleError as e:
            raise SkipRecord(str(e), kind=MISSING_INTERCEPT) from e
        lesion = None
        if self.with_masks:
            mpath = Path(self.root) / record["mask_file"]
            try:
                lesion = np.asarray(Image.open(mpath))
            except OSError as e:
                raise DataError(f"cannot read lesion mask {str(mpath)!r}: {e}") from e
        return sl, lesion

    def __call__(self, record: Mapping[str, Any]) -> Processed:
        sl, lesion = self.load(record)
        out = preprocess_hu(
            sl.hu, [(c, w) for _, c, w in self.windows], self.image_size, self.crop_to_brain, lesion_mask=lesion
        )
        arrays = {"image": out["image"].astype(np.float16), "brain_mask": out["brain_mask"]}
        if lesion is not None:
            arrays["mask"] = out["mask"]
        meta = {
            "subject": sl.subject or str(record["id"]),
            "patient_id": sl.patient_id,
            "study_uid": sl.study_uid,
            "series_uid": sl.series_uid,
            "z": sl.z,
            "rows": sl.shape[0],
            "cols": sl.shape[1],
            "intercept_fixed": sl.intercept_fixed,
            "brain_fraction": round(out["brain_fraction"], 6),
        }
        return Processed(arrays, meta)
