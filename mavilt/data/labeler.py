"""A rule-based CheXpert labeler in miniature: report text -> the 14 CheXpert labels.

Data-side, so a source without labels can be labelled at prepare time; clinical efficacy metrics on its
labels are in :mod:`mavilt.eval.clinical`.

The labeler follows the CheXpert/NegBio design (mention -> negation/uncertainty -> aggregation) with regular
expressions instead of a dependency parse, so it runs anywhere, fast, and without downloads:

1. Text is lower-cased and split into sentences, sentences into clauses (scope ends at ``;``, "but",
   "however", "although", "which", "otherwise", "except", ", with", "there is/are", sentence end), clauses into
   comma segments.
2. Mentions: per observation, phrases with synonyms and morphology (``_MENTIONS``). Three kinds:
   *finding* phrases name the observation ("pleural effusion", "atelectatic"); *descriptor* phrases name an
   anatomy whose size decides the label ("heart size", "cardiac silhouette", "mediastinum") and need a
   qualifier ("enlarged" -> 1, "normal"/"not enlarged" -> 0, "borderline" -> -1, "stable" alone -> not
   mentioned); *negative-only* phrases ("lungs are clear" -> Lung Opacity 0).
3. Each mention is labelled: "cannot exclude"/"not excluded"/"no new" -> uncertain (-1, checked first, as in
   CheXpert's pre-negation uncertainty); else the nearest forward cue before it in the clause decides
   ("no", "without", "negative for", "free of", "clear of" -> 0; "possible", "likely", "may", "suspicious for",
   "concerning for", "suggestive of", "versus" -> -1); local cues in its comma segment can negate ("is not
   seen", "has resolved", "removed"; "normal"/"unremarkable" only when adjacent) or make it uncertain
   ("... is likely", "?", "X or Y", "X versus Y"); a few phrases are uncertain by themselves ("vascular
   congestion", "blunting of the costophrenic angle").
4. Aggregation over a report, as CheXpert: any positive mention -> 1, else any uncertain -> -1, else any
   negated -> 0, else None (not mentioned). Then :func:`mavilt.data.labels.apply_conventions` (Lung Opacity
   from its children; No Finding only when nothing but Support Devices is positive or uncertain), and, as
   CheXpert does, No Finding is also withheld when a positive or uncertain *other finding* outside the 14
   (granuloma, emphysema, degenerative changes, scoliosis, hernia, calcification, ...) is mentioned
   (``other_findings_block_no_finding=False`` turns that off).

Decisions (CheXpert's mention lists were the starting point; where we differ it is said here):

- Calcified granulomas and calcified nodules are *not* Lung Lesion (CheXpert's unmention list); they are other
  findings. Bony lesions ("lytic/sclerotic lesion of the rib") are not Lung Lesion either.
- "Lungs are clear" gives Lung Opacity 0 only (not Consolidation 0): it is a statement about opacities.
- Scarring and interstitial markings/pattern are Lung Opacity (CheXpert); pleural(-parenchymal) scarring and
  thickening are Pleural Other. Pulmonary fibrosis is an other finding (CheXpert puts any "fibrosis" under
  Pleural Other; we keep that class pleural).
- "Vascular congestion", "vascular prominence", "cephalization", "indistinctness" -> Edema uncertain;
  "heart failure"/"CHF" -> Edema positive and Cardiomegaly uncertain unless stated otherwise (CheXpert).
- Heart size "at the upper limits of normal"/"top normal" -> Cardiomegaly 0 (CheXpert); "borderline" -> -1.
- "Stable/unchanged cardiomediastinal silhouette" with no size word -> not mentioned. CheXpert calls it
  uncertain, which would withhold No Finding from many normal follow-up reports.
- "Likely X" and "X is likely" -> uncertain (CheXpert only treats "less likely" so); "consistent with X" ->
  positive (CheXpert).
- Support Devices covers tubes, catheters, lines, ports, pacemakers/ICDs and leads, wires, surgical clips,
  stents, valves, hardware and other devices.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mavilt.data.labels import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, Labels, apply_conventions

log = logging.getLogger(__name__)

_OTHER = "_other"  # findings outside the 14 that still mean "not a normal study"

FINDING, DESCRIPTOR, NEGATIVE_ONLY = "finding", "descriptor", "negative_only"


@dataclass(frozen=True)
class _Phrase:
    observation: str
    pattern: re.Pattern[str]
    kind: str = FINDING
    base: int = POSITIVE  # the label when no cue applies (UNCERTAIN for phrases that are hedges by themselves)
    exclude: re.Pattern[str] | None = None  # a match of this around the mention drops it (CheXpert "unmention")


def _p(observation: str, regex: str, kind: str = FINDING, base: int = POSITIVE, exclude: str | None = None) -> _Phrase:
    return _Phrase(observation, re.compile(regex), kind, base, re.compile(exclude) if exclude else None)


_BONE = r"(?:rib|ribs|clavicle|clavicles|scapula|humerus|humeral|spine|spinal|vertebra|vertebrae|vertebral|sternum|bone|bones|bony|osseous)"

_MENTIONS: tuple[_Phrase, ...] = (
    # --- Enlarged Cardiomediastinum: anatomy descriptors, labelled by their size qualifier.
    _p(
        "Enlarged Cardiomediastinum",
        r"\bcardiomediastinal\s+(?:silhouettes?|contours?|shadow|size|width|structures)\b|\bcardiomediastinum\b"
        r"|\bmediastinum\b|\bmediastinal\s+(?:silhouettes?|contours?|shadow|width|configuration|widening|"
        r"enlargement|prominence|structures)\b",
        kind=DESCRIPTOR,
    ),
    # --- Cardiomegaly
    _p("Cardiomegaly", r"\bcardiomegaly\b|\bcardiac\s+enlargement\b|\bcardiac\s+hypertrophy\b"),
    _p(
        "Cardiomegaly",
        r"\bheart(?:\s+(?:size|silhouette|shadow|contours?))?\b(?!\s+(?:failure|borders?|valves?|disease|rate|and\s+lungs?\b))"
        r"|\bcardiac\s+(?:silhouettes?|size|shadow|contours?|configuration|dimensions?)\b"
        r"|\bcardiac\b(?=\s+and\s+mediastinal\s+(?:contours?|silhouettes?))",
        kind=DESCRIPTOR,
    ),
    # --- Lung Opacity
    _p(
        "Lung Opacity",
        r"\bopaci(?:ty|ties|fication|fications|fied)\b|\binfiltrat(?:e|es|ion|ions|ive)\b"
        r"|\b(?:air[\s-]?space|alveolar)\s+(?:disease|process|filling)\b|\bhaz(?:iness|y)\b"
        r"|\bdensit(?:y|ies)\b|\binterstitial\s+(?:markings?|pattern|prominence|thickening|changes?|disease|"
        r"lung\s+disease|accentuation)\b|\breticul(?:ar|ation|onodular)\b"
        r"|\bscar(?:s|ring|red)?\b|\b(?:peri)?bronchial\s+(?:wall\s+)?(?:thickening|cuffing)\b",
        exclude=r"pleural[\s-]+(?:parenchymal\s+)?scar|pleuro[\s-]?parenchymal\s+scar|"
        r"(?:bone|bony|osseous|soft[\s-]tissue|nodular|calcified|calcific|metallic|sclerotic|breast|mineral)\s+"
        r"(?:\w+\s+)?densit",
    ),
    _p(
        "Lung Opacity",
        r"\b(?:lungs?|lung\s+fields?)\s+(?:(?:are|is|appear|appears|remain|remains|otherwise|now|grossly|"
        r"essentially|again|both|bilaterally|well[\s-]expanded|expanded|and)\s+){0,4}clear\b|\bclear\s+lungs?\b",
        kind=NEGATIVE_ONLY,
    ),
    # --- Lung Lesion
    _p(
        "Lung Lesion",
        r"\bnodul(?:e|es|i)\b|\bnodular\s+(?:densit\w+|opacit\w+|opacification|lesions?|foci|focus)\b"
        r"|\bmass(?:es)?\b|\b(?:neoplasms?|tumou?rs?|carcinomas?|malignancy|malignancies|cancer)\b"
        r"|\blesions?\b|\bcavitary\s+(?:lesions?|mass|nodules?)\b",
        exclude=r"\bcalcified\s+(?:\w+\s+){0,3}nodul|\bmass\s+effect\b|"
        r"(?:lytic|sclerotic|blastic|bony|bone|osseous|destructive|expansile|skin|cutaneous|rib)\s+(?:\w+\s+)?lesions?"
        r"|lesions?\s+(?:of|in|within|involving)\s+(?:the\s+)?(?:\w+\s+){0,2}" + _BONE + r"\b"
        r"|(?:breast|skin|soft[\s-]tissue|chest\s+wall)\s+(?:\w+\s+)?mass",
    ),
    # --- Edema
    _p("Edema", r"\bedema(?:tous)?\b|\b(?:congestive\s+)?heart\s+failure\b|\bchf\b", exclude=r"soft[\s-]tissue\s+edema"),
    _p(
        "Edema",
        r"\bcongestion\b|\bcongested\b|\b(?:pulmonary\s+)?vascular\s+(?:prominence|engorgement|redistribution|"
        r"indistinctness|crowding)\b|\bcephalization\b|\bindistinct(?:ness)?\b",
        base=UNCERTAIN,
        exclude=r"nasal\s+congestion",
    ),
    # --- Consolidation
    _p("Consolidation", r"\bconsolidat(?:ion|ions|ed|ive|ing)\b"),
    # --- Pneumonia
    _p(
        "Pneumonia",
        r"\b(?:broncho)?pneumonias?\b|\bpneumonitis\b|\binfect(?:ion|ions|ious)\b",
        exclude=r"granulomatous\s+(?:\w+\s+)?infect|(?:old|prior|remote|previous|healed)\s+(?:\w+\s+)?infect",
    ),
    # --- Atelectasis
    _p(
        "Atelectasis",
        r"\batelecta(?:sis|ses|tic)\b|\bcollaps(?:e|es|ed)\b",
        exclude=r"(?:vertebra\w*|compression|body|bodies|spine|spinal|disc)\s+(?:\w+\s+){0,2}collaps"
        r"|collaps\w*\s+(?:of\s+)?(?:the\s+)?(?:\w+\s+){0,3}(?:vertebra\w*|body|bodies)",
    ),
    # --- Pneumothorax
    _p(
        "Pneumothorax",
        r"\b(?:hydro|hemo)?pneumothora(?:x|xes|ces)\b|\bpleural\s+air\b|\bptx\b",
    ),
    # --- Pleural Effusion
    _p(
        "Pleural Effusion",
        r"\beffusions?\b|\bpleural\s+fluid\b|\bhydro(?:pneumo)?thorax\b",
        exclude=r"(?:pericardial|joint|knee|shoulder)\s+(?:\w+\s+)?effusions?",
    ),
    _p(
        "Pleural Effusion",
        r"\bblunt(?:ing|ed)\b(?=(?:\s+\S+){0,5}\s+(?:costophrenic|cp|costodiaphragmatic)\b)"
        r"|\b(?:costophrenic|cp|costodiaphragmatic)\s+(?:\S+\s+){0,3}blunt(?:ing|ed)\b",
        base=UNCERTAIN,
    ),
    # --- Pleural Other
    _p(
        "Pleural Other",
        r"\bpleural\s+(?:thickening|plaques?|scar\w*|calcifications?|fibrosis|reaction)\b"
        r"|\bpleuro[\s-]?parenchymal\s+(?:scar\w*|thickening|changes?|opacit\w*)\b"
        r"|\bpleural[\s-]+parenchymal\s+(?:scar\w*|thickening|changes?)\b|\bfibrothorax\b"
        r"|\bthickened\s+pleura\b|\b(?:bi)?apical\s+(?:pleural\s+)?(?:caps?|thickening)\b",
    ),
    # --- Fracture
    _p("Fracture", r"\bfractur(?:e|es|ed)\b|\bfx\b"),
    # --- Support Devices
    _p(
        "Support Devices",
        r"\btub(?:e|es|ing)\b|\bcatheters?\b|\bpicc\b|\bport(?:-?a-?cath)?s?\b|\bmediport\b"
        r"|\b(?:central(?:\s+venous)?|picc|pic|venous|arterial|swan[\s-]ganz|dialysis|xxxx)\s+lines?\b"
        r"|\blines\s+and\s+tubes\b|\bpace(?:maker|r)s?\b|\bpacing\b|\ba?icds?\b|\bdefibrillators?\b"
        r"|\b(?:pacer|pacemaker|pacing|icd|aicd|defibrillator|transvenous|epicardial|cardiac|ventricular|atrial)"
        r"\s+(?:\w+\s+)?(?:leads?|electrodes?)\b|\bwires?\b|\bclips?\b|\bstents?\b|\bdevices?\b|\bhardware\b"
        r"|\bprosthe(?:sis|ses|tic)\b|\bvalve\s+(?:replacement|prosthesis)\b|\barthroplast\w*\b|\bscrews?\b"
        r"|\bcoils?\b|\bdrains?\b|\bstaples?\b|\bcannula\b|\bsternotomy\s+(?:wires?|sutures?|xxxx)\b"
        r"|\bballoon\s+pump\b|\biabp\b|\blvad\b|\bivc\s+filter\b|\bgenerator\b|\bmonitor(?:ing)?\s+leads\b"
        # IU X-ray anonymised "chest port"/"chest catheter" as "chest XXXX": its tip gives it away.
        r"|\btips?\b(?=\s+(?:\S+\s+){0,5}(?:svc|atrium|ventricle|cavoatrial|carina|stomach|junction|clavicle))"
        r"|\b(?:chest|subclavian|jugular|ij)\s+xxxx\b(?=\s+(?:\S+\s+){0,4}tips?\b)",
        exclude=r"\bsupport\b",
    ),
    # --- Other findings: never reported, but they withhold No Finding (CheXpert's no_finding mention list).
    _p(
        _OTHER,
        r"\bemphysema\w*|\bcopd\b|\bchronic\s+obstructive\b|\bhyper(?:inflat|expan|aera|lucen)\w*|\bbull(?:a|ae|ous)\b"
        r"|\bblebs?\b|\bgranulom\w*|\bcalcif\w*|\batheroscler\w*|\btortu\w*|\bectatic\b|\bectasia\b|\baneurysm\w*"
        r"|\bunfold\w*|\bdegenerat\w*|\bspondylo\w*|\bosteophyt\w*|\bscolio\w*|\b(?:levo|dextro)(?:scoliosis|curvature)\b"
        r"|\bkypho\w*|\bdeformit\w*|\barthrit\w*|\barthropath\w*|\bosteopen\w*|\bosteoporo\w*|\bhernia\w*"
        r"|\beventration\b|\belevat(?:ed|ion)\b(?=(?:\s+\S+){0,4}\s+(?:hemi)?diaphragm)"
        r"|\b(?:hemi)?diaphragms?\s+(?:\S+\s+){0,3}elevat\w*|\bvolume\s+loss\b|\b(?:lymph)?adenopathy\b"
        r"|\bhil(?:ar|um|a)\s+(?:enlargement|prominence|fullness)\b|\b(?:enlarged|prominent)\s+hil(?:a|um|ar)\b"
        r"|\bmetasta\w*|\bpneumomediastinum\b|\bpneumoperitoneum\b|\bfree\s+(?:intraperitoneal\s+|subdiaphragmatic\s+)?air\b"
        r"|\baspiration\b|\bcontusions?\b|\bhemorrhage\b|\bhematoma\b|\bbronchiectasis\b|\bbronchitis\b"
        r"|\bairways?\s+disease\b|\bfibro(?:sis|tic)\b|\bcyst(?:s|ic)?\b|\bcavit(?:y|ies|ation)\b|\blucenc(?:y|ies)\b"
        r"|\bforeign\s+bod(?:y|ies)\b|\bpectus\b|\bprominen\w*|\bthickening\b|\bpericardial\s+effusion\b"
        r"|\b(?:sclerotic|lytic|sclerosis|expansile|myeloma)\b|\btuberculosis\b|\b(?:lob|pneumon|mastect)ectomy\b",
        exclude=r"\bno\s+(?:\w+\s+)?calcif",
    ),
)

# --- Cues ----------------------------------------------------------------------------------------------------
# Scope ends here (the terminator starts the next clause).
_TERMINATOR = re.compile(
    r";|\bbut\b(?!\s+(?:\S+\s+){0,2}(?:excluded|ruled\s+out))|\bhowever\b|\balthough\b|\bthough\b|\bwhich\b"
    r"|\bwhereas\b|\bwhile\b|\botherwise\b|\bexcept\b|\bother\s+than\b|\baside\s+from\b|\bapart\s+from\b"
    r"|\bthere\s+(?:is|are|has\s+been|have\s+been|was|were)\b|,\s*with\b|\bwith\s+the\s+exception\b"
    r"|\bthat\s+(?:may|might|could|is|are)\b"
)
# Inside a clause, descriptors ("heart size and the mediastinum is widened") get their own segment.
_SEGMENT = re.compile(r",|\band\b(?=\s+(?:the\s+)?\w+\s+(?:is|are|appears?|remains?)\b)")
# Uncertain whatever else is said (CheXpert's pre-negation uncertainty): both directions in the clause.
_PRE_NEG_UNCERTAIN = re.compile(
    r"\b(?:cannot|can\s*not|can't|could\s+not|not)\s+(?:be\s+)?(?:entirely\s+|completely\s+|definitely\s+|totally\s+|"
    r"fully\s+)?(?:excluded?|ruled?\s+out)\b|\bdifficult\s+to\s+exclude\b"
    r"|\bnot\s+(?:well|clearly|definitely)\s+(?:seen|visualized|evaluated)\b"
)
_NO_NEW = re.compile(r"\bno\s+new\b")  # "no new X": X may still be there (forward only)
# Forward negation over the rest of the clause (lists: "no effusion, pneumothorax or consolidation").
_NEG_FORWARD = re.compile(
    r"\bno\b|\bwithout\b|\bnegative\s+for\b|\bfree\s+of\b|\bclear\s+of\b|\babsen(?:ce|t)\s+of\b"
    r"|\b(?:resolution|removal|clearing|disappearance|resolving)\s+of\b|\brather\s+than\b|\bhistory\s+of\b"
    r"|\bnor\b|\bneither\b|\b(?:does|do|did)\s+not\s+(?:appear|seem|represent)\b"
    r"|\bnot\s+(?:any\s+)?(?:evidence|signs?)\s+(?:of|for)\b"
)
# "No change in the effusion" does not negate the effusion.
_PSEUDO_NEG = re.compile(
    r"\b(?:no|without)\s+(?:(?:significant|substantial|interval|definite|appreciable|marked|further|other|"
    r"gross|major)\s+)*(?:change|changes|increase|decrease|progression|improvement|worsening|enlargement\s+of\s+the\s+"
    r"(?:known|previously))\b"
)
# Negating adjectives: apply to descriptors anywhere in their segment, to findings only when adjacent.
_NEG_ADJECTIVE = re.compile(
    r"\bnormal\b|\bunremarkable\b|\bwnl\b|\bnegative\b|\btop[\s-]normal\b|\bhigh[\s-]normal\b"
)
# Post-negation inside a segment: "pneumothorax is not seen", "effusion has resolved", "tube removed".
_NEG_LOCAL = re.compile(
    r"\bnot\s+(?:\w+\s+)?(?:enlarged|widened|increased|seen|identified|present|visualized|demonstrated|appreciated|"
    r"noted|evident|apparent|visible|detected|shown|large|dilated)\b|\bresolved\b|\bresolution\b|\babsent\b"
    r"|\bremoved\b|\bno\s+longer\b|\bcleared\b|\bruled\s+out\b|\bnot\b(?=\s*$)"
)
# Forward uncertainty over the rest of the clause.
_UNC_FORWARD = re.compile(
    r"\bpossib(?:le|ly)\b|\bprobabl[ey]\b|\blikely\b|\bquestionabl[ey]\b|\bquestion\s+of\b|\bsuspicious\b"
    r"|\bsuspect(?:ed|s)?\b|\bsuspicion\b|\bconcern(?:ing|s)?\s+(?:for|of)\b|\bworrisome\b|\b(?:may|might|could)\b"
    r"|(?<!to\s)\bsuggest(?:s|ive|ing|ed)?\b|\bdifferential\b|\bconsider(?:ed|ation)?\b|\bequivocal\b"
    r"|\bindeterminate\b|\bpresum(?:ed|ably|ptive)\b|\bborderline\b|\bversus\b|\bvs\b|\bfavou?r(?:ed|s)?\b"
    r"|\bpotential(?:ly)?\b|\brule\s+out\b|\br/o\b|\bevaluat(?:e|ion)\s+for\b|\bcorrelat(?:e|ion)\s+(?:\w+\s+)?for\b"
    r"|\bxxxx\s+(?:represent\w*|reflect\w*|secondary|due|related)\b|\bmost\s+xxxx\b|\bless\s+xxxx\b"
    r"|\bcompatible\s+with\s+(?:\w+\s+)?(?:or|versus)\b|\bsymptoms?\s+of\b|\balternatively\b"
)
# Backward uncertainty inside a segment: "atelectasis is likely", "may be present", "pneumonia?".
_UNC_LOCAL = re.compile(
    r"\b(?:is|are|be|seems?|appears?)\s+(?:\w+\s+)?(?:possible|probable|likely|questionable|suspected|favou?red|"
    r"questioned|considered|uncertain)\b|\b(?:may|might|could)\s+(?:also\s+)?(?:be\s+)?(?:present|seen|noted|"
    r"developing|forming|visualized)\b|\?|\bsuspected\b|\bborderline\b|\bconsideration\b"
)
# Hedges that still count after a negation cue in the same clause (a new assertion, not a list adjective).
_STRONG_HEDGE = re.compile(
    r"may|might|could|likely|most\s+xxxx|xxxx|probably|versus|vs|suggest|concern|worrisome|differential|consider"
    r"|compatible|rule|r/o|evaluat|correlat|favou?r|presum"
)
# "X or Y", "X versus Y": both sides uncertain when near the conjunction (and not negated).
_AND = re.compile(r"\b(?:and|with|without|in|of)\b")
_UNC_CONJ = re.compile(r"\band/or\b|\bor\b|\bversus\b|\bvs\b")
# Descriptors: what counts as "enlarged" for the heart and mediastinum.
_ENLARGED = re.compile(
    r"\benlarg\w*|\blarge\b|\blarger\b|\bwiden\w*|\bwide\b|\bprominen\w*|\bincreas\w*|\bdilat\w*"
)

_SENTENCE = re.compile(r"(?<=[?!])\s+|(?<!\d)\.(?!\d)|\n+")
_ABBREVIATIONS = ((re.compile(r"\bvs\."), "vs"), (re.compile(r"\b(e\.g|i\.e|approx|dr)\."), r"\1"))


@dataclass
class _Mention:
    observation: str
    start: int
    end: int
    kind: str
    base: int
    text: str


def _spans(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in pattern.finditer(text)]


def _words_between(text: str, a: int, b: int) -> int:
    return len(text[a:b].split()) if b > a else 0


def _clauses(text: str) -> list[str]:
    text = text.lower()
    for pattern, repl in _ABBREVIATIONS:
        text = pattern.sub(repl, text)
    clauses: list[str] = []
    for sentence in _SENTENCE.split(text):
        sentence = " ".join(sentence.split())
        if not sentence:
            continue
        cuts = [0] + [m.start() for m in _TERMINATOR.finditer(sentence) if m.start() > 0] + [len(sentence)]
        clauses += [sentence[a:b].strip() for a, b in zip(cuts, cuts[1:]) if sentence[a:b].strip()]
    return clauses


def _find_mentions(clause: str) -> list[_Mention]:
    out: list[_Mention] = []
    for ph in _MENTIONS:
        excluded = _spans(ph.exclude, clause) if ph.exclude else []
        for m in ph.pattern.finditer(clause):
            if any(s <= m.start() < e or s < m.end() <= e or (m.start() <= s and e <= m.end()) for s, e in excluded):
                continue
            out.append(_Mention(ph.observation, m.start(), m.end(), ph.kind, ph.base, m.group(0)))
    return out


def _segment_bounds(clause: str, pos: int, cuts: list[int]) -> tuple[int, int]:
    start = max((c for c in cuts if c <= pos), default=0)
    end = min((c for c in cuts if c > pos), default=len(clause))
    return start, end


_VERB = re.compile(r"\b(?:is|are|was|were|appears?|remains?|seems?|measures?|has|have)\b")
_NO_BEFORE = re.compile(r"\bno\b|\bwithout\b")
_UPPER_NORMAL = re.compile(r"\b(?:upper|high|top)\s+(?:limits?\s+of\s+)?normal\b")


def _label_descriptor(clause: str, m: _Mention, cuts: list[int]) -> int | None:
    """Heart/mediastinum descriptors take their label from a size qualifier in their own segment; a bare list
    item ("heart size, mediastinal contours and vascularity are normal") takes it from the next segment."""
    a, b = _segment_bounds(clause, m.start, cuts)
    label = _size_qualifier(clause[a:b], m.start - a, m.end - a)
    while label is None and not _VERB.search(clause[a:b]) and b < len(clause):
        a, b = _segment_bounds(clause, b, cuts)
        label = _size_qualifier(clause[a:b], 0, 0)
    return label


def _size_qualifier(seg: str, d_start: int, d_end: int) -> int | None:
    """The size qualifier nearest the descriptor at ``seg[d_start:d_end]`` decides: "enlarged heart with normal
    vascularity" is enlarged, "normal heart size without effusion" is normal."""
    if _PRE_NEG_UNCERTAIN.search(seg) and _ENLARGED.search(seg) or re.search(r"\bborderline\b", seg):
        return UNCERTAIN
    negative = _spans(_NEG_ADJECTIVE, seg) + _spans(_NEG_LOCAL, seg) + _spans(_UPPER_NORMAL, seg)
    nos = _spans(_NO_BEFORE, seg)
    enlarged = []
    for s, e in _spans(_ENLARGED, seg):
        if any(a <= s < b for a, b in negative):  # "not enlarged"
            continue
        if any(ne <= s for _, ne in nos):  # "no enlargement of the heart", "no mediastinal widening"
            negative.append((s, e))
            continue
        enlarged.append((s, e))

    def distance(span: tuple[int, int]) -> int:
        s, e = span
        return 0 if s < d_end and e > d_start else min(abs(s - d_end), abs(d_start - e))

    qualifiers = [(distance(q), NEGATIVE) for q in negative] + [(distance(q), POSITIVE) for q in enlarged]
    if not qualifiers:
        return None
    label = min(qualifiers)[1]
    if label == POSITIVE and (_UNC_FORWARD.search(seg) or _UNC_LOCAL.search(seg)):
        return UNCERTAIN
    return label


def _label_mention(clause: str, m: _Mention, cues: dict[str, list[tuple[int, int]]], cuts: list[int]) -> int | None:
    if m.kind == NEGATIVE_ONLY:
        return NEGATIVE
    if m.kind == DESCRIPTOR:
        return _label_descriptor(clause, m, cuts)
    seg_start, seg_end = _segment_bounds(clause, m.start, cuts)
    # 1. "cannot exclude X", "no new X" before it in the clause; "X is not excluded" after it in its segment.
    if any(e <= m.start for _, e in cues["pre_unc"] + cues["no_new"]) or any(
        m.end <= s < seg_end for s, _ in cues["pre_unc"]
    ):
        return UNCERTAIN
    # 2. The nearest forward cue before the mention decides between negation and uncertainty.
    # Adjectival hedges inside a negated list ("no consolidation, suspicious opacity or effusion") do not undo
    # the negation; a modal or "likely" after it starts a new assertion ("no effusion, likely atelectasis").
    neg_ends = [e for _, e in cues["neg_fwd"] if e <= m.start]
    unc_ends = [
        e for s, e in cues["unc_fwd"] if e <= m.start and (not neg_ends or _STRONG_HEDGE.match(clause, s))
    ]
    forward = [(e, NEGATIVE) for e in neg_ends] + [(e, UNCERTAIN) for e in unc_ends]
    state = max(forward)[1] if forward else None
    # 3. Local negation inside the segment.
    local_neg = any(seg_start <= s < seg_end and (e <= m.start or s >= m.end) for s, e in cues["neg_local"])
    adjacent_neg = any(
        seg_start <= s < seg_end
        and ((e <= m.start and _words_between(clause, e, m.start) <= 3) or (s >= m.end and _words_between(clause, m.end, s) <= 4))
        for s, e in cues["neg_adj"]
    )
    if state == NEGATIVE or local_neg or adjacent_neg:
        return NEGATIVE
    # 4. Uncertainty: forward cue, a hedge after it in its segment, "X or Y", or a hedging phrase.
    local_unc = any(seg_start <= s < seg_end and s >= m.end for s, _ in cues["unc_local"])
    # "atelectasis or scarring", "or subsegmental atelectasis": only close to the conjunction, not across "and".
    conj_unc = any(
        seg_start <= s < seg_end
        and (
            (s >= m.end and _words_between(clause, m.end, s) <= 1 and not _AND.search(clause, m.end, s))
            or (e <= m.start and _words_between(clause, e, m.start) <= 3 and not _AND.search(clause, e, m.start))
        )
        for s, e in cues["unc_conj"]
    )
    if state == UNCERTAIN or local_unc or conj_unc or m.base == UNCERTAIN:
        return UNCERTAIN
    return POSITIVE


def _clause_cues(clause: str) -> dict[str, list[tuple[int, int]]]:
    pseudo = _spans(_PSEUDO_NEG, clause)
    no_new = _spans(_NO_NEW, clause)
    masked = pseudo + no_new

    def keep(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(s, e) for s, e in spans if not any(a <= s < b for a, b in masked)]

    return {
        "pre_unc": _spans(_PRE_NEG_UNCERTAIN, clause),
        "no_new": no_new,
        "neg_fwd": keep(_spans(_NEG_FORWARD, clause)),
        "neg_local": keep(_spans(_NEG_LOCAL, clause)),
        "neg_adj": _spans(_NEG_ADJECTIVE, clause),
        "unc_fwd": _spans(_UNC_FORWARD, clause),
        "unc_local": _spans(_UNC_LOCAL, clause),
        "unc_conj": _spans(_UNC_CONJ, clause),
    }


def mention_labels(text: str) -> list[tuple[str, str, int | None]]:
    """Every mention found in ``text`` as (observation, matched text, label): for debugging phrase lists."""
    out: list[tuple[str, str, int | None]] = []
    for clause in _clauses(text or ""):
        mentions = _find_mentions(clause)
        if not mentions:
            continue
        cues = _clause_cues(clause)
        cuts = [m.start() for m in _SEGMENT.finditer(clause)]
        for m in mentions:
            label = _label_mention(clause, m, cues, cuts)
            out.append((m.observation, m.text, label))
            # CheXpert: "heart failure"/"CHF" stated (or suspected) implies a possibly enlarged heart.
            if m.observation == "Edema" and label in (POSITIVE, UNCERTAIN) and re.search(r"failure|chf", m.text):
                out.append(("Cardiomegaly", m.text, UNCERTAIN))
    return out


def _aggregate(labels: Iterable[int | None]) -> int | None:
    seen = set(labels)
    for value in (POSITIVE, UNCERTAIN, NEGATIVE):  # CheXpert: positive > uncertain > negative
        if value in seen:
            return value
    return None


def label_report(text: str, *, other_findings_block_no_finding: bool = True) -> Labels:
    """The 14 CheXpert labels (1 / 0 / -1 / None) of one report."""
    per_obs: dict[str, list[int | None]] = {}
    for observation, _, label in mention_labels(text):
        per_obs.setdefault(observation, []).append(label)
    raw = {o: _aggregate(per_obs.get(o, [])) for o in OBSERVATIONS if o != "No Finding"}
    out = apply_conventions(raw)
    if other_findings_block_no_finding and _aggregate(per_obs.get(_OTHER, [])) in (POSITIVE, UNCERTAIN):
        out["No Finding"] = None
    return out


def label_reports(texts: Sequence[str], *, other_findings_block_no_finding: bool = True) -> list[Labels]:
    """Label each report: a dict over :data:`mavilt.data.labels.OBSERVATIONS` with 1, 0, -1 or None.

    ``texts`` are report sections (findings, impression or both); None/empty gives an all-None row with
    No Finding = 1 (nothing abnormal was said), as CheXpert does for a report without mentions.
    """
    if isinstance(texts, str):
        raise TypeError("label_reports takes a list of reports; for one report use label_report(text)")
    rows = [label_report(t or "", other_findings_block_no_finding=other_findings_block_no_finding) for t in texts]
    log.debug("labelled %d reports", len(rows))
    return rows
