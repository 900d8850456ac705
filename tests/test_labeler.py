"""The rule-based CheXpert labeler and clinical efficacy.

The sentences below are written for these tests in the style of real chest X-ray reports (IU X-ray's "XXXX"
anonymisation tokens included); no report text from a dataset is copied here.
"""

from __future__ import annotations

import collections
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mavilt.data.labeler import label_report, label_reports, mention_labels
from mavilt.data.labels import OBSERVATIONS
from mavilt.eval.clinical import clinical_efficacy

IU_REPORTS = Path(__file__).resolve().parent.parent / ".cache" / "iu_xray" / "ecgen-radiology"

ECM, CM, LO, LL, ED, CO, PN, AT, PX, PE, PO, FX, SD, NF = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
    "No Finding")
CASES: list[tuple[str, dict[str, int]]] = [
    # negation
    ("No pleural effusion or pneumothorax.", {PE: 0, PX: 0, NF: 1}),
    ("There is no focal consolidation, pleural effusion, or pneumothorax.", {CO: 0, PE: 0, PX: 0, NF: 1}),
    ("The lungs are clear without focal airspace disease.", {LO: 0, NF: 1}),
    ("No evidence of pneumothorax.", {PX: 0, NF: 1}),
    ("Negative for acute displaced rib fracture.", {FX: 0, NF: 1}),
    ("The heart is not enlarged.", {CM: 0, NF: 1}),
    ("Pneumothorax is not seen.", {PX: 0, NF: 1}),
    ("The previously seen right pleural effusion has resolved.", {PE: 0, NF: 1}),
    ("Lungs are free of focal consolidation.", {CO: 0, NF: 1}),
    ("There are no XXXX of a pleural effusion.", {PE: 0, NF: 1}),
    ("No acute cardiopulmonary abnormality.", {NF: 1}),
    ("No change in the small left pleural effusion.", {PE: 1}),
    ("Interval removal of the right chest tube. No pneumothorax.", {SD: 0, PX: 0, NF: 1}),
    ("Without evidence of pulmonary edema or pneumonia.", {ED: 0, PN: 0, NF: 1}),
    ("No focal airspace disease to suggest pneumonia.", {LO: 0, PN: 0, NF: 1}),
    ("No focal consolidation, suspicious pulmonary opacity, pleural effusion, or pneumothorax.", {CO: 0, LO: 0, PE: 0, PX: 0, NF: 1}),
    # uncertainty
    ("Possible small left pleural effusion.", {PE: -1}),
    ("Left basilar opacity may represent atelectasis or pneumonia.", {LO: 1, AT: -1, PN: -1}),
    ("Pneumonia cannot be excluded.", {PN: -1, LO: -1}),
    ("Cannot exclude a small apical pneumothorax.", {PX: -1}),
    ("Findings are suspicious for right lower lobe pneumonia.", {PN: -1, LO: -1}),
    ("Right basilar infiltrate versus atelectasis.", {LO: -1, AT: -1}),
    ("Borderline enlarged heart size.", {CM: -1}),
    ("Streaky opacities most likely representing subsegmental atelectasis.", {LO: 1, AT: -1}),
    ("Bibasilar opacities XXXX representing subsegmental atelectasis.", {LO: 1, AT: -1}),
    ("Mild central vascular congestion.", {ED: -1, LO: -1}),
    ("Blunting of the left costophrenic XXXX.", {PE: -1}),
    ("Concerning for early pneumonia.", {PN: -1, LO: -1}),
    ("Questionable nodule in the right upper lobe.", {LL: -1, LO: -1}),
    ("Infiltrate is XXXX less XXXX but not entirely excluded.", {LO: -1}),
    ("Left lower lobe pneumonia?", {PN: -1, LO: -1}),
    ("Scarring or atelectasis in the right midlung.", {LO: -1, AT: -1}),
    ("Atelectasis is likely.", {AT: -1, LO: -1}),
    # laterality, synonyms, morphology
    ("Small right-sided pneumothorax.", {PX: 1}),
    ("Bilateral pleural effusions.", {PE: 1}),
    ("Moderate left pleural effusion with adjacent atelectasis.", {PE: 1, AT: 1, LO: 1}),
    ("Enlarged cardiac silhouette.", {CM: 1}),
    ("The heart is mildly enlarged.", {CM: 1}),
    ("Stable cardiomegaly.", {CM: 1}),
    ("The cardiac silhouette is within normal limits.", {CM: 0, NF: 1}),
    ("Normal heart size.", {CM: 0, NF: 1}),
    ("Widened mediastinum.", {ECM: 1}),
    ("The mediastinal contours are normal.", {ECM: 0, NF: 1}),
    ("Enlarged cardiomediastinal silhouette.", {ECM: 1}),
    ("Left lower lobe consolidation.", {CO: 1, LO: 1}),
    ("Patchy airspace disease in the right lower lobe.", {LO: 1}),
    ("Atelectatic changes at the left base.", {AT: 1, LO: 1}),
    ("Right upper lobe collapse.", {AT: 1, LO: 1}),
    ("Compression fracture of a midthoracic vertebral body.", {FX: 1}),
    ("Healed left rib fractures.", {FX: 1}),
    ("A 1.5 cm nodule in the right lower lobe.", {LL: 1, LO: 1}),
    ("Calcified granuloma in the right upper lobe.", {}),
    ("Interstitial pulmonary edema.", {ED: 1, LO: 1}),
    ("Right PICC line with tip in the mid SVC.", {SD: 1, NF: 1}),
    ("Endotracheal tube terminates 4 cm above the carina. Nasogastric tube courses below the diaphragm.", {SD: 1, NF: 1}),
    ("Left chest wall pacemaker with leads in the right atrium and right ventricle.", {SD: 1, NF: 1}),
    ("Sternotomy wires and mediastinal surgical clips.", {SD: 1, NF: 1}),
    ("Right chest XXXX with catheter tip at the cavoatrial junction.", {SD: 1, NF: 1}),
    ("Apical pleural thickening.", {PO: 1}),
    ("Biapical pleural-parenchymal scarring.", {PO: 1}),
    ("Hyperinflated lungs consistent with emphysema.", {}),
    # several observations in one sentence; scope
    ("Cardiomegaly with small bilateral pleural effusions and pulmonary edema.", {CM: 1, PE: 1, ED: 1, LO: 1}),
    ("Cardiomegaly without pulmonary edema.", {CM: 1, ED: 0}),
    ("No pneumothorax, but there is a small left pleural effusion.", {PX: 0, PE: 1}),
    ("No focal consolidation but mild bibasilar atelectasis.", {CO: 0, AT: 1, LO: 1}),
    ("No pleural effusion; mild cardiomegaly.", {PE: 0, CM: 1}),
    ("Heart size is normal but there is a large right pleural effusion.", {CM: 0, PE: 1}),
    ("No large pleural effusion. Small left pleural effusion is present.", {PE: 1}),
    # real-report style
    ("The cardiomediastinal silhouette and pulmonary vasculature are within normal limits in size. The lungs are clear "
     "of focal airspace disease, pneumothorax, or pleural effusion. There are no acute bony findings.",
     {ECM: 0, LO: 0, PX: 0, PE: 0, NF: 1}),
    ("Heart size and mediastinal contour are stable. XXXX opacity in the left base compatible with atelectasis. "
     "No pneumothorax.", {LO: 1, AT: 1, PX: 0}),
    ("1. No acute cardiopulmonary abnormality. 2. Stable mild cardiomegaly.", {CM: 1}),
    ("Heart size is upper limits of normal. No focal consolidation.", {CM: 0, CO: 0, NF: 1}),
    ("The heart size and pulmonary vascularity appear within normal limits. No pleural effusion or pneumothorax is seen.",
     {CM: 0, PE: 0, PX: 0, NF: 1}),
    ("Heart size, mediastinal contour, and pulmonary vascularity are within normal limits.", {CM: 0, ECM: 0, NF: 1}),
    ("The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.", {CM: 0, ECM: 0, LO: 0, NF: 1}),
    ("Low lung volumes with bronchovascular crowding. No focal infiltrate.", {LO: 0, NF: 1}),
    ("Degenerative changes of the thoracic spine.", {}),
    ("Cardiomegaly without heart failure.", {CM: 1, ED: 0}),
    ("Congestive heart failure.", {ED: 1, CM: -1, LO: 1}),
    ("Small pericardial effusion.", {}),
    ("There is no pericardial effusion or pleural effusion.", {PE: 0, NF: 1}),
    ("Right lower lobe pneumonia.", {PN: 1, LO: 1}),
    ("Right PICC in place. Lungs are clear.", {SD: 1, LO: 0, NF: 1}),
    ("Heart size is normal and the lungs are clear. No pneumothorax or large effusion.", {CM: 0, LO: 0, PX: 0, PE: 0, NF: 1}),
    ("Stable cardiomediastinal silhouette. Right-sided pneumothorax.", {PX: 1}),
    # more real-report phrasing
    ("No new focal consolidation.", {CO: -1, LO: -1}),
    ("History of left lower lobe pneumonia.", {PN: 0, NF: 1}),
    ("Heart size is borderline.", {CM: -1}),
    ("Interval resolution of the left pleural effusion.", {PE: 0, NF: 1}),
    ("The endotracheal tube has been removed.", {SD: 0, NF: 1}),
    ("Left-sided XXXX/ICD device and leads are stable.", {SD: 1, NF: 1}),
    ("No pneumothorax, pleural effusion, or focal airspace disease. Heart size normal, lungs clear.",
     {PX: 0, PE: 0, LO: 0, CM: 0, NF: 1}),
    ("Mild prominence of the interstitial markings.", {LO: 1}),
    ("There is a moderate left pleural effusion. The heart is normal in size and the mediastinum is widened.",
     {PE: 1, CM: 0, ECM: 1}),
    ("Stable mild cardiomegaly. No focal consolidation. Mild degenerative changes of the spine.", {CM: 1, CO: 0}),
    ("Subsegmental atelectasis in the lingula, otherwise clear.", {AT: 1, LO: 1}),
    ("Cardiac silhouette is enlarged without pulmonary edema.", {CM: 1, ED: 0}),
    ("Enlarged heart with normal pulmonary vascularity.", {CM: 1}),
    ("No enlargement of the cardiac silhouette. There is no mediastinal widening.", {CM: 0, ECM: 0, NF: 1}),
    ("No pleural effusion, pneumonia cannot be excluded.", {PE: 0, PN: -1, LO: -1}),
    ("Stable cardiomediastinal silhouette with mild cardiomegaly.", {CM: 1}),
]



@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:60] for c in CASES])
def test_labels_table(text: str, expected: dict[str, int]) -> None:
    got = {o: v for o, v in label_report(text).items() if v is not None}
    assert got == expected, mention_labels(text)


def test_case_table_is_broad() -> None:
    assert len(CASES) >= 60
    covered = {o for _, exp in CASES for o in exp}
    assert covered == set(OBSERVATIONS)  # every observation is exercised
    values = collections.Counter(v for _, exp in CASES for v in exp.values())
    assert values[0] >= 20 and values[-1] >= 15 and values[1] >= 30


def test_rows_have_the_14_observations_in_order() -> None:
    rows = label_reports(["Small left pleural effusion.", "", None])  # type: ignore[list-item]
    assert [list(r) for r in rows] == [list(OBSERVATIONS)] * 3
    assert rows[0]["Pleural Effusion"] == 1 and rows[0]["No Finding"] is None
    # Nothing said: nothing abnormal, so No Finding, as CheXpert does for a report without mentions.
    assert rows[1] == rows[2] == {**{o: None for o in OBSERVATIONS}, "No Finding": 1}


def test_single_string_is_rejected() -> None:
    with pytest.raises(TypeError, match="label_report"):
        label_reports("No pneumothorax.")  # type: ignore[arg-type]


def test_other_findings_withhold_no_finding_unless_disabled() -> None:
    text = "Calcified granuloma in the right upper lobe. Lungs otherwise clear. Mild thoracic scoliosis."
    assert label_report(text)["No Finding"] is None
    assert label_report(text, other_findings_block_no_finding=False)["No Finding"] == 1
    # A negated other finding does not count.
    assert label_report("No hiatal hernia. Lungs are clear.")["No Finding"] == 1


def test_aggregation_positive_beats_uncertain_beats_negative() -> None:
    assert label_report("No pleural effusion on the left. Small right pleural effusion.")["Pleural Effusion"] == 1
    assert label_report("No large pleural effusion. Possible small pleural effusion.")["Pleural Effusion"] == -1
    assert label_report("Possible pneumothorax. Small apical pneumothorax.")["Pneumothorax"] == 1


def test_lung_opacity_follows_children_and_no_finding_ignores_devices() -> None:
    row = label_report("Right PICC with tip in the SVC. Mild left basilar atelectasis.")
    assert row["Atelectasis"] == 1 and row["Lung Opacity"] == 1 and row["No Finding"] is None
    row = label_report("Right PICC with tip in the SVC. Lungs are clear.")
    assert row["Support Devices"] == 1 and row["No Finding"] == 1


# --- clinical efficacy ---------------------------------------------------------------------------------------
REF = [
    {"Cardiomegaly": 1, "Edema": -1},
    {"Pleural Effusion": 1},
    {"Cardiomegaly": -1, "No Finding": None},
    {"No Finding": 1},
]
PRED = [
    {"Cardiomegaly": 1},
    {"Pleural Effusion": -1, "Edema": 1},
    {"Cardiomegaly": 1},
    {"No Finding": 1, "Support Devices": 1},
]


def test_clinical_efficacy_uncertain_as_negative() -> None:
    ce = clinical_efficacy(REF, PRED, uncertain_policy="negative")
    assert ce["uncertain_policy"] == "negative" and ce["n"] == 4
    # Binarised: ref CM s1, PE s2, NF s4; pred CM s1+s3, ED s2, NF s4, SD s4 -> TP 2, FP 3, FN 1.
    assert ce["precision_micro_14"] == pytest.approx(2 / 5)
    assert ce["recall_micro_14"] == pytest.approx(2 / 3)
    assert ce["f1_micro_14"] == pytest.approx(0.5)
    # Macro over all 14, absent classes count as 0 (zero_division=0): CM F1 2/3, NF F1 1, the rest 0.
    assert ce["f1_macro_14"] == pytest.approx((2 / 3 + 1) / 14)
    assert ce["precision_macro_14"] == pytest.approx((0.5 + 1) / 14)
    assert ce["recall_macro_14"] == pytest.approx((1 + 1) / 14)
    # Five observations: TP 1 (CM s1), FP 2 (CM s3, ED s2), FN 1 (PE s2).
    assert ce["precision_micro_5"] == pytest.approx(1 / 3)
    assert ce["recall_micro_5"] == pytest.approx(1 / 2)
    assert ce["f1_micro_5"] == pytest.approx(0.4)
    assert ce["f1_macro_5"] == pytest.approx((2 / 3) / 5)
    per = ce["per_observation"]
    assert per["Cardiomegaly"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert per["Pleural Effusion"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert per["Fracture"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_clinical_efficacy_uncertain_as_positive() -> None:
    ce = clinical_efficacy(REF, PRED, uncertain_policy="positive")
    assert ce["uncertain_policy"] == "positive"
    # Binarised: ref CM s1+s3, ED s1, PE s2, NF s4; pred CM s1+s3, PE s2, ED s2, NF s4, SD s4 -> TP 4, FP 2, FN 1.
    assert ce["precision_micro_14"] == pytest.approx(4 / 6)
    assert ce["recall_micro_14"] == pytest.approx(4 / 5)
    assert ce["f1_micro_14"] == pytest.approx(8 / 11)
    assert ce["f1_macro_14"] == pytest.approx(3 / 14)  # CM, PE, NF perfect
    assert ce["precision_micro_5"] == ce["recall_micro_5"] == pytest.approx(0.75)
    assert ce["f1_micro_5"] == pytest.approx(0.75)
    assert ce["f1_macro_5"] == pytest.approx(2 / 5)
    assert ce["per_observation"]["Cardiomegaly"]["support"] == 2


def test_clinical_efficacy_perfect_and_missing_values() -> None:
    rows = [{"Cardiomegaly": 1.0, "Edema": float("nan")}, {"Cardiomegaly": 0, "Edema": 1}]
    ce = clinical_efficacy(rows, rows)
    assert ce["f1_micro_14"] == 1.0
    assert ce["f1_macro_14"] == pytest.approx(2 / 14)  # 12 observations absent from both sides score 0
    # None, NaN, 0 and a missing key all mean "negative".
    same = clinical_efficacy([{"Edema": None}, {"Edema": float("nan")}], [{"Edema": 0}, {}])
    assert same["f1_micro_14"] == 0.0 and same["precision_micro_14"] == 0.0


def test_clinical_efficacy_errors() -> None:
    with pytest.raises(ValueError, match="uncertain_policy"):
        clinical_efficacy(REF, PRED, uncertain_policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4 reference label rows but 3"):
        clinical_efficacy(REF, PRED[:3])
    with pytest.raises(ValueError, match="must be 1, 0, -1 or None"):
        clinical_efficacy([{"Edema": 2}], [{"Edema": 1}])
    with pytest.raises(ValueError, match="at least one"):
        clinical_efficacy([], [])


def test_labeler_on_generated_style_round_trip() -> None:
    refs = ["Mild cardiomegaly. Small bilateral pleural effusions.", "No acute cardiopulmonary abnormality."]
    hyps = ["The heart is mildly enlarged. No pleural effusion.", "The lungs are clear. No pneumothorax."]
    ce = clinical_efficacy(label_reports(refs), label_reports(hyps))
    per = ce["per_observation"]
    assert per["Cardiomegaly"]["f1"] == 1.0
    assert per["Pleural Effusion"]["recall"] == 0.0
    assert per["No Finding"]["f1"] == 1.0


# --- real reports --------------------------------------------------------------------------------------------
def _iu_reports() -> list[tuple[str, list[str]]]:
    out = []
    for path in sorted(IU_REPORTS.glob("*.xml")):
        root = ET.parse(path).getroot()
        sections = {a.get("Label"): (a.text or "") for a in root.iter("AbstractText")}
        text = f"{sections.get('FINDINGS', '')} {sections.get('IMPRESSION', '')}".strip()
        mesh = [(m.text or "").split("/")[0] for m in root.iter("major")]
        out.append((text, mesh))
    return out


@pytest.mark.skipif(not IU_REPORTS.is_dir(), reason="IU X-ray reports not cached: make .cache/iu_xray/ecgen-radiology")
def test_runs_on_all_iu_xray_reports_with_plausible_labels() -> None:
    reports = _iu_reports()
    assert len(reports) > 3000
    rows = label_reports([t for t, _ in reports])
    assert len(rows) == len(reports)
    for row in rows:
        assert list(row) == list(OBSERVATIONS)
        assert set(row.values()) <= {1, 0, -1, None}
    n = len(rows)
    share = {o: sum(r[o] == 1 for r in rows) / n for o in OBSERVATIONS}
    # IU X-ray is an outpatient set: its MeSH indexing calls about 35% of studies "normal"; we measured 42%
    # No Finding (normal studies plus device-only and low-volume ones) and 8.6% Cardiomegaly.
    assert 0.30 < share["No Finding"] < 0.60
    assert 0.01 < share["Cardiomegaly"] < 0.25
    assert 0.005 < share["Pleural Effusion"] < 0.15
    assert share["Lung Opacity"] > share["Atelectasis"] > share["Pneumothorax"]

    # Agreement with the dataset's own MeSH indexing (done by people reading the same reports).
    def recall(tags: set[str], obs: str, values: tuple[int, ...]) -> float:
        hits = [r[obs] in values for r, (_, mesh) in zip(rows, reports) if tags & set(mesh)]
        assert len(hits) > 20
        return sum(hits) / len(hits)

    assert recall({"normal"}, "No Finding", (1,)) > 0.9
    assert recall({"Cardiomegaly"}, "Cardiomegaly", (1, -1)) > 0.9
    assert recall({"Pleural Effusion"}, "Pleural Effusion", (1, -1)) > 0.9
    assert recall({"Pulmonary Atelectasis"}, "Atelectasis", (1, -1)) > 0.9
    assert recall({"Fractures, Bone"}, "Fracture", (1, -1)) > 0.9
    cardio_pos = [set(mesh) for r, (_, mesh) in zip(rows, reports) if r["Cardiomegaly"] == 1]
    precision = sum(bool({"Cardiomegaly", "Cardiac Shadow"} & m) for m in cardio_pos) / len(cardio_pos)
    assert precision > 0.85


def test_fast_f1_matches_clinical_efficacy():
    import numpy as np

    from mavilt.data.labels import OBSERVATIONS
    from mavilt.eval.clinical import (
        binarize_labels,
        clinical_efficacy,
        f1_from_matrices,
    )

    rng = np.random.default_rng(0)
    choices = [1, 0, -1, None]
    refs = [{o: choices[rng.integers(4)] for o in OBSERVATIONS} for _ in range(50)]
    hyps = [{o: choices[rng.integers(4)] for o in OBSERVATIONS} for _ in range(50)]
    for policy in ("negative", "positive"):
        slow = clinical_efficacy(refs, hyps, uncertain_policy=policy)
        fast = f1_from_matrices(binarize_labels(refs, policy), binarize_labels(hyps, policy))
        for k, v in fast.items():
            assert v == pytest.approx(slow[k], abs=1e-12), k
