"""Real-source ingestion end to end on small, format-exact fake trees: MIMIC-CXR (DICOM), MIMIC-CXR-JPG, IU X-ray
(OpenI XML + PNG) and a user CSV, through ``prepare_dataset``; plus the parser on all 3,955 real OpenI XMLs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from fixtures_sources import (
    PHI_NEEDLES,
    build_csv_tree,
    build_iu_tree,
    build_mimic_tree,
    quadrant_values,
    write_png,
)

from mavilt.data.images import decode_png
from mavilt.data.labels import OBSERVATIONS
from mavilt.data.prepare import PrepareParams, prepare_dataset
from mavilt.data.shards import SPLITS, read_rows
from mavilt.data.sources import iu_xray

S = 32
IU_REPORTS = Path(__file__).resolve().parent.parent / ".cache" / "iu_xray" / "ecgen-radiology"  # `make setup`


@pytest.fixture
def cfg(tiny_cfg):
    tiny_cfg.data.image_size = S
    tiny_cfg.data.bit_depth = 8
    tiny_cfg.data.rows_per_file = 3  # several files per split, so file naming and merging are exercised
    return tiny_cfg


def all_rows(out: Path) -> dict[str, dict]:
    return {r["image_id"]: r for split in SPLITS for r in read_rows(out, split)}


def output_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def assert_no_phi(out: Path, log_text: str = "") -> None:
    """No PHI string in any output byte (raw files, decoded Parquet values, PNG metadata) or log line."""
    import io

    from PIL import Image

    haystacks: list[bytes] = [p.read_bytes().lower() for p in out.rglob("*") if p.is_file()]
    for split in SPLITS:
        for r in read_rows(out, split):
            haystacks.append(json.dumps({k: v for k, v in r.items() if k != "image"}).lower().encode())
            info = Image.open(io.BytesIO(r["image"])).info
            haystacks.append(repr(info).lower().encode())
    haystacks.append(log_text.lower().encode())
    for needle in PHI_NEEDLES:
        n = needle.lower().encode()
        assert not any(n in h for h in haystacks), f"PHI {needle!r} leaked"


def labels_set(row: dict) -> dict[str, int]:
    return {k: v for k, v in row["labels"].items() if v is not None}


# --- MIMIC-CXR (DICOM) -------------------------------------------------------------------------------------------


def test_mimic_cxr_dicom_end_to_end(tmp_path, cfg, caplog):
    caplog.set_level(logging.DEBUG)
    root, out = tmp_path / "mimic", tmp_path / "out"
    exp = build_mimic_tree(root, "dicom")
    manifest = prepare_dataset("mimic-cxr", out, cfg, root=root, use_ray=False)

    # Every skip reason counted, nothing else skipped.
    assert manifest["skipped"] == exp["skipped"]
    assert manifest["counts"] == {"train": 4, "validate": 1, "test": 1}
    assert manifest["studies"] == {"train": 2, "validate": 1, "test": 1}
    assert json.loads((out / "manifest.json").read_text())["skipped"] == exp["skipped"]
    # Every skipped input listed with its reason, files by their path under the root.
    listed = manifest["skipped_inputs"]
    assert len(listed) == manifest["skipped_total"] == sum(exp["skipped"].values())
    by_reason = {e["reason"]: e["input"] for e in listed}
    for name, reason in (("empty", "empty file"), ("not_dicom", "not a DICOM file"), ("ct", "non-X-ray modality CT; accepted: CR, DR, DX"),
                         ("not_in_split", "study missing from the split file")):
        where = by_reason[reason]
        assert where.startswith("files/") and where.endswith(f"{exp['images'][name]['dicom_id']}.dcm"), (reason, where)
    assert str(root) not in json.dumps(listed)

    rows = all_rows(out)
    img = {k: v["dicom_id"] for k, v in exp["images"].items()}
    assert set(rows) == {img[k] for k in ("pa", "lat_mono1", "voi", "window", "rle", "jpeg")}
    pa, lat, voi, win = rows[img["pa"]], rows[img["lat_mono1"]], rows[img["voi"]], rows[img["window"]]

    # Ids, splits, views (metadata first, DICOM header when the metadata has none).
    assert (pa["study_id"], pa["split"], pa["view"]) == ("50000001", "train", "PA")
    assert (lat["view"], voi["split"], voi["view"]) == ("LATERAL", "validate", "AP")
    assert (win["split"], win["view"]) == ("test", "AP")
    assert all(r["vqa"] == [] for r in rows.values())

    # Pixels: orientation, MONOCHROME1 inversion, VOI LUT, rescale + window (8-bit PNG: 1/255 steps).
    q = quadrant_values(decode_png(pa["image"]))
    assert q["tl"] == pytest.approx(1, abs=0.01) and q["tr"] == pytest.approx(0, abs=0.01)
    assert q["br"] == pytest.approx(29000 / 59000, abs=0.01)
    q = quadrant_values(decode_png(lat["image"]))
    assert q["tl"] == pytest.approx(0, abs=0.01) and q["tr"] == pytest.approx(1, abs=0.01)
    q = quadrant_values(decode_png(voi["image"]))
    assert q["tl"] == pytest.approx((4000 / 4095) ** 2, abs=0.01) and q["br"] == pytest.approx((2000 / 4095) ** 2, abs=0.01)
    q = quadrant_values(decode_png(win["image"]))
    assert q["br"] == pytest.approx(0.5, abs=0.01) and q["tl"] == pytest.approx(1, abs=0.01)
    np.testing.assert_array_equal(decode_png(rows[img["rle"]]["image"]), decode_png(pa["image"]))
    assert np.abs(decode_png(rows[img["jpeg"]]["image"]) - decode_png(pa["image"])).max() < 0.05

    # Sections.
    assert pa["findings"].startswith("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral")
    assert pa["impression"] == "No acute cardiopulmonary process."
    assert voi["impression"] == "Moderate right pleural effusion. Possible pneumonia cannot be excluded."
    assert win["findings"] is None and win["impression"].startswith("Endotracheal tube terminates 4 cm")
    fi = rows[img["rle"]]
    assert fi["findings"] == fi["impression"] == "Portable AP view of the chest. No pneumothorax. Stable left PICC line."

    # Labels as the source gives them: no CheXpert rule re-applied (Atelectasis=1 but Lung Opacity stays null).
    assert set(pa["labels"]) == set(OBSERVATIONS)
    assert labels_set(pa) == {"No Finding": 1}
    assert labels_set(voi) == {"Pleural Effusion": 1, "Atelectasis": 1, "Cardiomegaly": 1, "Pneumonia": -1,
                               "Pneumothorax": 0}
    assert labels_set(win) == {"Support Devices": 1, "No Finding": 1}

    assert_no_phi(out, caplog.text)

    # Idempotent: a second run into the same folder replaces, never duplicates.
    files = output_files(out)
    again = prepare_dataset("mimic-cxr", out, cfg, root=root, use_ray=False)
    assert output_files(out) == files
    assert again["counts"] == manifest["counts"] and again["skipped"] == manifest["skipped"]
    rows2 = all_rows(out)
    assert sorted(rows2) == sorted(rows)
    assert all(rows2[k]["image"] == rows[k]["image"] for k in rows)


def test_mimic_cxr_16_bit_output_keeps_precision(tmp_path, cfg):
    cfg.data.bit_depth = 16
    root, out = tmp_path / "mimic", tmp_path / "out"
    exp = build_mimic_tree(root, "dicom")
    prepare_dataset("mimic-cxr", out, cfg, root=root, use_ray=False)
    voi = all_rows(out)[exp["images"]["voi"]["dicom_id"]]
    q = quadrant_values(decode_png(voi["image"]))
    assert q["br"] == pytest.approx((2000 / 4095) ** 2, abs=2e-3)
    assert q["tr"] == pytest.approx((100 / 4095) ** 2, abs=2e-3)


def test_mimic_cxr_jpg_with_separate_reports_tree(tmp_path, cfg):
    root, out = tmp_path / "mimic-jpg", tmp_path / "out"
    exp = build_mimic_tree(root, "jpg")
    assert (root / "mimic-cxr-reports" / "files").is_dir() and not list((root / "files").rglob("*.txt"))
    manifest = prepare_dataset("mimic-cxr-jpg", out, cfg, root=root, use_ray=False)
    assert manifest["skipped"] == exp["skipped"]
    assert manifest["counts"] == {"train": 2, "validate": 1, "test": 1}
    rows = all_rows(out)
    pa = rows[exp["images"]["pa"]["dicom_id"]]
    lat = rows[exp["images"]["lat_mono1"]["dicom_id"]]
    win = rows[exp["images"]["window"]["dicom_id"]]
    assert pa["view"] == "PA" and lat["view"] == "LATERAL" and win["view"] == "UNKNOWN"  # no DICOM to fall back on
    # JPGs are taken as displayed (8-bit / 255, no windowing): 60000 and 1000 of 65535 were written as 233 and 4.
    q = quadrant_values(decode_png(pa["image"]))
    assert q["tl"] == pytest.approx(233 / 255, abs=0.02) and q["tr"] == pytest.approx(4 / 255, abs=0.02)
    q = quadrant_values(decode_png(lat["image"]))  # the lateral JPG was written mirrored
    assert q["tr"] == pytest.approx(233 / 255, abs=0.02) and q["tl"] == pytest.approx(4 / 255, abs=0.02)
    assert pa["impression"] == "No acute cardiopulmonary process."
    assert labels_set(pa) == {"No Finding": 1}


def test_mimic_cxr_without_split_file_fails_clearly(tmp_path, cfg):
    root = tmp_path / "mimic"
    build_mimic_tree(root, "jpg")
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(ValueError, match=r"mimic-cxr-2\.0\.0-split\.csv.*MIMIC-CXR-JPG"):
        prepare_dataset("mimic-cxr-jpg", tmp_path / "out", cfg, root=root, use_ray=False)


def test_mimic_cxr_without_metadata_and_labels(tmp_path, cfg):
    """Optional index files: views then come from the DICOM header, labels are all null."""
    root, out = tmp_path / "mimic", tmp_path / "out"
    exp = build_mimic_tree(root, "dicom")
    (root / "mimic-cxr-2.0.0-metadata.csv").unlink()
    (root / "mimic-cxr-2.0.0-chexpert.csv").unlink()
    prepare_dataset("mimic-cxr", out, cfg, root=root, use_ray=False)
    rows = all_rows(out)
    assert rows[exp["images"]["lat_mono1"]["dicom_id"]]["view"] == "LATERAL"
    assert all(labels_set(r) == {} for r in rows.values())


@pytest.mark.ray
def test_mimic_cxr_with_ray_data_matches_local(tmp_path, cfg, ray_session):
    root = tmp_path / "mimic"
    build_mimic_tree(root, "dicom")
    local = prepare_dataset("mimic-cxr", tmp_path / "local", cfg, root=root, use_ray=False)
    remote = prepare_dataset("mimic-cxr", tmp_path / "ray", cfg, root=root, use_ray=True)
    assert remote["counts"] == local["counts"] and remote["skipped"] == local["skipped"]
    a, b = all_rows(tmp_path / "local"), all_rows(tmp_path / "ray")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k]
    assert_no_phi(tmp_path / "ray")


# --- IU X-ray ----------------------------------------------------------------------------------------------------


def test_iu_xray_end_to_end(tmp_path, cfg):
    root, out = tmp_path / "iu", tmp_path / "out"
    exp = build_iu_tree(root)
    manifest = prepare_dataset("iu-xray", out, cfg, root=root, use_ray=False)
    assert manifest["skipped"] == exp["skipped"]
    assert manifest["total_images"] == exp["images"]
    rows = all_rows(out)
    by_study: dict[str, set[str]] = {}
    for r in rows.values():
        by_study.setdefault(r["study_id"], set()).add(r["split"])
        e = exp["reports"][r["study_id"]]
        assert r["image_id"] in e["ids"]
        # Texts whitespace-normalised, XXXX kept; no labels, no view.
        assert r["findings"] == (" ".join(e["findings"].split()) if e["findings"] else None)
        assert r["impression"] == e["impression"]
        assert labels_set(r) == {} and r["view"] == "UNKNOWN" and r["vqa"] == []
        q = quadrant_values(decode_png(r["image"]))
        assert q["tl"] == pytest.approx(250 / 255, abs=0.01) and q["tr"] == pytest.approx(10 / 255, abs=0.01)
    assert set(by_study) == set(exp["reports"])
    assert all(len(s) == 1 for s in by_study.values())  # a study never straddles splits
    # Deterministic: same split for each study on a re-run.
    prepare_dataset("iu-xray", out, cfg, root=root, use_ray=False)
    assert {k: r["split"] for k, r in all_rows(out).items()} == {k: r["split"] for k, r in rows.items()}


def test_iu_split_fractions_and_seed():
    uids = [f"CXR{i}" for i in range(4000)]
    splits = [iu_xray.assign_split(u, 0, [0.8, 0.1, 0.1]) for u in uids]
    frac = {s: splits.count(s) / len(uids) for s in SPLITS}
    assert frac["train"] == pytest.approx(0.8, abs=0.03)
    assert frac["validate"] == pytest.approx(0.1, abs=0.02) and frac["test"] == pytest.approx(0.1, abs=0.02)
    assert splits == [iu_xray.assign_split(u, 0, [0.8, 0.1, 0.1]) for u in uids]
    assert splits != [iu_xray.assign_split(u, 1, [0.8, 0.1, 0.1]) for u in uids]
    assert {iu_xray.assign_split(u, 0, [1, 0, 0]) for u in uids[:200]} == {"train"}
    assert {iu_xray.assign_split(u, 0, [0, 0, 2]) for u in uids[:200]} == {"test"}
    with pytest.raises(ValueError, match="split_fractions"):
        iu_xray.assign_split("CXR1", 0, [0.5, 0.5])


def test_parse_openi_xml_fields(tmp_path):
    root = tmp_path / "iu"
    build_iu_tree(root)
    rep = iu_xray.parse_openi_xml(root / "ecgen-radiology" / "4.xml")
    assert rep["uid"] == "CXR4"
    assert rep["findings"] == "The heart is normal in size. The lungs are clear. XXXX 4."
    assert rep["impression"] == "No acute disease 4."
    assert rep["indication"] == "XXXX-year-old with cough" and rep["comparison"] == "None."
    assert rep["image_ids"] == ["CXR4_IM-0004-1001"]
    assert rep["mesh"]["major"] == ["normal"] and rep["mesh"]["minor"] == ["Opacity/lung/base/left"]
    assert iu_xray.parse_openi_xml(root / "ecgen-radiology" / "5.xml")["findings"] is None
    with pytest.raises(ValueError, match="9001.xml"):
        iu_xray.parse_openi_xml(root / "ecgen-radiology" / "9001.xml")
    parsed = list(iu_xray.iter_openi_reports(root / "ecgen-radiology"))
    assert [r["uid"] for r in parsed][:3] == ["CXR1", "CXR2", "CXR3"]  # numeric file order
    assert len(parsed) == 14  # 12 good + the two well-formed bad ones; the malformed one is skipped


@pytest.mark.skipif(not IU_REPORTS.is_dir(), reason=f"real OpenI XMLs not at {IU_REPORTS}: run `make setup` first")
def test_all_real_openi_reports_parse(tmp_path):
    """The 3,955 released IU X-ray report XMLs (torchxrayvision 1.5.7's archive): counts, and no crash."""
    files = sorted(IU_REPORTS.glob("*.xml"))
    assert len(files) == 3955
    reps = [iu_xray.parse_openi_xml(f) for f in files]
    assert len({r["uid"] for r in reps}) == 3955
    assert sum(r["findings"] is not None for r in reps) == 3425
    assert sum(r["impression"] is not None for r in reps) == 3921
    assert sum(bool(r["findings"] and r["impression"]) for r in reps) == 3419
    assert sum(bool(r["image_ids"]) for r in reps) == 3851
    assert sum(len(r["image_ids"]) for r in reps) == 7470
    assert sum(bool(r["findings"]) and bool(r["image_ids"]) for r in reps) == 3337
    assert all(r["mesh"]["major"] for r in reps)
    assert all(t is None or (t == t.strip() and "  " not in t) for r in reps for t in (r["findings"], r["impression"]))

    # The scanner on the real reports with an image folder holding the first report's images only.
    root = tmp_path / "iu"
    root.mkdir()
    (root / "ecgen-radiology").symlink_to(IU_REPORTS)
    first = iu_xray.parse_openi_xml(IU_REPORTS / "1.xml")
    for iid in first["image_ids"]:
        write_png(root / "NLMCXR_png" / f"{iid}.png", np.zeros((8, 8), np.uint8))
    scan = iu_xray.scan(PrepareParams("iu-xray", str(root), S, 8, 0, [0.8, 0.1, 0.1]))
    assert [r["image_id"] for r in scan.records] == first["image_ids"]
    assert scan.skipped.counts() == {"no images in report": 104, "image file missing": 7470 - len(first["image_ids"])}


# --- CSV ---------------------------------------------------------------------------------------------------------


def test_csv_source_end_to_end(tmp_path, cfg):
    root, out = tmp_path / "mine", tmp_path / "out"
    exp = build_csv_tree(root)
    manifest = prepare_dataset("csv", out, cfg, root=root, use_ray=False)  # a folder holding data.csv
    assert manifest["skipped"] == exp["skipped"]
    assert manifest["counts"] == {"train": 2, "validate": 1, "test": 1}
    rows = all_rows(out)
    a, b, c, d = rows["imgs/a.png"], rows["imgs/b16.png"], rows["imgs/c.jpg"], rows["imgs/d.dcm"]
    assert (a["study_id"], a["split"], a["view"]) == ("st1", "train", "PA")
    assert a["findings"] == "Heart size normal. Lungs clear." and a["impression"] == "Normal chest."
    assert (b["view"], c["view"], c["split"]) == ("LATERAL", "UNKNOWN", "validate")
    assert d["view"] == "AP" and d["findings"] is None and d["impression"] == "Edema."  # view from the DICOM
    assert labels_set(a) == {"Cardiomegaly": 0, "No Finding": 1}
    assert labels_set(c) == {"Cardiomegaly": 1, "Edema": -1}  # as given: no hierarchy rules applied
    for r, hi, lo in ((a, 250 / 255, 10 / 255), (b, 64000 / 65535, 1000 / 65535), (c, 250 / 255, 10 / 255)):
        q = quadrant_values(decode_png(r["image"]))
        assert q["tl"] == pytest.approx(hi, abs=0.02) and q["tr"] == pytest.approx(lo, abs=0.02)
    q = quadrant_values(decode_png(d["image"]))  # MONOCHROME1 DICOM inverted
    assert q["tl"] < 0.02 and q["tr"] > 0.98

    assert_no_phi(out)

    # The CSV file itself works as --root too, with the same result.
    again = prepare_dataset("csv", tmp_path / "out2", cfg, root=root / "data.csv", use_ray=False)
    assert again["counts"] == manifest["counts"]


def test_csv_missing_column_names_it(tmp_path, cfg):
    p = tmp_path / "my.csv"
    p.write_text("image_path,study_id,split,findings\nx.png,s1,train,ok\n")
    with pytest.raises(ValueError) as e:
        prepare_dataset("csv", tmp_path / "out", cfg, root=p, use_ray=False)
    msg = str(e.value)
    assert "impression" in msg and "image_path, study_id, split, findings, impression" in msg and str(p) in msg


def test_csv_bad_values_are_skipped(tmp_path, cfg):
    root = tmp_path / "mine"
    write_png(root / "a.png", np.full((16, 16), 100, np.uint8))
    (root / "data.csv").write_text(
        "image_path,study_id,split,findings,impression,Edema\n"
        "a.png,s1,VAL,f,i,1\n"          # alias of validate, any case
        "a.png,s2,dev,f,i,\n"           # bad split
        "a.png,s3,train,f,i,2\n"        # bad label value
        "a.png,,train,f,i,\n"           # no study
    )
    m = prepare_dataset("csv", tmp_path / "out", cfg, root=root, use_ray=False)
    assert m["counts"] == {"train": 0, "validate": 1, "test": 0}
    assert m["skipped"] == {"invalid split value": 1, "invalid label value": 1, "missing study_id": 1}
    # Each skipped row by its line in the CSV, so the user can fix it there.
    assert m["skipped_inputs"] == [{"input": "data.csv line 3", "reason": "invalid split value"},
                                   {"input": "data.csv line 4 (a.png)", "reason": "invalid label value"},
                                   {"input": "data.csv line 5", "reason": "missing study_id"}]
