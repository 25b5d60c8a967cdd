"""Anomaly-detection image folders: the two layouts, their index and their checks (no torch, no Lightning).

Pixels of one image file: :mod:`meddiff.data.formats.raster`.

Layout ``brainomaly`` (Brainomaly, WACV 2024)::

    <root>/train/neg/        known-healthy images
    <root>/train/pos/        \\ together the unannotated mixed set: healthy and diseased, labels never used in
    <root>/train/neg_mixed/  /  training or selection (only to score the transductive protocol)
    <root>/test/pos/  <root>/test/neg/        labelled test images
    <root>/val/pos/   <root>/val/neg/         optional labelled validation set (a meddiff extension)

Layout ``bmad`` (BMAD benchmark, e.g. its BraTS2021 brain set)::

    <root>/train/good/                                       known-healthy images
    <root>/valid/good/  <root>/valid/Ungood/img/  [anomaly_mask/]  labelled validation (also the unannotated pool)
    <root>/test/good/   <root>/test/Ungood/img/   [anomaly_mask/]  labelled test images with pixel masks

Images: PNG, TIFF, JPEG, BMP, or NIfTI slices (``.nii``/``.nii.gz``, 2D or one-slice 3D), grayscale or RGB(A).
3D scans are stored slice by slice as ``<subject>__<nnn>.png``: the subject id is what ``subject_regex`` (default
``^(.+?)__\\d+$``) captures from the file name without its extension; a name it does not match makes the image its
own subject (its relative id). BMAD masks share their image's file name.

The checks raise :class:`meddiff.errors.DataError` naming the folder and the fix: a layout that matches neither
(both are listed), a missing ``train/neg`` (or ``train/good``), an empty folder, files that are not images, masks that
are missing, and (:func:`check_subject_overlap`) a subject in two groups (known-healthy, mixed, validation, test).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from meddiff.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".nii", ".nii.gz")
LAYOUTS = ("brainomaly", "bmad")
DEFAULT_SUBJECT_REGEX = r"^(.+?)__\d+$"
#: groups a subject must not span (leakage): known-healthy training, the mixed set, validation, test
GROUPS = ("known_healthy", "mixed", "val", "test")

LAYOUT_HELP = (
    "Expected one of two layouts:\n"
    "  (a) brainomaly: train/neg (known healthy), train/pos + train/neg_mixed (unannotated mixed set), "
    "test/pos, test/neg [, val/pos, val/neg]\n"
    "  (b) bmad: train/good, valid/good, valid/Ungood/img [+ anomaly_mask], test/good, test/Ungood/img "
    "[+ anomaly_mask]"
)

# (group, folder, label, mask folder or None) per layout; the mixed group's labels are hidden downstream
_BRAINOMALY = (
    ("known_healthy", "train/neg", 0, None),
    ("mixed", "train/pos", 1, None),
    ("mixed", "train/neg_mixed", 0, None),
    ("val", "val/pos", 1, None),
    ("val", "val/neg", 0, None),
    ("test", "test/pos", 1, None),
    ("test", "test/neg", 0, None),
)
_BMAD = (
    ("known_healthy", "train/good", 0, None),
    ("val", "valid/good", 0, None),
    ("val", "valid/Ungood/img", 1, "valid/Ungood/anomaly_mask"),
    ("test", "test/good", 0, None),
    ("test", "test/Ungood/img", 1, "test/Ungood/anomaly_mask"),
)
_FOLDERS = {"brainomaly": _BRAINOMALY, "bmad": _BMAD}
#: the group each layout reads as its unannotated pool: its images are named and ordered label-blind
UNANNOTATED_GROUP = {"brainomaly": "mixed", "bmad": "val"}
_REQUIRED = {"brainomaly": "train/neg", "bmad": "train/good"}


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, its group and folder label, its subject and id (``<folder>/<name>``; in the
    unannotated pool ``<split dir>/<name>``, see :func:`_label_blind`)."""

    path: Path
    group: str
    label: int
    subject: str
    id: str
    folder: str
    mask_path: Path | None = None


@dataclass
class FolderIndex:
    """All images of a root, in a fixed (sorted) order."""

    root: Path
    layout: str
    records: list[ImageRecord]
    unparsed_subjects: list[str] = field(default_factory=list)  # ids of images named without a subject id
    has_masks: dict[str, bool] = field(default_factory=dict)  # group -> whether its positive images have masks

    def group(self, name: str) -> list[ImageRecord]:
        return [r for r in self.records if r.group == name]

    def folders(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for r in self.records:
            counts[r.folder] += 1
        return dict(counts)


def strip_extension(name: str) -> str:
    """``a.nii.gz`` -> ``a``; ``a.png`` -> ``a``."""
    low = name.lower()
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def detect_layout(root: str | Path) -> str:
    """``"brainomaly"`` or ``"bmad"`` from the folders present; DataError listing both layouts otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a folder. {LAYOUT_HELP}")
    a = any((root / f).is_dir() for f in ("train/neg", "train/pos", "train/neg_mixed"))
    b = any((root / f).is_dir() for f in ("train/good", "valid", "test/good", "test/Ungood"))
    if a and b:
        raise DataError(f"{root} has folders of both layouts; set data.layout=brainomaly or data.layout=bmad. "
                        f"{LAYOUT_HELP}")
    if not (a or b):
        found = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_dir())[:10]
        raise DataError(f"{root} matches neither image-folder layout (sub-folders found: {found or 'none'}). "
                        f"{LAYOUT_HELP}")
    return "brainomaly" if a else "bmad"


def _list_images(folder: Path, root: Path) -> list[Path]:
    """Image files of ``folder`` (sorted); DataError for other entries (hidden files are ignored)."""
    files, bad = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and is_image_name(p.name):
            files.append(p)
        else:
            bad.append(p.relative_to(root).as_posix() + ("/" if p.is_dir() else ""))
    if bad:
        raise DataError(
            f"{len(bad)} entries in {folder} are not images ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); "
            f"supported: {', '.join(IMAGE_EXTENSIONS)}. Move them out of the data folder."
        )
    if not files:
        raise DataError(f"{folder} is empty; put {', '.join(IMAGE_EXTENSIONS[:3])} images in it or remove the folder.")
    return files


def subject_from_name(stem: str, pattern: re.Pattern[str] | None) -> str | None:
    """The subject id captured from a file name without extension, or None when it has none."""
    if pattern is None:
        return None
    m = pattern.search(stem)
    if not m:
        return None
    return m.group(1) if m.groups() else m.group(0)


def scan_image_folder(root: str | Path, layout: str = "auto", subject_regex: str | None = DEFAULT_SUBJECT_REGEX,
                      use_masks: bool = True) -> FolderIndex:
    """Index every image of ``root`` in ``layout`` (``auto`` detects it).

    Raises:
        DataError: see the module docstring. ConfigError: unknown layout or a bad ``subject_regex``.
    """
    root = Path(root).expanduser()
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise ConfigError(f"data.layout={layout!r} is unknown; choose auto, {' or '.join(LAYOUTS)}.")
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a folder. {LAYOUT_HELP}")
    required = _REQUIRED[layout]
    if not (root / required).is_dir():
        raise DataError(f"{root} has no {required}/ folder: the known-healthy images every model trains on. "
                        f"{LAYOUT_HELP}")
    try:
        pattern = re.compile(subject_regex) if subject_regex else None
    except re.error as exc:
        raise ConfigError(f"data.subject_regex={subject_regex!r} is not a valid regular expression: {exc}") from exc

    records: list[ImageRecord] = []
    unparsed: list[str] = []
    has_masks: dict[str, bool] = {}
    for group, folder, label, mask_folder in _FOLDERS[layout]:
        path = root / folder
        if not path.is_dir():
            continue
        masks_dir = root / mask_folder if (mask_folder and use_masks) else None
        if masks_dir is not None and not masks_dir.is_dir():
            masks_dir = None
        missing: list[str] = []
        for p in _list_images(path, root):
            stem = strip_extension(p.name)
            rid = f"{folder}/{stem}"
            subject = subject_from_name(stem, pattern)
            if subject is None:
                subject = rid
                unparsed.append(rid)
            mask = None
            if masks_dir is not None:
                mask = masks_dir / p.name
                if not mask.is_file():
                    alt = [q for q in masks_dir.glob(stem + ".*") if is_image_name(q.name)]
                    mask = alt[0] if alt else None
                if mask is None:
                    missing.append(p.name)
            records.append(ImageRecord(p, group, label, subject, rid, folder, mask))
        if missing:
            raise DataError(f"{len(missing)} images in {path} have no mask in {masks_dir} ({', '.join(missing[:5])}); "
                            "add the masks (same file name) or set data.use_masks=false.")
        if masks_dir is not None:
            has_masks[group] = True
    if layout == "brainomaly" and not any(r.group == "mixed" for r in records):
        raise DataError(f"{root} has no unannotated mixed set (train/pos and/or train/neg_mixed); the coarse generator "
                        f"trains on it and AUCp scores it. {LAYOUT_HELP}")
    records = _label_blind(records, UNANNOTATED_GROUP[layout])
    unparsed = [r.id for r in records if r.subject == r.id]  # named as in the index (label-blind in the pool)
    return FolderIndex(root, layout, records, unparsed, has_masks)


def _content_tag(path: Path) -> str:
    """A short hash of a file's bytes: tells apart same-named images of two label folders without naming either."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _label_blind(records: list[ImageRecord], group: str) -> list[ImageRecord]:
    """``records`` with those of the unannotated ``group`` renamed and ordered so that nothing about them depends on
    which label folder holds each image (moving files between ``train/pos`` and ``train/neg_mixed`` changes only
    their ``label``):

    - id ``<split dir>/<file name without extension>`` (``train/m1__003``), not ``<label folder>/<name>``; two
      images of one name in different label folders get ``~<hash of the file's bytes>`` appended;
    - an image whose name carries no subject id is its own subject under that id;
    - ordered by (subject, id), the group placed where it sat among the others.

    Raises:
        DataError: the same image (name and bytes) in two label folders of the pool.
    """
    pool = [r for r in records if r.group == group]
    if not pool:
        return records
    base = {id(r): f"{r.folder.split('/')[0]}/{strip_extension(r.path.name)}" for r in pool}
    clashes = Counter(base.values())
    blind = []
    for r in pool:
        rid = base[id(r)]
        if clashes[rid] > 1:
            rid = f"{rid}~{_content_tag(r.path)}"
        blind.append(dataclasses.replace(r, id=rid, subject=rid if r.subject == r.id else r.subject))
    dup = [rid for rid, n in Counter(r.id for r in blind).items() if n > 1]
    if dup:
        raise DataError(f"{len(dup)} image(s) of the unannotated pool are stored twice, byte for byte, in two label "
                        f"folders (e.g. {dup[0]}); keep each image in one folder.")
    blind.sort(key=lambda r: (r.subject, r.id))
    first = next(i for i, r in enumerate(records) if r.group == group)
    others = [r for r in records if r.group != group]
    cut = sum(1 for r in records[:first] if r.group != group)
    return others[:cut] + blind + others[cut:]


def check_subject_overlap(index: FolderIndex, allow: bool = False) -> dict[str, list[str]]:
    """Subjects found in more than one group (known-healthy / mixed / val / test) -> their groups.

    In the ``bmad`` layout the mixed pool *is* the validation folder, so only known-healthy / val / test are
    compared. Raises DataError on any overlap unless ``allow`` (then it logs a warning).
    """
    groups_of: dict[str, set[str]] = defaultdict(set)
    for r in index.records:
        groups_of[r.subject].add(r.group)
    overlap = {s: sorted(g) for s, g in sorted(groups_of.items()) if len(g) > 1}
    if overlap:
        listing = "; ".join(f"{s}: {'+'.join(g)}" for s, g in list(overlap.items())[:5])
        msg = (f"{len(overlap)} subject(s) appear in more than one of {list(GROUPS)} under {index.root} ({listing}"
               f"{'; ...' if len(overlap) > 5 else ''}). Slices of one subject in two splits leak information and "
               "inflate results.")
        if not allow:
            raise DataError(msg + " Move each subject's images into one split, or set data.allow_subject_overlap=true "
                                  "to accept it (a warning then).")
        log.warning("%s Accepted because data.allow_subject_overlap=true.", msg)
    return overlap
