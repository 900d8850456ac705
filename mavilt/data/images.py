"""Image helpers shared by every source: resizing with the aspect kept, PNG encoding and decoding."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


class SkipRecord(Exception):
    """Raised by a converter for one bad input; the batch job counts ``reason`` and goes on.

    The message must never contain patient identifiers: use a fixed reason string.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


REASON_UNKNOWN_FORMAT = "not a PNG, JPEG or DICOM image"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def image_format(head: bytes) -> str | None:
    """"png", "jpeg" or "dicom" from a file's first bytes (132 suffice), None for anything else. DICOM: the
    'DICM' marker at byte 128, or a raw little-endian dataset starting at group 0x0002 or 0x0008 (old exports
    without the preamble)."""
    if head[128:132] == b"DICM":  # first: a preamble may hold anything, even another format's magic
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[:2] in (b"\x08\x00", b"\x02\x00") and len(head) >= 8:
        return "dicom"
    return None


def resize_pad(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a float image in [0, 1] so its longer side is ``size``, then pad (with 0 = black) to a square."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        pil = Image.fromarray(image.astype(np.float32), mode="F")
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        image = np.asarray(pil.resize((nw, nh), resample=resample), dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.clip(image, 0.0, 1.0)
    return out


def encode_png(image: np.ndarray, bit_depth: int = 8) -> bytes:
    """Float image in [0, 1] -> grayscale PNG bytes (8- or 16-bit)."""
    x = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if bit_depth == 8:
        pil = Image.fromarray(np.round(x * 255).astype(np.uint8), mode="L")
    elif bit_depth == 16:
        # Pillow >= 13 infers I;16 from uint16 and rejects an explicit mode for it.
        pil = Image.fromarray(np.round(x * 65535).astype(np.uint16))
    else:
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (8- or 16-bit grayscale) bytes -> float32 array in [0, 1]."""
    pil = Image.open(io.BytesIO(data))
    arr = np.asarray(pil)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.int32, np.int16):
        return arr.astype(np.float32) / 65535.0
    raise ValueError(f"unsupported PNG pixel type {arr.dtype}")


def load_image_file(path, size: int) -> np.ndarray:
    """A PNG/JPEG file or file object (any bit depth, RGB converted to gray) -> float32 [0, 1], resized and
    padded."""
    try:
        with Image.open(path) as pil:
            pil.load()
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(pil, dtype=np.float32)
                maxv = 65535.0 if arr.max() > 255 else 255.0
                arr = arr / maxv
            else:
                arr = np.asarray(pil.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SkipRecord("unreadable image file") from e
    if arr.size == 0:
        raise SkipRecord("empty image")
    return resize_pad(arr, size)
