"""A user's own data as one CSV, ``--source csv --root path/to/file.csv`` (or a folder holding ``data.csv``).

Columns (header names exact; extra columns are ignored):

- required: ``image_path`` (relative to the CSV's folder, or absolute; PNG, JPEG or DICOM), ``study_id``,
  ``split`` (train / validate / test; "val", "valid" and "validation" mean validate), ``findings``,
  ``impression`` (either may be empty);
- optional: ``view`` (PA, AP, LATERAL, ...; else the DICOM's ViewPosition, else UNKNOWN), ``image_id``
  (default: ``image_path`` as written), and any of the 14 CheXpert observation columns ("Pleural Effusion",
  ...) holding 1 / 0 / -1 / empty. Labels are used as given; observations without a column are null.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mavilt.data.dicom import UNKNOWN_VIEW, normalize_view, read_image_any
from mavilt.data.images import SkipRecord, encode_png
from mavilt.data.labels import OBSERVATIONS, labels_from_row
from mavilt.data.prepare import PrepareParams, ScanResult, Skipped
from mavilt.data.reports import normalize_whitespace
from mavilt.data.shards import SPLITS
from mavilt.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_NAME = "data.csv"
REQUIRED_COLUMNS: tuple[str, ...] = ("image_path", "study_id", "split", "findings", "impression")
SPLIT_ALIASES: dict[str, str] = {"val": "validate", "valid": "validate", "validation": "validate"}

REASON_BAD_SPLIT = "invalid split value"
REASON_BAD_LABEL = "invalid label value"
REASON_NO_STUDY = "missing study_id"
REASON_IMAGE_MISSING = "image file missing"


def csv_path(root: str | Path | None) -> Path:
    """The CSV file itself, or ``<folder>/data.csv``."""
    if not root:
        raise InputError("--source csv needs --root pointing at a CSV file (or a folder holding data.csv)")
    p = Path(root)
    if p.is_dir():
        p = p / DEFAULT_NAME
        if not p.is_file():
            raise InputError(f"{root} is a folder without {DEFAULT_NAME}; pass the CSV file itself as --root")
    elif not p.is_file():
        raise InputError(f"--root {root} does not exist; pass a CSV file (or a folder holding {DEFAULT_NAME})")
    return p


def scan(params: PrepareParams) -> ScanResult:
    import pandas as pd

    path = csv_path(params.root)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(
            f"{path} is not a readable CSV ({type(e).__name__}); save it as UTF-8 comma-separated text"
        ) from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"{path} is missing required column(s) {', '.join(missing)}; required columns: "
            f"{', '.join(REQUIRED_COLUMNS)} (optional: view, image_id, and CheXpert observation columns such as "
            f"'Pleural Effusion')"
        )
    label_cols = [o for o in OBSERVATIONS if o in df.columns]
    base = path.parent.resolve()
    skipped = Skipped()
    records: list[dict[str, Any]] = []
    for line, row in enumerate(df.to_dict(orient="records"), start=2):  # line 1 is the header
        where = f"{path.name} line {line}"
        split = str(row["split"]).strip().lower()
        split = SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            skipped.add(REASON_BAD_SPLIT, where)
            continue
        study = str(row["study_id"]).strip()
        if not study:
            skipped.add(REASON_NO_STUDY, where)
            continue
        rel = str(row["image_path"]).strip()
        if not rel:
            skipped.add(REASON_IMAGE_MISSING, where)
            continue
        try:
            labels = labels_from_row({c: row[c] for c in label_cols})
        except ValueError:
            skipped.add(REASON_BAD_LABEL, f"{where} ({rel})")
            continue
        image = Path(rel) if Path(rel).is_absolute() else base / rel
        view = normalize_view(row.get("view"))
        records.append(
            {
                "image": str(image),
                "study_id": study,
                "image_id": str(row.get("image_id") or "").strip() or rel,
                "split": split,
                "view": None if view == UNKNOWN_VIEW else view,
                "findings": normalize_whitespace(row["findings"]),
                "impression": normalize_whitespace(row["impression"]),
                "labels": labels,
            }
        )
    if params.num_samples is not None:
        records = records[: params.num_samples]
    return ScanResult(records=records, skipped=skipped)


def convert(record: dict[str, Any], params: PrepareParams) -> dict[str, Any]:
    path = Path(record["image"])
    if not path.is_file():
        raise SkipRecord(REASON_IMAGE_MISSING)
    pixels, file_view = read_image_any(path, params.image_size)
    return {
        "study_id": record["study_id"],
        "image_id": record["image_id"],
        "split": record["split"],
        "view": record.get("view") or file_view or UNKNOWN_VIEW,
        "image": encode_png(pixels, params.bit_depth),
        "findings": record.get("findings"),
        "impression": record.get("impression"),
        "labels": record["labels"],
        "vqa": [],
    }
