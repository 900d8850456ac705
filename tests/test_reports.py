"""Section splitting on realistic MIMIC-style report texts (all written for these tests), and the R2Gen
metric normalisation."""

from __future__ import annotations

import pytest

from mavilt.data.reports import (
    ReportSections,
    normalize_for_metrics,
    normalize_whitespace,
    split_sections,
)

# (report text, expected findings, expected impression)
REPORTS: list[tuple[str, str | None, str | None]] = [
    # 1. The common MIMIC layout: FINAL REPORT, other sections, headers on their own line with a colon.
    (
        """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
""",
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities that most "
        "likely represent nipple shadows.",
        "No acute cardiopulmonary process.",
    ),
    # 2. Text on the header line; HISTORY instead of INDICATION.
    (
        """ FINAL REPORT
 HISTORY:  ___-year-old male with shortness of breath.
 FINDINGS:  Moderate right pleural effusion with adjacent atelectasis.  Mild
 cardiomegaly.
 IMPRESSION:  Moderate right pleural effusion.
""",
        "Moderate right pleural effusion with adjacent atelectasis. Mild cardiomegaly.",
        "Moderate right pleural effusion.",
    ),
    # 3. Impression only (portable ICU films often have no findings section).
    (
        """ FINAL REPORT
 INDICATION:  Intubated patient, evaluate tube position.
 COMPARISON:  ___.
 IMPRESSION:
 Endotracheal tube terminates 4 cm above the carina.  Lungs are clear.
""",
        None,
        "Endotracheal tube terminates 4 cm above the carina. Lungs are clear.",
    ),
    # 4. FINDINGS AND IMPRESSION: both sections get the text.
    (
        """ FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)
 FINDINGS AND IMPRESSION:  Portable AP view of the chest.  No pneumothorax.
 Stable left PICC line.
""",
        "Portable AP view of the chest. No pneumothorax. Stable left PICC line.",
        "Portable AP view of the chest. No pneumothorax. Stable left PICC line.",
    ),
    # 5. CONCLUSION instead of IMPRESSION; lower-case headers without colons on their own line.
    (
        """Findings
The heart is normal in size. The lungs are clear.

Conclusion
Normal chest radiograph.
""",
        "The heart is normal in size. The lungs are clear.",
        "Normal chest radiograph.",
    ),
    # 6. A wet read on top, separated by a rule of underscores; NOTIFICATION after the impression.
    (
        """ WET READ: ___ ___ ___ 10:11 PM
  No acute process.
 ______________________________________________________________________________
                                 FINAL REPORT
 INDICATION:  Chest pain.
 FINDINGS:  Heart size is normal.  No effusion.
 IMPRESSION:  No acute cardiopulmonary abnormality.
 NOTIFICATION:  The findings were discussed with Dr. ___ by Dr. ___ on the telephone on ___ at 10:30 AM.
""",
        "Heart size is normal. No effusion.",
        "No acute cardiopulmonary abnormality.",
    ),
    # 7. RECOMMENDATION(S) ends the impression.
    (
        """ FINAL REPORT
 FINDINGS:  A 1.2 cm nodule projects over the right upper lobe.
 IMPRESSION:  Right upper lobe nodule.
 RECOMMENDATION(S):  Chest CT for further evaluation.
""",
        "A 1.2 cm nodule projects over the right upper lobe.",
        "Right upper lobe nodule.",
    ),
    # 8. No section headers at all: nothing is guessed.
    (
        """ FINAL REPORT
 PA AND LATERAL CHEST ___.  The lungs are clear.  There is no effusion.
""",
        None,
        None,
    ),
    # 9. An inline capitalised header, and the word "impression" in a sentence that must not split.
    (
        """ FINAL REPORT
 FINDINGS:  The clinical impression of pneumonia is not supported; no consolidation. IMPRESSION: No pneumonia.
""",
        "The clinical impression of pneumonia is not supported; no consolidation.",
        "No pneumonia.",
    ),
    # 10. Empty findings section (header followed straight by the next header) -> None.
    (
        """ FINAL REPORT
 FINDINGS:

 IMPRESSION:  Stable appearance of the chest.
""",
        None,
        "Stable appearance of the chest.",
    ),
    # 11. Mixed-case headers with colons; de-identification blanks kept as they are.
    (
        """Final Report
Indication: ___ with fever.
Findings: Compared to ___, there is new left lower lobe opacity.
Impression: Left lower lobe pneumonia.  Findings communicated to ___.
""",
        "Compared to ___, there is new left lower lobe opacity.",
        "Left lower lobe pneumonia. Findings communicated to ___.",
    ),
    # 12. An addendum repeating IMPRESSION: both impressions joined in order.
    (
        """ FINAL REPORT
 FINDINGS:  Small left effusion.
 IMPRESSION:  Small left effusion.
 ADDENDUM:  Reviewed with the prior study.
 IMPRESSION:  Unchanged small left effusion.
""",
        "Small left effusion.",
        "Small left effusion. Unchanged small left effusion.",
    ),
    # 13. CRLF line endings and tabs; IMPRESSIONS plural; FINDING singular.
    (
        "FINDING:\r\n\tNo pneumothorax.\r\n\r\nIMPRESSIONS:\r\n\tNormal.\r\n",
        "No pneumothorax.",
        "Normal.",
    ),
    # 14. Headers present but only whitespace under them -> both None.
    ("FINDINGS:   \n\nIMPRESSION:  \n", None, None),
    # 15. "Exam" / "Clinical history" headers, findings last.
    (
        """EXAM: Chest, one view.
CLINICAL HISTORY: Cough.
FINDINGS: Low lung volumes.  Bibasilar atelectasis.
""",
        "Low lung volumes. Bibasilar atelectasis.",
        None,
    ),
]


@pytest.mark.parametrize("text,findings,impression", REPORTS, ids=[f"report{i + 1}" for i in range(len(REPORTS))])
def test_split_sections(text, findings, impression):
    assert split_sections(text) == ReportSections(findings=findings, impression=impression)


def test_split_sections_empty_and_none():
    assert split_sections("") == ReportSections(None, None)
    assert split_sections("   \n ") == ReportSections(None, None)


def test_sections_never_contain_headers_or_runs_of_whitespace():
    for text, _, _ in REPORTS:
        s = split_sections(text)
        for part in (s.findings, s.impression):
            if part is None:
                continue
            assert part == part.strip() and "  " not in part and "\n" not in part
            assert not part.upper().startswith(("FINDINGS", "IMPRESSION", "FINAL REPORT"))


def test_normalize_whitespace():
    assert normalize_whitespace("  a \n\t b  ") == "a b"
    assert normalize_whitespace(" \n ") is None
    assert normalize_whitespace(None) is None


@pytest.mark.parametrize(
    "text,max_words,expected",
    [
        ("The heart is normal. No effusion!", None, "the heart is normal no effusion"),
        ("A 1.2-cm nodule (right upper lobe).", None, "a 1 2 cm nodule right upper lobe"),
        ("Compared to ___, stable.", None, "compared to stable"),
        ("Normal chest x-XXXX.", None, "normal chest x xxxx"),  # IU's XXXX kept, as in R2Gen
        ("one two three four five", 3, "one two three"),
        ("one two", 10, "one two"),
        ("", None, ""),
        (None, None, ""),
        ("  \n  ", 5, ""),
        ("Heart/mediastinum: WNL; lungs -- clear", None, "heart mediastinum wnl lungs clear"),
    ],
)
def test_normalize_for_metrics(text, max_words, expected):
    assert normalize_for_metrics(text, max_words) == expected


def test_normalize_for_metrics_truncates_after_cleaning():
    text = "word, " * 150
    assert normalize_for_metrics(text, 100) == " ".join(["word"] * 100)
    with pytest.raises(ValueError, match="max_words"):
        normalize_for_metrics("x", -1)
