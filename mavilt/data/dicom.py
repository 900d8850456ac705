"""Read one chest X-ray DICOM into a float image in [0, 1] (white = dense), with no patient data leaving.

Pipeline (PS3.3 C.11 order): decode the first frame -> Modality LUT (LUT sequence or rescale slope/intercept)
-> VOI LUT (VOI LUT sequence, else window centre/width, else min-max of the frame) -> MONOCHROME1 inverted
-> resized with the aspect kept and zero-padded to a square (:func:`mavilt.data.images.resize_pad`).
The VOI LUT output is scaled by the LUT's own data range, a window by pydicom's windowing output range.
Presentation LUT Shape is not applied (MONOCHROME1 alone decides the inversion); colour images (rare
secondary captures) become luma. Only the first frame of a multi-frame object is read.

Privacy: headers carry names, birth dates, MRNs and accession numbers. Nothing read from a header leaves this
module except the normalised view (from a fixed vocabulary) and the modality (from a fixed set). Every failure
becomes :class:`SkipRecord` with a fixed reason (raised ``from None``, so no pydicom message rides along), and
pydicom's own warnings and log records, which may quote element values, are dropped while a file is read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mavilt.data.images import REASON_UNKNOWN_FORMAT, SkipRecord, image_format, load_image_file, resize_pad

log = logging.getLogger(__name__)

# Fixed skip reasons: the only strings about a bad DICOM that reach a manifest, a log line or an error.
REASON_MISSING = "image file missing"
REASON_EMPTY = "empty file"
REASON_NOT_DICOM = "not a DICOM file"
REASON_CORRUPT = "corrupt or truncated DICOM"
REASON_NO_PIXELS = "no pixel data"
REASON_MODALITY = "non-X-ray modality"
REASON_BODY_PART = "non-chest body part"
REASON_PHOTOMETRIC = "unsupported photometric interpretation"
REASON_UNKNOWN_SYNTAX = "unsupported compressed transfer syntax (no pixel decoder exists for it)"

# Projection radiography: computed (CR), digital (DX) and the non-standard but common DR. A missing modality is
# accepted (old exports often omit it); anything else (CT, MR, US, ...) is not a chest X-ray.
XRAY_MODALITIES: frozenset[str] = frozenset({"CR", "DX", "DR"})
# DICOM's modality defined terms (PS3.3 C.7.3.1.1.1), current and retired: the only values a skip reason repeats.
DICOM_MODALITIES: frozenset[str] = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR "
    "M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT "
    "RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC DS DF CF CD DD "
    "ST OPR MA MS EC".split())
CHEST_TERMS: tuple[str, ...] = ("CHEST", "THORAX", "LUNG", "TORSO")
# Rejected only when the body part clearly names something else; unknown free text is let through.
NON_CHEST_TERMS: tuple[str, ...] = (
    "ABDOMEN", "PELVIS", "HEAD", "SKULL", "BRAIN", "NECK", "FACE", "SINUS", "KNEE", "HAND", "FINGER", "FOOT",
    "TOE", "ANKLE", "HEEL", "SHOULDER", "ELBOW", "WRIST", "HIP", "SPINE", "CSPINE", "TSPINE", "LSPINE",
    "SACRUM", "COCCYX", "LEG", "ARM", "FEMUR", "TIBIA", "FIBULA", "HUMERUS", "FOREARM", "CLAVICLE",
    "EXTREMITY", "BREAST", "KUB", "JAW", "MANDIBLE", "TMJ", "ORBIT",
)

# ViewPosition (and MIMIC's metadata) -> one fixed vocabulary; anything else becomes OTHER so that free text
# never leaves the reader.
VIEWS: frozenset[str] = frozenset(
    {
        "PA", "AP", "LATERAL", "LL", "RL", "AP AXIAL", "PA AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD",
        "LLD", "RLD", "LAO", "RAO", "LPO", "RPO", "LLO", "RLO", "XTABLE LATERAL", "SWIMMERS", "LORDOTIC",
    }
)
VIEW_ALIASES: dict[str, str] = {
    "LAT": "LATERAL",
    "LATERAL VIEW": "LATERAL",
    "POSTERO ANTERIOR": "PA",
    "POSTEROANTERIOR": "PA",
    "ANTERO POSTERIOR": "AP",
    "ANTEROPOSTERIOR": "AP",
    "AP SUPINE": "AP",
    "AP ERECT": "AP",
    "AP UPRIGHT": "AP",
    "PA UPRIGHT": "PA",
    "CROSS TABLE LATERAL": "XTABLE LATERAL",
    "X TABLE LATERAL": "XTABLE LATERAL",
}
UNKNOWN_VIEW = "UNKNOWN"
OTHER_VIEW = "OTHER"

# Compressed transfer syntax -> the package whose pydicom plugin decodes it (named in the skip reason).
_DECODER_PACKAGES: dict[str, tuple[str, str]] = {
    "1.2.840.10008.1.2.4.50": ("pylibjpeg-libjpeg", "JPEG"),  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": ("pylibjpeg-libjpeg", "JPEG"),  # JPEG Extended
    "1.2.840.10008.1.2.4.57": ("pylibjpeg-libjpeg", "JPEG Lossless"),
    "1.2.840.10008.1.2.4.70": ("pylibjpeg-libjpeg", "JPEG Lossless"),
    "1.2.840.10008.1.2.4.80": ("pylibjpeg-libjpeg", "JPEG-LS"),
    "1.2.840.10008.1.2.4.81": ("pylibjpeg-libjpeg", "JPEG-LS"),
    "1.2.840.10008.1.2.4.90": ("pylibjpeg-openjpeg", "JPEG 2000"),
    "1.2.840.10008.1.2.4.91": ("pylibjpeg-openjpeg", "JPEG 2000"),
    "1.2.840.10008.1.2.4.201": ("pylibjpeg-openjpeg", "HTJ2K"),
    "1.2.840.10008.1.2.4.202": ("pylibjpeg-openjpeg", "HTJ2K"),
    "1.2.840.10008.1.2.4.203": ("pylibjpeg-openjpeg", "HTJ2K"),
    "1.2.840.10008.1.2.5": ("pylibjpeg-rle", "RLE"),
}
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom", ".dic"})


def unsupported_syntax_reason(transfer_syntax_uid: str) -> str:
    """The fixed skip reason for a compressed transfer syntax whose decoder is not installed."""
    pkg = _DECODER_PACKAGES.get(str(transfer_syntax_uid))
    if pkg is None:
        return REASON_UNKNOWN_SYNTAX
    return f"unsupported compressed transfer syntax (install {pkg[0]} for {pkg[1]})"


@dataclass
class DicomImage:
    pixels: np.ndarray  # float32 [image_size, image_size] in [0, 1], white = dense
    view: str  # normalised ViewPosition (PA, AP, LATERAL, LL, ...), "UNKNOWN" when missing, "OTHER" when odd
    modality: str  # CR, DX, DR, or "UNKNOWN" when the header has none


def normalize_view(value: object) -> str:
    """A ViewPosition-like value -> the fixed view vocabulary ("UNKNOWN" when empty, "OTHER" when unrecognised)."""
    if value is None:
        return UNKNOWN_VIEW
    if isinstance(value, float) and value != value:  # NaN from pandas
        return UNKNOWN_VIEW
    text = re.sub(r"[\s_\-]+", " ", str(value)).strip().upper()
    if not text or text in ("UNKNOWN", "NAN", "NONE"):
        return UNKNOWN_VIEW
    text = VIEW_ALIASES.get(text, text)
    return text if text in VIEWS else OTHER_VIEW


def is_dicom_file(path: str | Path) -> bool:
    """True when the file has the DICOM preamble marker, or a DICOM-ish suffix."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


# --- keeping pydicom quiet -------------------------------------------------------------------------------------

_reading = threading.local()


class _DropWhileReading(logging.Filter):
    """Drops pydicom's log records emitted inside :func:`read_dicom`: they may quote header values."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_reading, "depth", 0)


# Logger filters are not consulted for records propagated from child loggers, so every pydicom logger that
# can fire during a read gets its own filter.
_PYDICOM_LOGGERS = (
    "pydicom",
    "pydicom.pixels.decoders.base",
    "pydicom.pixels.utils",
    "pydicom.pixels.processing",
    "pydicom.pixel_data_handlers",
)
_FILTER = _DropWhileReading()
for _name in _PYDICOM_LOGGERS:
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _DropWhileReading) for f in _logger.filters):
        _logger.addFilter(_FILTER)


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    _reading.depth = getattr(_reading, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _reading.depth -= 1


# --- the reader ------------------------------------------------------------------------------------------------


def read_dicom(path: str | Path, image_size: int) -> DicomImage:
    """Read a chest X-ray DICOM; raises :class:`SkipRecord` with a fixed reason for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise SkipRecord(REASON_MISSING)
    if path.stat().st_size == 0:
        raise SkipRecord(REASON_EMPTY)
    with open(path, "rb") as f:
        head = f.read(132)
    return _read(path, head, image_size)


def read_dicom_bytes(data: bytes, image_size: int) -> DicomImage:
    """:func:`read_dicom` for a DICOM held in memory (an upload), with the same checks and fixed reasons."""
    if not data:
        raise SkipRecord(REASON_EMPTY)
    return _read(io.BytesIO(data), data[:132], image_size)


def _read(source: Path | io.BytesIO, head: bytes, image_size: int) -> DicomImage:
    reason: str | None = None
    with _quiet_pydicom():
        try:
            frame, view, modality = _read_first_frame(source, _preamble_kind(head))
            pixels = resize_pad(frame, image_size)
        except SkipRecord as e:
            reason = e.reason
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - pydicom/numpy messages may quote header values
            reason = REASON_CORRUPT
    if reason is not None:
        # Raised outside the except blocks: no chained pydicom exception (and its text) rides along.
        raise SkipRecord(reason)
    return DicomImage(pixels=pixels, view=view, modality=modality)


def _preamble_kind(head: bytes) -> bool | None:
    """From a file's first 132 bytes. True: 'DICM' at byte 128. False: no marker but the bytes start like a raw
    little-endian dataset (group 0x0008 or 0x0002). None: neither, so not DICOM."""
    if head[128:132] == b"DICM":
        return True
    return False if image_format(head) == "dicom" else None


def _read_first_frame(source: Path | io.BytesIO, kind: bool | None) -> tuple[np.ndarray, str, str]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if kind is None:
        raise SkipRecord(REASON_NOT_DICOM)
    try:
        ds = pydicom.dcmread(source, force=not kind)
    except InvalidDicomError:
        raise SkipRecord(REASON_NOT_DICOM) from None
    except Exception:  # noqa: BLE001
        raise SkipRecord(REASON_CORRUPT) from None

    modality = _clean(ds.get("Modality"))
    if modality and modality not in XRAY_MODALITIES:
        shown = modality if modality in DICOM_MODALITIES else "(not a DICOM modality code)"
        raise SkipRecord(f"{REASON_MODALITY} {shown}; accepted: {', '.join(sorted(XRAY_MODALITIES))}")
    body = _clean(ds.get("BodyPartExamined"))
    if body and not _is_chest(body) and _names_other_part(body):
        raise SkipRecord(f"{REASON_BODY_PART} ({_other_part(body)}); accepted: CHEST (or none given)")
    if "PixelData" not in ds:
        # An image module without pixels, or no SOP class at all, means the file stops early; a complete
        # object without pixels (a structured report, a presentation state) is "no pixel data".
        if "Rows" in ds or "SOPClassUID" not in ds:
            raise SkipRecord(REASON_CORRUPT)
        raise SkipRecord(REASON_NO_PIXELS)

    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        # A raw dataset without file meta: the decoder needs the encoding it was read with.
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        tsyntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = tsyntax
    if tsyntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise SkipRecord(REASON_UNKNOWN_SYNTAX) from None
        if not decoder.is_available:
            raise SkipRecord(unsupported_syntax_reason(tsyntax))

    frame = _decode_first_frame(ds)
    return _to_unit_range(frame, ds), normalize_view(ds.get("ViewPosition")), modality or "UNKNOWN"


def _is_chest(body: str) -> bool:
    return any(t in body for t in CHEST_TERMS)


def _other_part(body: str) -> str:
    """The known non-chest term the header names (only a term of our own list is ever repeated: the field is
    free text and may hold anything)."""
    words = re.findall(r"[A-Z]+", body)
    return next((t for w in words for t in NON_CHEST_TERMS if w.startswith(t)), "another body part")


def _names_other_part(body: str) -> bool:
    words = re.findall(r"[A-Z]+", body)
    return any(w.startswith(t) for w in words for t in NON_CHEST_TERMS)


def _clean(value: object) -> str:
    if value is None:
        return ""
    return re.sub(r"\s+", " ", str(value)).strip().upper()


def _decode_first_frame(ds) -> np.ndarray:
    from pydicom.pixels import pixel_array

    frames = int(ds.get("NumberOfFrames") or 1)
    # index=0 decodes only the first frame of a multi-frame file.
    arr = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    bits_alloc = int(ds.get("BitsAllocated") or bits_stored)
    if np.issubdtype(arr.dtype, np.unsignedinteger) and bits_stored < bits_alloc:
        # Unused high bits may hold overlays or garbage in old files.
        arr = arr & np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)
    return arr


_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")


def _to_unit_range(arr: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = _clean(ds.get("PhotometricInterpretation")) or "MONOCHROME2"
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim == 3 and arr.shape[-1] == 3 and photometric in _COLOUR:
            # pixel_array already converted YBR to RGB; luma, then the stored range.
            gray = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            top = float(2 ** int(ds.get("BitsStored") or 8) - 1)
            return np.clip(gray / top, 0.0, 1.0).astype(np.float32)
        raise SkipRecord(REASON_PHOTOMETRIC)
    if arr.ndim != 2:
        raise SkipRecord(REASON_CORRUPT)

    x = apply_modality_lut(arr, ds)
    has_lut = bool(ds.get("VOILUTSequence")) and all(
        ds.VOILUTSequence[0].get(k) is not None for k in ("LUTDescriptor", "LUTData")
    )
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut:
        # The VOI LUT indexes by integer input values; a rescale leaves exact integers as floats.
        if not np.issubdtype(x.dtype, np.integer):
            x = np.rint(x).astype(np.int64)
        y = apply_voi_lut(x, ds, index=0, prefer_lut=True).astype(np.float64)
        lut = np.asarray(_lut_values(ds), dtype=np.float64)
        # Normalise by the LUT's actual output range: many files declare 16 bits per entry but fill only 12.
        lo, hi = float(lut.min()), float(lut.max())
    elif has_window:
        y = apply_voi_lut(np.asarray(x, dtype=np.float64), ds, index=0, prefer_lut=True)
        lo, hi = _window_output_range(ds)
    else:
        y = np.asarray(x, dtype=np.float64)
        lo, hi = float(y.min()), float(y.max())
    if hi == lo:
        out = np.zeros(y.shape, dtype=np.float64)
    else:
        out = np.clip((y - lo) / (hi - lo), 0.0, 1.0)
    if photometric == "MONOCHROME1":  # minimum = white: invert so that white = dense everywhere
        out = 1.0 - out
    return out.astype(np.float32)


def _lut_values(ds) -> list[int]:
    """The first VOI LUT's entries (LUTData is US or OW)."""
    import struct

    item = ds.VOILUTSequence[0]
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        n = len(data) // 2
        little = True
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("TransferSyntaxUID") is not None:
            little = meta.TransferSyntaxUID.is_little_endian
        return list(struct.unpack(f"{'<' if little else '>'}{n}H", bytes(data[: 2 * n])))
    if isinstance(data, int):
        return [data]
    return list(data)


def _window_output_range(ds) -> tuple[float, float]:
    """The output range pydicom's windowing maps into (same rules as ``apply_windowing``)."""
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation") or 0) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return y_min, y_max


def read_image_any(path: str | Path, image_size: int) -> tuple[np.ndarray, str]:
    """PNG, JPEG or DICOM -> (float32 [image_size, image_size] in [0, 1], view). Non-DICOM views are UNKNOWN."""
    p = Path(path)
    if not p.exists():
        raise SkipRecord(REASON_MISSING)
    if is_dicom_file(p):
        img = read_dicom(p, image_size)
        return img.pixels, img.view
    if p.stat().st_size == 0:
        raise SkipRecord(REASON_EMPTY)
    return load_image_file(p, image_size), UNKNOWN_VIEW


def read_image_bytes(data: bytes, image_size: int) -> tuple[np.ndarray, str]:
    """An uploaded PNG, JPEG or DICOM, recognised by its content (never by a name or a declared type) ->
    (float32 [image_size, image_size] in [0, 1], view). The DICOM goes through the same reader as
    ``jobs/prepare.py``; every failure is a :class:`SkipRecord` with a fixed reason."""
    if not data:
        raise SkipRecord(REASON_EMPTY)
    kind = image_format(data)
    if kind == "dicom":
        img = read_dicom_bytes(data, image_size)
        return img.pixels, img.view
    if kind is None:
        raise SkipRecord(REASON_UNKNOWN_FORMAT)
    return load_image_file(io.BytesIO(data), image_size), UNKNOWN_VIEW
