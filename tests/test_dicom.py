"""The DICOM reader: intensities (modality LUT, VOI LUT, window, min-max, MONOCHROME1), orientation, bit depths,
frames, compression, fixed skip reasons, and that no patient identifier ever leaves it."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from fixtures_sources import (
    PHI_NEEDLES,
    _text,
    _touch,
    _truncated,
    jpeg_bytes,
    quadrant_values,
    quadrants,
    write_dicom,
    write_jpg,
    write_png,
)

from mavilt.data.dicom import (
    DicomImage,
    normalize_view,
    read_dicom,
    read_dicom_bytes,
    read_image_any,
    read_image_bytes,
    unsupported_syntax_reason,
)
from mavilt.data.images import SkipRecord

S = 32  # output size; sources are 64x64 so quadrant centres sit well inside flat regions after resampling


def pattern16() -> np.ndarray:
    return quadrants(64, 64, bg=1000, hi=60000, mid=30000)


def test_dicom_image_has_only_pixels_view_modality():
    assert [f.name for f in dataclasses.fields(DicomImage)] == ["pixels", "view", "modality"]


def test_orientation_and_min_max(tmp_path):
    img = read_dicom(write_dicom(tmp_path / "a.dcm", pattern16()), S)
    assert img.pixels.shape == (S, S) and img.pixels.dtype == np.float32
    q = quadrant_values(img.pixels)
    # The bright square drawn top-left stays top-left; min-max maps background to 0 and the square to 1.
    assert q["tl"] == pytest.approx(1.0, abs=1e-3)
    assert q["tr"] == pytest.approx(0.0, abs=1e-3) and q["bl"] == pytest.approx(0.0, abs=1e-3)
    assert q["br"] == pytest.approx((30000 - 1000) / 59000, abs=2e-3)
    assert img.view == "PA" and img.modality == "DX"
    assert 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0


def test_monochrome1_is_inverted(tmp_path):
    img = read_dicom(write_dicom(tmp_path / "m1.dcm", pattern16(), photometric="MONOCHROME1", view="LATERAL"), S)
    q = quadrant_values(img.pixels)
    assert q["tl"] == pytest.approx(0.0, abs=1e-3)  # highest stored value = darkest in MONOCHROME1
    assert q["tr"] == pytest.approx(1.0, abs=1e-3)
    assert q["br"] == pytest.approx(1 - (30000 - 1000) / 59000, abs=2e-3)
    assert img.view == "LATERAL"


def test_voi_lut_sequence_is_applied(tmp_path):
    # 12-bit values through a squared 16-bit LUT: min-max would give 0.487 for the mid square, the LUT 0.2385.
    lut = [round(65535 * (i / 4095) ** 2) for i in range(4096)]
    p = write_dicom(tmp_path / "voi.dcm", quadrants(64, 64, 100, 4000, 2000), bits_stored=12,
                    voi_lut=([4096, 0, 16], lut), window=(2048.0, 4096.0))  # LUT preferred over the window
    q = quadrant_values(read_dicom(p, S).pixels)
    assert q["tl"] == pytest.approx((4000 / 4095) ** 2, abs=2e-3)
    assert q["br"] == pytest.approx((2000 / 4095) ** 2, abs=2e-3)
    assert q["tr"] == pytest.approx((100 / 4095) ** 2, abs=2e-3)


def test_voi_lut_output_range_is_the_lut_range(tmp_path):
    # Declares 16 bits per entry but fills only 0..4095 (common in the wild): normalise by the data's range.
    lut = list(range(4096))
    p = write_dicom(tmp_path / "voi12.dcm", quadrants(64, 64, 0, 4095, 1024), bits_stored=12,
                    voi_lut=([4096, 0, 16], lut))
    q = quadrant_values(read_dicom(p, S).pixels)
    assert q["tl"] == pytest.approx(1.0, abs=2e-3) and q["br"] == pytest.approx(1024 / 4095, abs=2e-3)


def test_rescale_then_window(tmp_path):
    # x = 2*s - 1024; window centre 1000, width 2000 (LINEAR): s=200 -> below -> 0, s=2000 -> above -> 1,
    # s=1012 -> x=1000 -> (1000-999.5)/1999 + 0.5.
    p = write_dicom(tmp_path / "win.dcm", quadrants(64, 64, 200, 2000, 1012), bits_stored=12,
                    rescale=(2.0, -1024.0), window=(1000.0, 2000.0))
    q = quadrant_values(read_dicom(p, S).pixels)
    assert q["tr"] == pytest.approx(0.0, abs=1e-3)
    assert q["tl"] == pytest.approx(1.0, abs=1e-3)
    assert q["br"] == pytest.approx(0.5 / 1999 + 0.5, abs=2e-3)


def test_window_cuts_the_range(tmp_path):
    # No rescale: window 1000..3000 on 16-bit data; 2000 sits in the middle, 500 below, 60000 above.
    p = write_dicom(tmp_path / "w.dcm", quadrants(64, 64, 500, 60000, 2000), window=(2000.0, 2000.0))
    q = quadrant_values(read_dicom(p, S).pixels)
    assert q["tr"] == pytest.approx(0.0, abs=1e-3) and q["tl"] == pytest.approx(1.0, abs=1e-3)
    assert q["br"] == pytest.approx((2000 - 1999.5) / 1999 + 0.5, abs=2e-3)


@pytest.mark.parametrize(
    "dtype,bits,bg,hi,mid",
    [
        (np.uint8, 8, 10, 250, 130),
        (np.uint16, 10, 10, 1000, 505),
        (np.uint16, 12, 0, 4095, 2048),
        (np.uint16, 14, 100, 16000, 8050),
        (np.int16, 12, -2000, 2000, 0),
        (np.int16, 16, -30000, 30000, 0),
    ],
)
def test_any_bits_stored_signed_or_not(tmp_path, dtype, bits, bg, hi, mid):
    p = write_dicom(tmp_path / "b.dcm", quadrants(64, 64, bg, hi, mid, dtype=dtype), bits_stored=bits)
    q = quadrant_values(read_dicom(p, S).pixels)
    assert q["tl"] == pytest.approx(1.0, abs=1e-3) and q["tr"] == pytest.approx(0.0, abs=1e-3)
    assert q["br"] == pytest.approx((mid - bg) / (hi - bg), abs=3e-3)


def test_signed_window_range(tmp_path):
    # Signed 12-bit, window over the whole signed range: y range is [-2048, 2047], output = window fraction.
    p = write_dicom(tmp_path / "sw.dcm", quadrants(64, 64, -2048, 2047, 0, dtype=np.int16), bits_stored=12,
                    window=(0.0, 4096.0))
    q = quadrant_values(read_dicom(p, S).pixels)
    assert q["br"] == pytest.approx((0 + 0.5) / 4095 + 0.5, abs=2e-3)
    assert q["tr"] == pytest.approx(0.0, abs=1e-3) and q["tl"] == pytest.approx(1.0, abs=1e-3)


def test_unused_high_bits_are_masked(tmp_path):
    import pydicom

    p = write_dicom(tmp_path / "hb.dcm", quadrants(64, 64, 0, 4095, 2048), bits_stored=12)
    ds = pydicom.dcmread(p)
    arr = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    arr[::7] |= 0xF000  # overlay bits above BitsStored
    ds.PixelData = arr.tobytes()
    ds.save_as(p)
    q = quadrant_values(read_dicom(p, S).pixels)
    assert q["tl"] == pytest.approx(1.0, abs=1e-3) and q["br"] == pytest.approx(2048 / 4095, abs=3e-3)


def test_multiframe_uses_first_frame(tmp_path):
    first = pattern16()
    frames = np.stack([first, first[::-1, ::-1].copy(), np.zeros_like(first)])
    img = read_dicom(write_dicom(tmp_path / "mf.dcm", frames), S)
    q = quadrant_values(img.pixels)
    assert q["tl"] == pytest.approx(1.0, abs=1e-3) and q["br"] < 0.6


def test_non_square_is_padded_with_aspect_kept(tmp_path):
    a = np.full((48, 64), 60000, dtype=np.uint16)  # all bright, wider than tall
    a[0, 0] = 0  # so min-max has a range
    px = read_dicom(write_dicom(tmp_path / "ns.dcm", a), S).pixels
    # 48x64 -> 24x32, centred vertically: 4 black rows above and below, bright rows in between.
    assert np.all(px[:4] == 0) and np.all(px[-4:] == 0)
    assert px[16, 16] == pytest.approx(1.0, abs=1e-3)


def test_rle_lossless_matches_uncompressed(tmp_path):
    plain = read_dicom(write_dicom(tmp_path / "plain.dcm", pattern16()), S).pixels
    rle = read_dicom(write_dicom(tmp_path / "rle.dcm", pattern16(), compress="1.2.840.10008.1.2.5"), S).pixels
    np.testing.assert_array_equal(plain, rle)


def test_jpeg_baseline_decodes(tmp_path):
    img8 = quadrants(64, 64, 10, 250, 130, dtype=np.uint8)
    p = write_dicom(tmp_path / "jpg.dcm", img8, encapsulated=[jpeg_bytes(img8)],
                    transfer_syntax="1.2.840.10008.1.2.4.50")
    q = quadrant_values(read_dicom(p, S).pixels)
    assert q["tl"] == pytest.approx(1.0, abs=0.02) and q["tr"] == pytest.approx(0.0, abs=0.02)
    assert q["br"] == pytest.approx(120 / 240, abs=0.02)


def test_missing_decoder_names_the_package(tmp_path):
    from pydicom.pixels import get_decoder

    htj2k = "1.2.840.10008.1.2.4.201"
    if get_decoder(htj2k).is_available:
        pytest.skip("an HTJ2K decoder is installed here, so the missing-plugin path cannot be exercised")
    img8 = quadrants(64, 64, 10, 250, 130, dtype=np.uint8)
    p = write_dicom(tmp_path / "htj2k.dcm", img8, encapsulated=[b"\xff\x4f\xff\x51" + bytes(64)],
                    transfer_syntax=htj2k)
    with pytest.raises(SkipRecord) as e:
        read_dicom(p, S)
    assert e.value.reason == unsupported_syntax_reason(htj2k)
    assert e.value.reason == "unsupported compressed transfer syntax (install pylibjpeg-openjpeg for HTJ2K)"
    assert unsupported_syntax_reason("1.2.840.10008.1.2.4.90").startswith(
        "unsupported compressed transfer syntax (install pylibjpeg-openjpeg"
    )


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    p16 = pattern16()
    cases: dict[str, tuple[Path, str]] = {}

    def add(name, reason, fn):
        path = tmp_path / f"{name}.dcm"
        fn(path)
        cases[name] = (path, reason)

    add("empty", "empty file", _touch)
    add("text", "not a DICOM file", _text)
    add("truncated", "corrupt or truncated DICOM", lambda p: _truncated(p, p16))
    add("header_only", "corrupt or truncated DICOM", lambda p: (_truncated(p, p16), p.write_bytes(p.read_bytes()[:140])))
    add("ct", "non-X-ray modality CT; accepted: CR, DR, DX", lambda p: write_dicom(p, p16, modality="CT"))
    add("mr", "non-X-ray modality MR; accepted: CR, DR, DX", lambda p: write_dicom(p, p16, modality="MR"))
    add("us", "non-X-ray modality US; accepted: CR, DR, DX", lambda p: write_dicom(p, p16, modality="US"))
    add("knee", "non-chest body part (KNEE); accepted: CHEST (or none given)", lambda p: write_dicom(p, p16, body_part="KNEE"))
    add("abdomen", "non-chest body part (ABDOMEN); accepted: CHEST (or none given)", lambda p: write_dicom(p, p16, body_part="ABDOMEN"))
    add("lspine", "non-chest body part (SPINE); accepted: CHEST (or none given)", lambda p: write_dicom(p, p16, body_part="L SPINE"))
    add("no_pixels", "no pixel data", lambda p: write_dicom(p, None))
    return cases


def test_fixed_skip_reasons(tmp_path):
    for name, (path, reason) in _bad_inputs(tmp_path).items():
        # The same reasons for a file and for its bytes (an upload).
        for read, source in ((read_dicom, path), (read_dicom_bytes, path.read_bytes())):
            with pytest.raises(SkipRecord) as e:
                read(source, S)
            assert e.value.reason == reason, (name, read.__name__)
            assert str(e.value) == reason
            # Nothing chained: a traceback cannot show pydicom's message (which may quote header values).
            assert e.value.__cause__ is None and e.value.__context__ is None, name
    with pytest.raises(SkipRecord, match="^image file missing$"):
        read_dicom(tmp_path / "nope.dcm", S)


@pytest.mark.parametrize(
    "modality,body",
    [("CR", "CHEST"), ("DX", "CHEST"), ("DR", "THORAX"), (None, None), ("DX", ""), ("CR", "PORT CHEST"),
     ("DX", "PORTABLE"), ("dx", "chest")],
)
def test_accepted_modalities_and_body_parts(tmp_path, modality, body):
    img = read_dicom(write_dicom(tmp_path / "ok.dcm", pattern16(), modality=modality, body_part=body), S)
    assert img.modality == (modality.upper() if modality else "UNKNOWN")


def test_raw_dataset_without_preamble_is_read(tmp_path):
    import pydicom

    p = write_dicom(tmp_path / "full.dcm", pattern16())
    ds = pydicom.dcmread(p)
    raw = tmp_path / "raw.dcm"
    # Old exports: no 128-byte preamble, no file meta, implicit VR little endian.
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(raw, ds, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    q = quadrant_values(read_dicom(raw, S).pixels)
    assert q["tl"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "raw,view",
    [("PA", "PA"), ("ap", "AP"), ("LATERAL", "LATERAL"), ("LL", "LL"), ("AP AXIAL", "AP AXIAL"), ("LAT", "LATERAL"),
     ("postero-anterior", "PA"), ("", "UNKNOWN"), (None, "UNKNOWN"), (float("nan"), "UNKNOWN"),
     ("Doe^Jane", "OTHER"), ("XTABLE LATERAL", "XTABLE LATERAL"), ("  pa  ", "PA")],
)
def test_view_normalisation(raw, view):
    assert normalize_view(raw) == view


def test_no_phi_leaves_the_reader(tmp_path, caplog):
    """PHI in the usual tags, and in places pydicom warns about (an invalid CS value quoting the name)."""
    import pydicom

    caplog.set_level(logging.DEBUG)
    files = [path for path, _ in _bad_inputs(tmp_path).values()]
    files.append(write_dicom(tmp_path / "ok.dcm", pattern16()))
    files.append(write_dicom(tmp_path / "badview.dcm", pattern16(), view="Doe^Jane"))
    files.append(write_dicom(tmp_path / "badmod.dcm", pattern16(), modality="MRN-99887766"))
    files.append(write_dicom(tmp_path / "badbody.dcm", pattern16(), body_part="House^Greg"))

    # A window centre whose bytes are a name: pydicom's own error quotes it.
    wc = write_dicom(tmp_path / "badwc.dcm", pattern16(), window=(12345678.0, 400.0))
    data = wc.read_bytes()
    assert data.count(b"12345678.0") == 1
    wc.write_bytes(data.replace(b"12345678.0", b"Doe^Jane  "))
    files.append(wc)
    # A VOI LUT function that is a name: pydicom's own error quotes it.
    fn = write_dicom(tmp_path / "badfn.dcm", pattern16(), window=(2000.0, 400.0), extra={"VOILUTFunction": "Doe^Jane"})
    files.append(fn)
    # The test has teeth: outside the reader, pydicom's message carries the name.
    from pydicom.pixels import apply_voi_lut

    ds = pydicom.dcmread(fn)
    with pytest.raises(ValueError, match=r"(?i)Doe\^Jane"):
        apply_voi_lut(ds.pixel_array, ds)
    caplog.clear()

    outputs: list[str] = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for f in files:
            for read, source in ((read_dicom, f), (read_image_bytes, f.read_bytes())):
                try:
                    img = read(source, S)
                    outputs.append(repr(img))
                except SkipRecord as e:
                    outputs.append(repr(e) + str(e) + e.reason)
    text = "\n".join(outputs) + caplog.text + "\n".join(str(x.message) for x in w)
    for needle in PHI_NEEDLES:
        assert needle.lower() not in text.lower(), needle
    assert "OTHER" in text  # the odd view became OTHER, not the name


def test_read_image_any(tmp_path):
    img8 = quadrants(64, 64, 10, 250, 130, dtype=np.uint8)
    png = write_png(tmp_path / "a.png", img8)
    png16 = write_png(tmp_path / "b.png", quadrants(64, 64, 1000, 64000, 30000))
    jpg = write_jpg(tmp_path / "c.jpg", img8)
    dcm = write_dicom(tmp_path / "d.dcm", pattern16(), view="AP")
    # A DICOM without a suffix is recognised by its preamble.
    nosuffix = tmp_path / "e"
    nosuffix.write_bytes(dcm.read_bytes())
    for path, view in [(png, "UNKNOWN"), (png16, "UNKNOWN"), (jpg, "UNKNOWN"), (dcm, "AP"), (nosuffix, "AP")]:
        px, v = read_image_any(path, S)
        assert px.shape == (S, S) and v == view
        q = quadrant_values(px)
        assert q["tl"] > 0.95 and q["tr"] < 0.05, path.name
    with pytest.raises(SkipRecord, match="image file missing"):
        read_image_any(tmp_path / "missing.png", S)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(SkipRecord):
        read_image_any(bad, S)


def test_read_image_bytes_recognises_the_format_by_content(tmp_path):
    img8 = quadrants(64, 64, 10, 250, 130, dtype=np.uint8)
    dcm = write_dicom(tmp_path / "d.dcm", pattern16(), view="LATERAL", photometric="MONOCHROME1")
    raw = write_dicom(tmp_path / "raw.dcm", pattern16(), view="AP").read_bytes()[132:]  # no preamble, no 'DICM'
    uploads = {
        "png": (write_png(tmp_path / "a.png", img8).read_bytes(), "UNKNOWN"),
        "png16": (write_png(tmp_path / "b.png", quadrants(64, 64, 1000, 64000, 30000)).read_bytes(), "UNKNOWN"),
        "jpeg": (jpeg_bytes(img8), "UNKNOWN"),
        "dicom": (dcm.read_bytes(), "LATERAL"),
    }
    for name, (data, view) in uploads.items():
        px, v = read_image_bytes(data, S)
        assert px.shape == (S, S) and px.dtype == np.float32 and v == view, name
        q = quadrant_values(px)
        if name == "dicom":  # MONOCHROME1: inverted so that white = dense
            assert q["tl"] < 0.05 and q["tr"] > 0.95, name
        else:
            assert q["tl"] > 0.95 and q["tr"] < 0.05, name
    # The same pixels as the file reader gives.
    np.testing.assert_array_equal(read_image_bytes(dcm.read_bytes(), S)[0], read_dicom(dcm, S).pixels)
    # A raw dataset without the preamble, as read_dicom accepts one.
    assert read_image_bytes(raw, S)[1] == "AP"
    png = uploads["png"][0]
    for data, reason in [(b"", "empty file"), (b"%PDF-1.7 not an image", "not a PNG, JPEG or DICOM image"),
                         (png[: len(png) // 2], "unreadable image file"), (png[:8], "unreadable image file"),
                         (jpeg_bytes(img8)[:40], "unreadable image file")]:
        with pytest.raises(SkipRecord) as e:
            read_image_bytes(data, S)
        assert e.value.reason == reason, data[:12]
