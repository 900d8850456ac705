"""The one Parquet schema every source is converted to, and the readers every stage uses.

Layout of a prepared dataset (a local folder or a URI; see :mod:`mavilt.storage`)::

    DIR/manifest.json
    DIR/train/*.parquet   DIR/validate/*.parquet   DIR/test/*.parquet
    DIR/codes/<vqgan hash>/<split>/*.parquet   (the code cache, written by the LLM stages: mavilt.train.codes)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mavilt.data.images import decode_png
from mavilt.data.labels import OBSERVATIONS
from mavilt.errors import DatasetError
from mavilt.storage import Location, ray_read_parquet, read_parquet

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"  # written last: the dataset's publication marker
SPLITS: tuple[str, ...] = ("train", "validate", "test")

VQA_TYPE = pa.struct(
    [
        ("question", pa.string()),
        ("answer", pa.string()),
        ("type", pa.string()),
        ("choices", pa.list_(pa.string())),
    ]
)
LABELS_TYPE = pa.struct([(o, pa.int8()) for o in OBSERVATIONS])
SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("view", pa.string()),
        ("image", pa.binary()),
        ("findings", pa.string()),
        ("impression", pa.string()),
        ("labels", LABELS_TYPE),
        ("vqa", pa.list_(VQA_TYPE)),
    ]
)
COLUMNS = tuple(SCHEMA.names)


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Schema rows (dicts) -> an Arrow table with exactly :data:`SCHEMA`."""
    rows = list(rows)
    cols = {name: [r.get(name) for r in rows] for name in COLUMNS}
    cols["vqa"] = [v or [] for v in cols["vqa"]]
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def check_dataset(data_dir: str | Path | Location) -> Location:
    """Fail with one clear message when ``data_dir`` (a local folder or a URI) is not a prepared dataset.

    ``manifest.json`` is written last, so a dataset without one is being written, or its writer died."""
    d = Location.of(data_dir)
    if not d.is_dir():
        raise DatasetError(f"dataset directory {d} does not exist; create it with `python jobs/prepare.py --out {d}`")
    if not (d / MANIFEST).is_file():
        raise DatasetError(
            f"{d} has no {MANIFEST}, so it is not a prepared dataset (or preparation did not finish); "
            f"run `python jobs/prepare.py --out {d} ...`"
        )
    return d


def read_manifest(data_dir: str | Path | Location) -> dict[str, Any]:
    return json.loads((check_dataset(data_dir) / MANIFEST).read_text())


def split_files(data_dir: str | Path | Location, split: str) -> list[Location]:
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; use one of {list(SPLITS)}")
    return (check_dataset(data_dir) / split).files(".parquet")


def training_split_files(data_dir: str | Path | Location, split: str) -> list[Location]:
    """A split's files for training: an empty split is an error there."""
    files = split_files(data_dir, split)
    if not files:
        raise DatasetError(f"split '{split}' of {data_dir} has no Parquet files")
    return files


def read_table(data_dir: str | Path | Location, split: str, columns: list[str] | None = None,
               limit: int | None = None) -> pa.Table:
    """Read one split into memory (for evaluation, tests and small local work; training uses Ray Data)."""
    files = split_files(data_dir, split)
    if not files:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    tables = []
    n = 0
    for f in files:
        t = read_parquet(f, columns=columns, schema=SCHEMA if columns is None else None)
        tables.append(t)
        n += t.num_rows
        if limit is not None and n >= limit:
            break
    table = pa.concat_tables(tables)
    # Parquet files are written by parallel tasks: sort so every reader sees the same order.
    table = table.sort_by([("study_id", "ascending"), ("image_id", "ascending")]) if "image_id" in table.column_names and "study_id" in table.column_names else table
    return table.slice(0, limit) if limit is not None else table


def read_rows(data_dir: str | Path | Location, split: str, columns: list[str] | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
    return read_table(data_dir, split, columns=columns, limit=limit).to_pylist()


def ray_dataset(data_dir: str | Path | Location, split: str, columns: list[str] | None = None):
    """A Ray Data dataset over one split (read through the dataset's own filesystem)."""
    return ray_read_parquet(training_split_files(data_dir, split), columns=columns)


def images_array(png_column: Iterable[bytes]) -> np.ndarray:
    """A column of PNG bytes -> float32 array [B, 1, H, W] in [0, 1]."""
    return np.stack([decode_png(b) for b in png_column])[:, None].astype(np.float32)


def labels_array(
    labels_column: Iterable[dict[str, int | None] | None], unmentioned_negative: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """A column of label structs -> (values [B, 14] float32 with uncertain=-1 kept, known-mask [B, 14]).

    ``unmentioned_negative`` counts observations a report does not mention as negative (known, 0), as
    classifiers trained on CheXpert labels usually do; otherwise they are unknown (masked out).
    """
    rows = list(labels_column)
    values = np.zeros((len(rows), len(OBSERVATIONS)), dtype=np.float32)
    known = np.full_like(values, 1.0 if unmentioned_negative else 0.0)
    for i, lab in enumerate(rows):
        for j, o in enumerate(OBSERVATIONS):
            v = (lab or {}).get(o)
            if v is not None:
                values[i, j] = v
                known[i, j] = 1.0
    return values, known


def report_text(row: dict[str, Any], section: str) -> str:
    """The report section used for training or scoring: findings, impression, or both joined."""
    f, i = row.get("findings") or "", row.get("impression") or ""
    if section == "findings":
        return f
    if section == "impression":
        return i
    if section == "both":
        return " ".join(s for s in (f, i) if s)
    raise ValueError(f"report section must be findings, impression or both, got {section!r}")


VIEW_PREFERENCE = ("PA", "AP")


def first_studies(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Every image of the first ``n`` studies by study id: the same fixed subset in every run."""
    keep = set(sorted({str(r["study_id"]) for r in rows})[:n])
    return [r for r in rows if str(r["study_id"]) in keep]


def one_image_per_study(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Report metrics are per study: keep one image per study, preferring PA, then AP, then the first id."""
    best: dict[str, tuple[tuple[int, str], dict[str, Any]]] = {}
    for r in rows:
        view = r.get("view") or ""
        rank = VIEW_PREFERENCE.index(view) if view in VIEW_PREFERENCE else len(VIEW_PREFERENCE)
        key = (rank, r["image_id"])
        cur = best.get(r["study_id"])
        if cur is None or key < cur[0]:
            best[r["study_id"]] = (key, r)
    return [best[s][1] for s in sorted(best)]
