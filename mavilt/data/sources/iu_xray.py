"""IU X-ray (OpenI / Indiana University chest X-ray collection), ``--source iu-xray``.

Expected layout under ``--root``::

    ecgen-radiology/<n>.xml     one report per study (OpenI XML: uId, AbstractText Label=FINDINGS/IMPRESSION,
                                MeSH major/minor, one parentImage per image)
    NLMCXR_png/<parentImage id>.png

Conventions:

- ``study_id`` is the report's uId ("CXR1"), ``image_id`` the parentImage id ("CXR1_1_IM-0001-3001").
- The split is drawn per study, deterministically: a hash of (seed, uId) falls into one of the buckets given by
  ``split_fractions``, so every image of a study lands in the same split and a re-run draws the same split.
- IU has no per-image view field (captions say "PA and Lateral" for both images of a study), so the view is
  "UNKNOWN"; nothing is guessed from image content.
- IU has no CheXpert labels: every label is null. MeSH terms are parsed (:func:`parse_openi_xml`) but not mapped.
- Texts are kept as written (whitespace normalised), including the "XXXX" anonymisation tokens.
"""

from __future__ import annotations

import hashlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mavilt.data.dicom import UNKNOWN_VIEW
from mavilt.data.images import SkipRecord, encode_png, load_image_file
from mavilt.data.labels import empty_labels
from mavilt.data.prepare import PrepareParams, ScanResult, Skipped
from mavilt.data.reports import normalize_whitespace
from mavilt.data.shards import SPLITS
from mavilt.errors import InputError

log = logging.getLogger(__name__)

REPORTS_DIR = "ecgen-radiology"
IMAGES_DIR = "NLMCXR_png"

REASON_REPORT_UNREADABLE = "unreadable report"
REASON_IMAGE_MISSING = "image file missing"
REASON_NO_IMAGES = "no images in report"


def parse_openi_xml(path: str | Path) -> dict[str, Any]:
    """One OpenI report -> {uid, findings, impression, indication, comparison, image_ids, mesh}.

    ``mesh`` is {"major": [...], "minor": [...], "automatic": [...]}.

    Missing or empty sections are None. Raises ValueError (naming the file) when the XML is malformed or has
    no uId.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable OpenI report XML ({type(e).__name__})") from None
    uid_el = root.find("uId")
    uid = (uid_el.get("id") or "").strip() if uid_el is not None else ""
    if not uid:
        raise ValueError(f"{path}: OpenI report has no <uId id=...>")
    sections: dict[str, str | None] = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").strip().upper()
        text = normalize_whitespace("".join(el.itertext()))
        if label and text:
            prev = sections.get(label)
            sections[label] = f"{prev} {text}" if prev else text
    image_ids = []
    for el in root.findall("parentImage"):
        iid = (el.get("id") or "").strip()
        if iid and iid not in image_ids:
            image_ids.append(iid)
    # The released XMLs use <major> (MeSH-like terms) and <automatic> (MTI-extracted); <minor> is kept for
    # other OpenI dumps.
    mesh: dict[str, list[str]] = {"major": [], "minor": [], "automatic": []}
    mesh_el = root.find("MeSH")
    if mesh_el is not None:
        for kind in mesh:
            mesh[kind] = [t for t in (normalize_whitespace(e.text) for e in mesh_el.findall(kind)) if t]
    return {
        "uid": uid,
        "findings": sections.get("FINDINGS"),
        "impression": sections.get("IMPRESSION"),
        "indication": sections.get("INDICATION"),
        "comparison": sections.get("COMPARISON"),
        "image_ids": image_ids,
        "mesh": mesh,
    }


def _report_files(directory: Path) -> list[Path]:
    def key(p: Path) -> tuple[int, str]:
        return (int(p.stem), p.name) if p.stem.isdigit() else (1 << 62, p.name)

    return sorted(directory.glob("*.xml"), key=key)


def reports_dir(root: str | Path) -> Path:
    """``<root>/ecgen-radiology``, or root itself when it already holds the XML files."""
    root = Path(root)
    sub = root / REPORTS_DIR
    if sub.is_dir():
        return sub
    if root.is_dir() and any(root.glob("*.xml")):
        return root
    raise InputError(f"{root} has no {REPORTS_DIR}/ folder of OpenI report XMLs; point --root at the IU X-ray folder")


def iter_openi_reports(directory: str | Path) -> Iterator[dict[str, Any]]:
    """Parsed reports of every ``*.xml`` in ``directory`` (numeric file order); unreadable files are logged and
    skipped (used for text pretraining, where one bad file should not stop the corpus)."""
    for path in _report_files(Path(directory)):
        try:
            yield parse_openi_xml(path)
        except ValueError as e:
            log.warning("skipping %s", e)


def assign_split(uid: str, seed: int, fractions: list[float]) -> str:
    """Deterministic split for a study: sha256(seed, uid) -> a number in [0, 1) -> cumulative fraction buckets."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise InputError(
            f"split_fractions must be {len(SPLITS)} non-negative numbers (train, validate, test), got {fractions}"
        )
    h = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    total, acc = float(sum(fractions)), 0.0
    for split, f in zip(SPLITS, fractions):
        acc += f / total
        if u < acc:
            return split
    return SPLITS[[i for i, f in enumerate(fractions) if f > 0][-1]]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def scan(params: PrepareParams) -> ScanResult:
    if not params.root:
        raise InputError(
            "--source iu-xray needs --root pointing at the folder holding ecgen-radiology/ and NLMCXR_png/"
        )
    root = Path(params.root)
    xml_dir = reports_dir(root)
    image_dir = root / IMAGES_DIR
    if not image_dir.is_dir():
        raise InputError(f"{root} has no {IMAGES_DIR}/ folder; unpack NLMCXR_png.tgz there")
    on_disk = {p.stem for p in image_dir.glob("*.png")}
    skipped = Skipped()
    records: list[dict[str, Any]] = []
    for path in _report_files(xml_dir):
        where = _relative(path, root)
        try:
            rep = parse_openi_xml(path)
        except ValueError:
            skipped.add(REASON_REPORT_UNREADABLE, where)
            continue
        if not rep["image_ids"]:
            skipped.add(REASON_NO_IMAGES, where)
            continue
        split = assign_split(rep["uid"], params.seed, params.split_fractions)
        for iid in rep["image_ids"]:
            if iid not in on_disk:
                skipped.add(REASON_IMAGE_MISSING, f"{IMAGES_DIR}/{iid}.png (named by {where})")
                continue
            records.append(
                {
                    "image": f"{IMAGES_DIR}/{iid}.png",
                    "study_id": rep["uid"],
                    "image_id": iid,
                    "split": split,
                    "findings": rep["findings"],
                    "impression": rep["impression"],
                }
            )
    records.sort(key=lambda r: (r["study_id"], r["image_id"]))
    if params.num_samples is not None:
        records = records[: params.num_samples]
    return ScanResult(records=records, skipped=skipped)


def convert(record: dict[str, Any], params: PrepareParams) -> dict[str, Any]:
    path = Path(params.root or ".") / record["image"]
    if not path.is_file():
        raise SkipRecord(REASON_IMAGE_MISSING)
    pixels = load_image_file(path, params.image_size)
    return {
        "study_id": str(record["study_id"]),
        "image_id": str(record["image_id"]),
        "split": record["split"],
        "view": UNKNOWN_VIEW,
        "image": encode_png(pixels, params.bit_depth),
        "findings": record.get("findings") or None,
        "impression": record.get("impression") or None,
        "labels": empty_labels(),
        "vqa": [],
    }
