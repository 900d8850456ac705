"""Builders for small, format-exact fake trees: DICOMs written with pydicom, MIMIC-CXR(-JPG) index CSVs and
report files, OpenI XML reports, and a user CSV. Everything is synthetic; PHI values are distinctive strings
that tests search for in every output byte."""

from __future__ import annotations

import csv
import gzip
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mavilt.data.labels import OBSERVATIONS

# Distinctive identifiers: none of them may ever appear in a shard, manifest, log line or error message.
PHI: dict[str, str] = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-99887766",
    "PatientBirthDate": "19450312",
    "AccessionNumber": "ACC-5544332211",
    "InstitutionName": "Mercy General",
    "ReferringPhysicianName": "House^Greg",
}
# What to search for in outputs (PN components also on their own).
PHI_NEEDLES: tuple[str, ...] = tuple(PHI.values()) + ("Jane", "Greg", "99887766", "5544332211", "Mercy")

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def quadrants(h: int, w: int, bg: float, hi: float, mid: float, dtype=np.uint16) -> np.ndarray:
    """Background ``bg``, a bright square top-left (``hi``) and a mid-grey square bottom-right (``mid``)."""
    a = np.full((h, w), bg, dtype=np.float64)
    a[: h // 2, : w // 2] = hi
    a[h // 2 :, w // 2 :] = mid
    return a.astype(dtype)


def quadrant_values(img: np.ndarray) -> dict[str, float]:
    """Pixel values at the centres of the four quadrants of a square output image."""
    s = img.shape[0]
    q, t = s // 4, 3 * s // 4
    return {"tl": float(img[q, q]), "tr": float(img[q, t]), "bl": float(img[t, q]), "br": float(img[t, t])}


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str | None = "DX",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    voi_lut: tuple[list[int], list[int]] | None = None,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    compress: str | None = None,
    transfer_syntax: str | None = None,
    encapsulated: list[bytes] | None = None,
    phi: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one DICOM (explicit VR little endian unless compressed) with PHI tags filled in."""
    # Some tests write deliberately invalid values; pydicom's warnings about them are expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _write_dicom(path, pixels, photometric=photometric, bits_stored=bits_stored, modality=modality,
                            body_part=body_part, view=view, voi_lut=voi_lut, window=window, rescale=rescale,
                            compress=compress, transfer_syntax=transfer_syntax, encapsulated=encapsulated, phi=phi,
                            extra=extra)


def _write_dicom(path, pixels, *, photometric, bits_stored, modality, body_part, view, voi_lut, window, rescale,
                 compress, transfer_syntax, encapsulated, phi, extra) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = CT_STORAGE if modality == "CT" else DX_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if phi:
        for k, v in PHI.items():
            setattr(ds, k, v)
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    for k, v in (extra or {}).items():
        setattr(ds, k, v)

    if pixels is not None and encapsulated is None:
        arr = np.asarray(pixels)
        bits = bits_stored or arr.dtype.itemsize * 8
        ds.set_pixel_data(arr, photometric, bits)
    elif encapsulated is not None:
        arr = np.asarray(pixels)
        ds.Rows, ds.Columns = arr.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = arr.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if arr.ndim == 3:
            ds.NumberOfFrames = arr.shape[0]
        ds.PixelData = encapsulate(encapsulated)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        descriptor, data = voi_lut
        item = Dataset()
        item.add_new(0x00283002, "US", list(descriptor))  # LUT Descriptor
        item.add_new(0x00283006, "US", list(data))  # LUT Data
        ds.VOILUTSequence = [item]
    if compress is not None:
        ds.compress(compress, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_bytes(img8: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img8.astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)  # uint8 -> L, uint16 -> I;16
    return path


def write_jpg(path: Path, img8: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(img8))
    return path


# --- MIMIC-CXR ---------------------------------------------------------------------------------------------------

MIMIC_REPORT_NORMAL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

MIMIC_REPORT_EFFUSION = """                                 FINAL REPORT
 HISTORY:  ___-year-old male with shortness of breath.

 FINDINGS:  Moderate right pleural effusion with adjacent atelectasis.  Mild
 cardiomegaly.  No pneumothorax.

 IMPRESSION:  Moderate right pleural effusion.  Possible pneumonia cannot be
 excluded.
"""

MIMIC_REPORT_IMPRESSION_ONLY = """                                 FINAL REPORT
 INDICATION:  Intubated patient.

 IMPRESSION:

 Endotracheal tube terminates 4 cm above the carina.  Lungs are clear.
"""

MIMIC_REPORT_FI = """ FINAL REPORT
 FINDINGS AND IMPRESSION:  Portable AP view of the chest. No pneumothorax.
 Stable left PICC line.
"""

CHEXPERT_ROWS: dict[str, dict[str, float | None]] = {
    "normal": {"No Finding": 1.0},
    "effusion": {"Pleural Effusion": 1.0, "Atelectasis": 1.0, "Cardiomegaly": 1.0, "Pneumonia": -1.0, "Pneumothorax": 0.0},
    "tube": {"Support Devices": 1.0, "No Finding": 1.0},
    "fi": {"Pneumothorax": 0.0, "Support Devices": 1.0},
}


def mimic_paths(root: Path, subject: int, study: int, dicom_id: str, ext: str) -> tuple[Path, Path]:
    sdir = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}"
    return sdir / f"s{study}" / f"{dicom_id}{ext}", sdir / f"s{study}.txt"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]], gz: bool = False) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    data = buf.getvalue().encode()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def did(n: int) -> str:
    """A MIMIC-style dicom_id (five dash-separated hex groups)."""
    h = f"{n:08x}"
    return f"{h}-bde0afdd-112c0b34-7bc16630-4e38{n:04x}"


def build_mimic_tree(root: Path, kind: str = "dicom", size: int = 64) -> dict[str, Any]:
    """A MIMIC-CXR (kind='dicom') or MIMIC-CXR-JPG (kind='jpg') tree; returns what a test should expect.

    Studies (subject 10000032 unless noted):
      s50000001 train    two images: PA (MONOCHROME2 16-bit, min-max) and LATERAL (MONOCHROME1)
      s50000002 validate VOI LUT sequence (nonlinear) ; s50000003 test: rescale + window
      s50000004 train    RLE Lossless and JPEG baseline images (dicom only)
      s50000005 train    bad inputs: corrupt, empty, not-DICOM, CT, knee, no pixel data, HTJ2K (dicom only)
      s50000006 train    report missing; s50000007 train: unreadable report
      s50000008          on disk but not in the split file; one split row has no image file
    """
    ext = ".dcm" if kind == "dicom" else ".jpg"
    subj = 10000032
    reports_root = root if kind == "dicom" else root / "mimic-cxr-reports"
    split_rows: list[list[Any]] = []
    meta_rows: list[list[Any]] = []
    chex_rows: list[list[Any]] = []
    expect: dict[str, Any] = {"images": {}, "skipped": {}}
    pattern = quadrants(size, size, bg=1000, hi=60000, mid=30000)
    n = 0

    def add(study: int, split: str | None, view: str | None, writer, key: str, meta_view: str | None = "same") -> str:
        nonlocal n
        n += 1
        dicom_id = did(n)
        img_path, _ = mimic_paths(root, subj, study, dicom_id, ext)
        if writer is not None:
            writer(img_path)
        if split is not None:
            split_rows.append([dicom_id, study, subj, split])
        mv = view if meta_view == "same" else meta_view
        meta_rows.append([dicom_id, subj, study, "CHEST (PA AND LAT)", mv, size, size, 21800101, 120000.0,
                          "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
        expect["images"][key] = {"dicom_id": dicom_id, "study": str(study), "split": split, "path": img_path}
        return dicom_id

    def report(study: int, text: str | bytes | None) -> None:
        _, rpt = mimic_paths(reports_root, subj, study, "x", ext)
        if text is None:
            return
        rpt.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            rpt.write_bytes(text)
        else:
            rpt.write_text(text)

    def chex(study: int, name: str) -> None:
        vals = CHEXPERT_ROWS[name]
        chex_rows.append([subj, study] + [vals.get(o) for o in OBSERVATIONS])

    def dcm(**kw):
        return lambda p: write_dicom(p, kw.pop("pixels", pattern), **kw)

    def jpg(img8: np.ndarray):
        return lambda p: write_jpg(p, img8)

    p8 = (pattern.astype(np.float64) / 65535 * 255).round().astype(np.uint8)
    if kind == "dicom":
        add(50000001, "train", "PA", dcm(view="PA"), "pa")
        add(50000001, "train", "LATERAL", dcm(view="LATERAL", photometric="MONOCHROME1"), "lat_mono1")
        # 12-bit stored values through a nonlinear (squared) 16-bit VOI LUT.
        lut = [round(65535 * (i / 4095) ** 2) for i in range(4096)]
        add(50000002, "validate", "AP", dcm(pixels=quadrants(size, size, 100, 4000, 2000), bits_stored=12,
                                            voi_lut=([4096, 0, 16], lut), view="AP"), "voi")
        # x = 2*s - 1024, window centre 1000 width 2000: s=200 -> 0, s=1012 -> ~0.5, s=2000 -> 1.
        add(50000003, "test", None, dcm(pixels=quadrants(size, size, 200, 2000, 1012), bits_stored=12,
                                       rescale=(2.0, -1024.0), window=(1000.0, 2000.0), view="AP"), "window",
            meta_view=None)
        add(50000004, "train", "PA", dcm(compress="1.2.840.10008.1.2.5"), "rle")
        add(50000004, "train", "PA", dcm(pixels=p8, encapsulated=[jpeg_bytes(p8)],
                                         transfer_syntax="1.2.840.10008.1.2.4.50"), "jpeg")
        add(50000005, "train", "PA", lambda p: _truncated(p, pattern), "corrupt")
        add(50000005, "train", "PA", lambda p: _touch(p), "empty")
        add(50000005, "train", "PA", lambda p: _text(p), "not_dicom")
        add(50000005, "train", "PA", dcm(modality="CT", body_part="CHEST"), "ct")
        add(50000005, "train", "PA", dcm(body_part="KNEE"), "knee")
        add(50000005, "train", "PA", lambda p: write_dicom(p, None), "no_pixels")
        expect["skipped"].update({"corrupt or truncated DICOM": 1, "empty file": 1, "not a DICOM file": 1,
                                  "non-X-ray modality CT; accepted: CR, DR, DX": 1,
                                  "non-chest body part (KNEE); accepted: CHEST (or none given)": 1, "no pixel data": 1})
        # HTJ2K: no decoder plugin is installed by default, so the reason names the package to install.
        from pydicom.pixels import get_decoder

        htj2k = "1.2.840.10008.1.2.4.201"
        add(50000005, "train", "PA", dcm(pixels=p8, encapsulated=[b"\xff\x4f\xff\x51" + bytes(64)],
                                         transfer_syntax=htj2k), "htj2k")
        if get_decoder(htj2k).is_available:  # then the junk codestream fails to decode
            expect["skipped"]["corrupt or truncated DICOM"] += 1
        else:
            expect["skipped"]["unsupported compressed transfer syntax (install pylibjpeg-openjpeg for HTJ2K)"] = 1
    else:
        add(50000001, "train", "PA", jpg(p8), "pa")
        add(50000001, "train", "LATERAL", jpg(p8[:, ::-1].copy()), "lat_mono1")
        add(50000002, "validate", "AP", jpg(p8), "voi")
        add(50000003, "test", None, jpg(p8), "window", meta_view=None)
    add(50000006, "train", "PA", dcm() if kind == "dicom" else jpg(p8), "no_report")
    add(50000007, "train", "PA", dcm() if kind == "dicom" else jpg(p8), "bad_report")
    add(50000008, None, "PA", dcm() if kind == "dicom" else jpg(p8), "not_in_split")
    add(50000001, "train", "PA", None, "missing_image")
    expect["skipped"].update({"report missing": 1, "unreadable report": 1, "study missing from the split file": 1,
                              "image file missing": 1})

    report(50000001, MIMIC_REPORT_NORMAL)
    report(50000002, MIMIC_REPORT_EFFUSION)
    report(50000003, MIMIC_REPORT_IMPRESSION_ONLY)
    report(50000004, MIMIC_REPORT_FI)
    report(50000005, MIMIC_REPORT_NORMAL)
    report(50000007, b"\xff\xfe\x00\xd8 binary garbage \x80\x81")
    report(50000008, MIMIC_REPORT_NORMAL)
    chex(50000001, "normal")
    chex(50000002, "effusion")
    chex(50000003, "tube")
    chex(50000004, "fi")

    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True)
    _write_csv(
        root / "mimic-cxr-2.0.0-metadata.csv",
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
         "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
         "PatientOrientationCodeSequence_CodeMeaning"],
        meta_rows,
    )
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *OBSERVATIONS], chex_rows)
    return expect


def _truncated(path: Path, pattern: np.ndarray) -> None:
    write_dicom(path, pattern)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is a text file pretending to be a DICOM\n" * 10)


# --- IU X-ray (OpenI) --------------------------------------------------------------------------------------------

OPENI_TEMPLATE = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="{uid}"/>
   <pmcId id="{n}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{n}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">XXXX-year-old with cough</AbstractText>
            {findings}
            {impression}
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
      {mesh}
   </MeSH>
   {images}
</eCitation>
"""


def openi_xml(n: int, findings: str | None, impression: str | None, image_ids: list[str],
              major: list[str] = (), minor: list[str] = ()) -> str:
    def abstract(label: str, text: str | None) -> str:
        if text is None:
            return f'<AbstractText Label="{label}"/>'
        return f'<AbstractText Label="{label}">{text}</AbstractText>'

    images = "\n   ".join(
        f'<parentImage id="{i}">\n      <figureId>F{k + 1}</figureId>\n      <caption>Xray Chest PA and Lateral</caption>\n'
        f"      <panel type=\"single\"><url>/hadoop/storage/radiology/extract/{i}.jpg</url></panel>\n   </parentImage>"
        for k, i in enumerate(image_ids)
    )
    mesh = "".join(f"<major>{m}</major>" for m in major) + "".join(f"<minor>{m}</minor>" for m in minor)
    return OPENI_TEMPLATE.format(uid=f"CXR{n}", n=n, findings=abstract("FINDINGS", findings),
                                 impression=abstract("IMPRESSION", impression), mesh=mesh, images=images)


def build_iu_tree(root: Path, size: int = 48, n_reports: int = 12) -> dict[str, Any]:
    """OpenI-shaped XMLs under ecgen-radiology/ and PNGs under NLMCXR_png/; plus three bad inputs."""
    xml_dir, png_dir = root / "ecgen-radiology", root / "NLMCXR_png"
    xml_dir.mkdir(parents=True)
    png_dir.mkdir(parents=True)
    img = (quadrants(size, size, 10, 250, 128, dtype=np.uint8))
    expect: dict[str, Any] = {"reports": {}, "images": 0}
    for n in range(1, n_reports + 1):
        ids = [f"CXR{n}_IM-{n:04d}-1001", f"CXR{n}_IM-{n:04d}-2001"][: 1 + n % 2]
        findings = None if n % 5 == 0 else f"The heart is normal in size.  The lungs are   clear. XXXX {n}."
        impression = f"No acute disease {n}."
        (xml_dir / f"{n}.xml").write_text(
            openi_xml(n, findings, impression, ids, major=["normal"] if n % 3 else ["Cardiomegaly/mild"],
                      minor=["Opacity/lung/base/left"] if n % 4 == 0 else [])
        )
        for i in ids:
            write_png(png_dir / f"{i}.png", img)
        expect["reports"][f"CXR{n}"] = {"ids": ids, "findings": findings, "impression": impression}
        expect["images"] += len(ids)
    # Bad inputs: malformed XML, a report without images, a report whose image is not on disk.
    (xml_dir / "9001.xml").write_text("<eCitation><uId id='CXR9001'/><MedlineCitation>")
    (xml_dir / "9002.xml").write_text(openi_xml(9002, "Clear lungs.", "Normal.", []))
    (xml_dir / "9003.xml").write_text(openi_xml(9003, "Clear lungs.", "Normal.", ["CXR9003_IM-9003-1001"]))
    expect["skipped"] = {"unreadable report": 1, "no images in report": 1, "image file missing": 1}
    return expect


# --- user CSV ----------------------------------------------------------------------------------------------------


def build_csv_tree(root: Path, size: int = 48) -> dict[str, Any]:
    """data.csv with PNG, JPEG and DICOM images (relative paths), labels for some rows, one bad split value."""
    img8 = quadrants(size, size, 10, 250, 128, dtype=np.uint8)
    write_png(root / "imgs" / "a.png", img8)
    write_png(root / "imgs" / "b16.png", quadrants(size, size, 1000, 64000, 30000))
    write_jpg(root / "imgs" / "c.jpg", img8)
    write_dicom(root / "imgs" / "d.dcm", quadrants(size, size, 1000, 60000, 30000), photometric="MONOCHROME1",
                view="AP")
    write_png(root / "imgs" / "e.png", img8)
    header = ["image_path", "study_id", "split", "findings", "impression", "view", "Cardiomegaly", "Edema",
              "No Finding"]
    rows = [
        ["imgs/a.png", "st1", "train", "Heart size normal.\n Lungs clear.", "Normal chest.", "PA", "0", "", "1"],
        ["imgs/b16.png", "st1", "train", "Heart size normal.", "Normal chest.", "LATERAL", "0", "", "1"],
        ["imgs/c.jpg", "st2", "validate", "Enlarged heart.", "Cardiomegaly.", "", "1", "-1", ""],
        ["imgs/d.dcm", "st3", "test", "", "Edema.", "", "", "1", ""],
        ["imgs/e.png", "st4", "holdout", "x", "y", "PA", "", "", ""],
        ["imgs/missing.png", "st5", "train", "x", "y", "PA", "", "", ""],
    ]
    _write_csv(root / "data.csv", header, rows)
    return {"skipped": {"invalid split value": 1, "image file missing": 1}}
