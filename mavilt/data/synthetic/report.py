"""The radiology report of a case and the CheXpert labels it states.

A report is assembled section by section (view, devices, heart, lungs, pleura, bones; then the impression)
from sentences that carry their label effects, so :func:`case_labels` reads the labels off the very sentences
:func:`write_report` prints. Each finding's own wording lives in its module under
:mod:`mavilt.data.synthetic.findings`; the sentences about several findings at once are here.
"""

from __future__ import annotations

import random

from mavilt.data.labels import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, Labels, apply_conventions, empty_labels
from mavilt.data.synthetic.case import Case
from mavilt.data.synthetic.findings import CARDIOMEGALY, DEVICES, IMPORTANCE, PRESENT, kind
from mavilt.data.synthetic.wording import Sentence, Wording

LUNG_FINDINGS = ("consolidation", "nodule", "edema", "atelectasis")  # in the order the report states them


def _report_sentences(case: Case, rng_seed: int | None) -> tuple[list[Sentence], list[Sentence]]:
    """Findings and impression sentences with their label effects.

    Which statements appear (and so the labels) depends only on the case; ``rng_seed`` changes the wording.
    """
    st = random.Random(case.report_seed * 2 + 1)  # structure: what is said
    w = Wording((case.report_seed if rng_seed is None else int(rng_seed)) * 2)  # wording: how
    has = {f.name: f for f in case.findings}
    findings: list[Sentence] = []
    if case.view == "AP" and st.random() < 0.6:
        findings.append(Sentence(w.choice(["Portable AP view of the chest.", "Single portable AP radiograph of the chest.",
                                           "Portable semi-upright AP view of the chest."])))
    elif case.view == "PA" and st.random() < 0.3:
        findings.append(Sentence(w.choice(["PA view of the chest.", "Frontal view of the chest."])))
    findings += DEVICES.device_sentences(case.finding("devices"), w)
    findings += CARDIOMEGALY.heart_sentences(case, w, st)
    # Lungs.
    lung_findings = [has[n] for n in LUNG_FINDINGS if n in has]
    findings += [kind(f.name).sentence(f, w) for f in lung_findings]
    neg_cons = "consolidation" not in has and st.random() < 0.6
    neg_edema = "edema" not in has and st.random() < 0.35
    neg_nodule = "nodule" not in has and st.random() < 0.15
    if not lung_findings:
        if neg_cons and neg_edema:
            findings.append(Sentence(w.choice(["The lungs are clear without focal consolidation or pulmonary edema.",
                                               "Lungs are clear. No focal consolidation or pulmonary edema."]),
                                     {"Lung Opacity": NEGATIVE, "Consolidation": NEGATIVE, "Edema": NEGATIVE}))
            neg_cons = neg_edema = False
        elif neg_cons:
            findings.append(Sentence(w.choice(["The lungs are clear without focal consolidation.",
                                               "Lungs are clear. No focal consolidation."]),
                                     {"Lung Opacity": NEGATIVE, "Consolidation": NEGATIVE}))
            neg_cons = False
        else:
            findings.append(Sentence(w.choice(["The lungs are clear.", "Lungs are clear.",
                                               "The lungs are well expanded and clear."]), {"Lung Opacity": NEGATIVE}))
    elif "edema" not in has and st.random() < 0.5:
        # "Clear" negates Lung Opacity; a positive child still wins when the labels are aggregated.
        findings.append(Sentence(w.choice(["The lungs are otherwise clear.", "Elsewhere, the lungs are clear."]),
                                 {"Lung Opacity": NEGATIVE}))
    for name, negated in (("consolidation", neg_cons), ("edema", neg_edema), ("nodule", neg_nodule)):
        if negated:
            findings.append(kind(name).negation(w))
    # Pleura.
    for n in ("effusion", "pneumothorax"):
        if n in has:
            findings.append(kind(n).sentence(has[n], w))
    if "effusion" not in has and "pneumothorax" not in has:
        text = w.choice(["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
                         "No pneumothorax or pleural effusion.", "No pleural effusion or pneumothorax is seen."])
        findings.append(Sentence(text, {"Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE}))
    elif "effusion" not in has:
        findings.append(kind("effusion").negation(w))
    elif "pneumothorax" not in has:
        findings.append(kind("pneumothorax").negation(w))
    # Bones.
    if st.random() < 0.4:
        findings.append(Sentence(w.choice(["No displaced rib fracture.", "No acute fracture is identified."]),
                                 {"Fracture": NEGATIVE}))
    else:
        findings.append(Sentence(w.choice(["No acute osseous abnormality.", "The osseous structures are intact.",
                                           "Osseous structures are unremarkable.", "No acute bony abnormality."])))

    impression: list[Sentence] = []
    # Certain findings by importance, then the hedged ones.
    ordered = [has[n] for n in IMPORTANCE if n in has]
    ordered = [f for f in ordered if f.certainty == PRESENT] + [f for f in ordered if f.certainty != PRESENT]
    for f in ordered:
        impression += kind(f.name).impression(f, w)
    if not impression:
        options = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                   "No acute intrathoracic process."]
        if "devices" not in has:
            options.append("Normal chest radiograph.")
        impression.append(Sentence(w.choice(options)))
    if "devices" in has:
        impression += DEVICES.impression(has["devices"], w)
    return findings, impression


def write_report(case: Case, rng_seed: int | None = None) -> tuple[str, str]:
    """(findings, impression) for ``case``; ``rng_seed`` varies only the wording, never what is said."""
    findings, impression = _report_sentences(case, rng_seed)
    return " ".join(s.text for s in findings), " ".join(s.text for s in impression)


def case_labels(case: Case) -> Labels:
    """The 14 CheXpert labels the report states (1, -1, 0 when negated, None when not mentioned)."""
    findings, impression = _report_sentences(case, None)
    raw = empty_labels()
    rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}  # CheXpert's aggregation: positive > uncertain > negative
    for s in findings + impression:
        for obs, v in s.effects.items():
            if obs not in OBSERVATIONS:
                raise AssertionError(f"unknown observation {obs}")
            if raw[obs] is None or rank[v] > rank[raw[obs]]:
                raw[obs] = v
    return apply_conventions(raw)
