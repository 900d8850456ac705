"""MIMIC-CXR (DICOM release, ``--source mimic-cxr``) and MIMIC-CXR-JPG (``--source mimic-cxr-jpg``).

Expected layout under ``--root`` (the PhysioNet releases, unchanged)::

    mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split (train / validate / test)  REQUIRED
    mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, ..., ViewPosition, ...        optional (view, else DICOM's)
    mimic-cxr-2.0.0-chexpert.csv[.gz]   subject_id, study_id, 14 observations   optional (labels, else null)
    files/pXX/pSUBJECT/sSTUDY/<dicom_id>.dcm   (mimic-cxr)   or   .jpg   (mimic-cxr-jpg)
    files/pXX/pSUBJECT/sSTUDY.txt              free-text report, or the same under mimic-cxr-reports/files/

The index CSVs ship with MIMIC-CXR-JPG; for the DICOM release copy them next to ``files/``.

Conventions: ``study_id`` is MIMIC's numeric study id as a string without the "s" prefix ("50414267");
``image_id`` is the dicom_id (the file name stem). Splits come from the split file, never re-drawn. CheXpert
labels are taken as given (1 / 0 / -1 / empty), with no hierarchy rule re-applied. The view comes from the
metadata's ViewPosition, else from the DICOM header, else "UNKNOWN".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mavilt.data.dicom import UNKNOWN_VIEW, normalize_view, read_dicom
from mavilt.data.images import SkipRecord, encode_png, load_image_file
from mavilt.data.labels import OBSERVATIONS, empty_labels, labels_from_row
from mavilt.data.prepare import PrepareParams, ScanResult, Skipped
from mavilt.data.reports import split_sections
from mavilt.data.shards import SPLITS
from mavilt.errors import InputError

log = logging.getLogger(__name__)

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv"
REPORT_ROOTS = (".", "mimic-cxr-reports")  # report trees: <root>/files/... and <root>/mimic-cxr-reports/files/...

REASON_NOT_IN_SPLIT = "study missing from the split file"
REASON_IMAGE_MISSING = "image file missing"
REASON_REPORT_MISSING = "report missing"
REASON_REPORT_UNREADABLE = "unreadable report"
REASON_BAD_SPLIT = "invalid split value"
REASON_BAD_LABEL = "invalid label value"


def image_suffix(source: str) -> str:
    return ".jpg" if source == "mimic-cxr-jpg" else ".dcm"


def index_file(root: Path, name: str) -> Path | None:
    """``<root>/<name>`` or its gzipped twin."""
    for cand in (root / name, root / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def _read_csv(path: Path, required: tuple[str, ...]):
    import pandas as pd

    # Everything as text: ids keep their exact spelling, empty cells stay "".
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path} lacks column(s) {missing}; expected at least {list(required)} (the PhysioNet file)")
    return df


def subject_dir(subject_id: str) -> str:
    """files/pXX/pSUBJECT, with XX the subject id's first two digits."""
    return f"files/p{subject_id[:2]}/p{subject_id}"


def _walk_images(root: Path, suffix: str) -> dict[str, str]:
    """dicom_id -> path relative to root, for every image file under root/files."""
    found: dict[str, str] = {}
    base = root / "files"
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(suffix):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.setdefault(name[: -len(suffix)], Path(rel).as_posix())
    return found


def _find_report(root: Path, subject_id: str, study_id: str) -> str | None:
    for report_root in REPORT_ROOTS:
        rel = Path(report_root) / subject_dir(subject_id) / f"s{study_id}.txt"
        if (root / rel).is_file():
            return rel.as_posix()
    return None


def scan(params: PrepareParams) -> ScanResult:
    if not params.root:
        raise InputError(
            f"--source {params.source} needs --root pointing at the folder that holds files/ and the index CSVs"
        )
    root = Path(params.root)
    if not root.is_dir():
        raise InputError(f"--root {root} is not a directory; point it at the {params.source} release's top folder")
    split_path = index_file(root, SPLIT_FILE)
    if split_path is None:
        raise InputError(
            f"{root} has no {SPLIT_FILE} (or .csv.gz); it ships with MIMIC-CXR-JPG: copy it next to files/"
        )
    suffix = image_suffix(params.source)
    skipped = Skipped()

    split_df = _read_csv(split_path, ("dicom_id", "study_id", "subject_id", "split"))
    views: dict[str, str] = {}
    meta_path = index_file(root, METADATA_FILE)
    if meta_path is not None:
        meta = _read_csv(meta_path, ("dicom_id", "ViewPosition"))
        views = dict(zip(meta["dicom_id"], meta["ViewPosition"]))
    else:
        log.info("%s: no %s; views come from the DICOM headers (or UNKNOWN)", params.source, METADATA_FILE)
    labels_by_study: dict[str, dict[str, Any] | None] = {}
    chex_path = index_file(root, CHEXPERT_FILE)
    if chex_path is not None:
        chex = _read_csv(chex_path, ("study_id",))
        present = [o for o in OBSERVATIONS if o in chex.columns]
        for row in chex[["study_id", *present]].itertuples(index=False, name=None):
            try:
                labels_by_study[row[0]] = labels_from_row(dict(zip(present, row[1:])))
            except ValueError:
                labels_by_study[row[0]] = None  # counted per image below
    else:
        log.info("%s: no %s; labels are left empty", params.source, CHEXPERT_FILE)

    on_disk = _walk_images(root, suffix)
    in_split = set(split_df["dicom_id"])
    for d in sorted(d for d in on_disk if d not in in_split):
        skipped.add(REASON_NOT_IN_SPLIT, on_disk[d])

    records: list[dict[str, Any]] = []
    reports: dict[tuple[str, str], str | None] = {}
    for dicom_id, study_id, subject_id, split in split_df[["dicom_id", "study_id", "subject_id", "split"]].itertuples(
        index=False, name=None
    ):
        split = split.strip().lower()
        listed = f"{split_path.name}: dicom_id {dicom_id}"
        if split not in SPLITS:
            skipped.add(REASON_BAD_SPLIT, listed)
            continue
        image = on_disk.get(dicom_id)
        if image is None:
            skipped.add(REASON_IMAGE_MISSING, listed)
            continue
        key = (subject_id, study_id)
        if key not in reports:
            reports[key] = _find_report(root, subject_id, study_id)
        if reports[key] is None:
            skipped.add(REASON_REPORT_MISSING, f"{image} (no s{study_id}.txt)")
            continue
        labels = labels_by_study.get(study_id, empty_labels())
        if labels is None:
            skipped.add(REASON_BAD_LABEL, f"{image} (study {study_id} in {chex_path.name})")
            continue
        view = normalize_view(views.get(dicom_id))
        records.append(
            {
                "image": image,
                "report": reports[key],
                "study_id": study_id,
                "image_id": dicom_id,
                "split": split,
                "view": None if view == UNKNOWN_VIEW else view,
                "labels": labels,
            }
        )
    if not records and skipped[REASON_REPORT_MISSING]:
        log.warning(
            "%s: no study under %s has a report (looked in %s); MIMIC-CXR-JPG ships without reports: put the "
            "MIMIC-CXR reports tree at %s",
            params.source, root, " and ".join(f"{r}/files" for r in REPORT_ROOTS), root / "mimic-cxr-reports" / "files",
        )
    records.sort(key=lambda r: (r["study_id"], r["image_id"]))
    if params.num_samples is not None:
        records = records[: params.num_samples]
    return ScanResult(records=records, skipped=skipped)


def read_report(path: Path) -> str:
    """A report file as text; SkipRecord when it is gone or not text."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipRecord(REASON_REPORT_MISSING) from None
    except OSError:
        raise SkipRecord(REASON_REPORT_UNREADABLE) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SkipRecord(REASON_REPORT_UNREADABLE) from None
    if "\x00" in text:
        raise SkipRecord(REASON_REPORT_UNREADABLE)
    return text


def convert(record: dict[str, Any], params: PrepareParams) -> dict[str, Any]:
    root = Path(params.root or ".")
    if not record.get("report"):
        raise SkipRecord(REASON_REPORT_MISSING)
    sections = split_sections(read_report(root / record["report"]))
    path = root / record["image"]
    if not path.is_file():
        raise SkipRecord(REASON_IMAGE_MISSING)
    view = record.get("view")
    if path.suffix.lower() == ".dcm":
        img = read_dicom(path, params.image_size)
        pixels, view = img.pixels, view or img.view
    else:
        pixels = load_image_file(path, params.image_size)
    return {
        "study_id": str(record["study_id"]),
        "image_id": str(record["image_id"]),
        "split": record["split"],
        "view": view or UNKNOWN_VIEW,
        "image": encode_png(pixels, params.bit_depth),
        "findings": sections.findings,
        "impression": sections.impression,
        "labels": dict(record.get("labels") or empty_labels()),
        "vqa": [],
    }
