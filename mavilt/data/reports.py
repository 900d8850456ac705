"""Radiology report text: FINDINGS / IMPRESSION sections from free text, and the metric normalisation.

Free-text reports (MIMIC-CXR's ``sXXXXXXXX.txt`` files, a user's CSV) mark sections with headers that vary:
"FINDINGS:", "Findings" alone on a line, "FINDINGS AND IMPRESSION:", "CONCLUSION:" instead of "IMPRESSION:",
and sections that are neither ("INDICATION:", "COMPARISON:", "WET READ:", ...) but end the one before them.
A header is recognised

- at the start of a line, in any case, followed by a colon or alone on its line, or
- inside a line only when written in capitals and followed by a colon ("... clear.  IMPRESSION: Normal."),
  so that ordinary words such as "impression" or "findings" in a sentence are never taken for headers.

MIMIC's de-identification blanks ("___") are kept as they are; separator lines made only of underscores
(the long rules between a wet read and the final report) are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (header regex, kind): kind is "findings", "impression", "both" or "other" (ends the previous section).
_HEADERS: tuple[tuple[str, str], ...] = (
    (r"FINDINGS? AND IMPRESSIONS?", "both"),
    (r"FINDINGS?\s*/\s*IMPRESSIONS?", "both"),
    (r"IMPRESSIONS? AND FINDINGS?", "both"),
    (r"FINDINGS?", "findings"),
    (r"IMPRESSIONS?", "impression"),
    (r"CONCLUSIONS?", "impression"),
    (r"FINAL REPORT", "other"),
    (r"PRELIMINARY REPORT", "other"),
    (r"WET READ(?: VERSION\s*#?\s*\d+)?", "other"),
    (r"ADDENDUM", "other"),
    (r"CLINICAL INDICATIONS?", "other"),
    (r"INDICATIONS?", "other"),
    (r"REASON FOR (?:EXAMINATION|EXAM|STUDY)", "other"),
    (r"CLINICAL HISTORY", "other"),
    (r"CLINICAL INFORMATION", "other"),
    (r"HISTORY", "other"),
    (r"COMPARISONS?", "other"),
    (r"TECHNIQUE", "other"),
    (r"PROCEDURE", "other"),
    (r"TYPE OF EXAMINATION", "other"),
    (r"EXAMINATION", "other"),
    (r"EXAM", "other"),
    (r"NOTIFICATIONS?", "other"),
    (r"RECOMMENDATIONS?", "other"),
    (r"RECOMMENDATION\(S\)", "other"),
)
_ALTS = "|".join(f"(?P<h{i}>{pat})" for i, (pat, _) in enumerate(_HEADERS))
# At a line start, any case, then a colon or the end of the line.
_LINE_HEADER = re.compile(rf"^[ \t]*(?:{_ALTS})[ \t]*(?::|(?=[ \t]*$))", re.IGNORECASE | re.MULTILINE)
# Inside a line: capitals only, and the colon is required.
_INLINE_HEADER = re.compile(rf"(?<![A-Za-z0-9])(?:{_ALTS})[ \t]*:")
_SEPARATOR_LINE = re.compile(r"^[ \t]*_{4,}[ \t]*$", re.MULTILINE)
_SPACE = re.compile(r"\s+")


@dataclass
class ReportSections:
    findings: str | None
    impression: str | None


def normalize_whitespace(text: str | None) -> str | None:
    """Single spaces, stripped; None when nothing is left."""
    if text is None:
        return None
    out = _SPACE.sub(" ", text).strip()
    return out or None


def _kind(m: re.Match) -> str:
    for i, (_, kind) in enumerate(_HEADERS):
        if m.group(f"h{i}") is not None:
            return kind
    raise AssertionError("unreachable: a header match names one alternative")


def split_sections(text: str) -> ReportSections:
    """FINDINGS and IMPRESSION of a free-text report (None where a section is missing or empty).

    "FINDINGS AND IMPRESSION:" gives both sections the same text; "CONCLUSION:" counts as impression; a section
    that appears twice (e.g. an addendum repeating IMPRESSION) is joined in order.
    """
    if not text:
        return ReportSections(None, None)
    text = _SEPARATOR_LINE.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    found: list[tuple[int, int, str]] = []
    for rx in (_LINE_HEADER, _INLINE_HEADER):
        for m in rx.finditer(text):
            found.append((m.start(), m.end(), _kind(m)))
    # Both patterns may see the same header: keep the earliest start, longest match, drop overlaps.
    found.sort(key=lambda t: (t[0], -t[1]))
    headers: list[tuple[int, int, str]] = []
    for start, end, kind in found:
        if headers and start < headers[-1][1]:
            continue
        headers.append((start, end, kind))

    parts: dict[str, list[str]] = {"findings": [], "impression": []}
    for i, (_, end, kind) in enumerate(headers):
        stop = headers[i + 1][0] if i + 1 < len(headers) else len(text)
        body = text[end:stop].lstrip(" \t\n:-")
        if kind in ("findings", "both"):
            parts["findings"].append(body)
        if kind in ("impression", "both"):
            parts["impression"].append(body)
    return ReportSections(
        findings=normalize_whitespace(" ".join(parts["findings"])),
        impression=normalize_whitespace(" ".join(parts["impression"])),
    )


_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize_for_metrics(text: str | None, max_words: int | None = None) -> str:
    """The R2Gen convention for report metrics: lowercase, punctuation replaced by spaces (letters and digits
    kept), whitespace collapsed, optionally cut to ``max_words`` tokens (60 for IU X-ray, 100 for MIMIC-CXR).

    Underscores count as punctuation, so MIMIC's "___" blanks disappear; IU X-ray's "XXXX" anonymisation tokens
    are words and stay (as "xxxx"), as in R2Gen's released annotations.
    """
    if not text:
        return ""
    words = _NON_WORD.sub(" ", text.lower()).split()
    if max_words is not None:
        if max_words < 0:
            raise ValueError(f"max_words must be >= 0, got {max_words}")
        words = words[:max_words]
    return " ".join(words)
