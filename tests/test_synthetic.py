"""The synthetic CXR source: determinism, finding locality and visibility, report/label/VQA agreement, sizes,
prevalence and the prepare-framework hooks. Plain pytest, no Ray."""

from __future__ import annotations

import dataclasses
import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mavilt.data import synthetic as S
from mavilt.data.images import decode_png
from mavilt.data.labels import OBSERVATIONS
from mavilt.data.prepare import PrepareParams
from mavilt.data.shards import SCHEMA, rows_to_table
from mavilt.data.synthetic.anatomy import heart_geometry
from mavilt.data.synthetic.canvas import RenderContext

# Keywords that name each finding in a sentence; negation and hedge cues as a simple labeler would see them.
KEYWORDS = {
    "cardiomegaly": r"cardiomegaly|heart size|heart is|cardiac silhouette",
    "effusion": r"effusion",
    "pneumothorax": r"pneumothorax",
    "nodule": r"nodule|nodular|\bmass\b",
    "consolidation": r"consolidation",
    "edema": r"edema",
    "atelectasis": r"atelectasis",
    "devices": r"\btubes?\b|catheter|central line",
}
NEGATION = re.compile(r"\b(no|not|without|normal|unremarkable)\b")
HEDGE = re.compile(r"possible|cannot be excluded|may represent|may be|could represent|questionable")
SIDE_WORDS = {"right": r"\bright\b", "left": r"\bleft\b", "bilateral": r"bilateral|bibasilar|both"}

# One case per finding is found by scanning this many indices of seed 0 (prevalence is ~15%).
SCAN = 120


def _sentences(text: str) -> list[str]:
    return [s.lower() for s in re.split(r"(?<=\.)\s+", text) if s]


def _classify(sentence: str) -> str:
    if HEDGE.search(sentence):
        return "hedged"
    if NEGATION.search(sentence):
        return "negated"
    return "asserted"


def _cases_with(name: str, certainty: str | None = None, limit: int = 3, seed: int = 0) -> list[S.Case]:
    out = []
    for i in range(2000):
        c = S.sample_case(seed, i)
        f = c.finding(name)
        if f is not None and (certainty is None or f.certainty == certainty):
            out.append(c)
            if len(out) == limit:
                break
    assert out, f"no case with {name} ({certainty})"
    return out


@pytest.fixture(scope="module")
def cases() -> list[S.Case]:
    return [S.sample_case(0, i) for i in range(300)]


# ---- determinism ---------------------------------------------------------------------------------------------


def test_same_seed_and_index_give_identical_case_pixels_report_and_labels():
    a, b = S.sample_case(7, 42), S.sample_case(7, 42)
    assert a == b
    np.testing.assert_array_equal(S.render(a, 64), S.render(b, 64))
    assert S.write_report(a) == S.write_report(b)
    assert S.case_labels(a) == S.case_labels(b)
    assert S.case_vqa(a) == S.case_vqa(b)


def test_different_index_or_seed_gives_a_different_image():
    base = S.render(S.sample_case(7, 42), 64)
    for other in (S.sample_case(7, 43), S.sample_case(8, 42)):
        assert np.abs(S.render(other, 64) - base).mean() > 0.01


def test_wording_seed_changes_phrasing_but_never_labels():
    changed = 0
    for i in range(40):
        c = S.sample_case(0, i)
        texts = {S.write_report(c, rng_seed=k) for k in range(4)}
        changed += len(texts) > 1
        # case_labels does not take the wording seed: what is said depends on the case alone.
        for k in range(4):
            f, imp = S.write_report(c, rng_seed=k)
            for name in S.FINDINGS:
                spec = c.finding(name)
                kinds = {_classify(s) for s in _sentences(f + " " + imp) if re.search(KEYWORDS[name], s)}
                if spec is None:
                    assert kinds <= {"negated"}
                elif spec.certainty == "present":
                    assert "asserted" in kinds
    assert changed >= 35


# ---- rendering: locality and visibility of each finding --------------------------------------------------------


@pytest.mark.parametrize("name", S.FINDINGS)
def test_finding_changes_pixels_only_inside_its_region(name):
    for case in _cases_with(name, limit=3):
        for size in (64, 96):
            with_f = S.render(case, size)
            without = S.render(case.without(name), size)
            region = S.finding_region(case, name, size)
            assert region.shape == (size, size) and region.dtype == bool
            diff = np.abs(with_f - without)
            assert diff[~region].max(initial=0.0) == 0.0, f"{name} changed pixels outside its region (case {case.index})"
            assert diff[region].max() > 0.0


# Visibility at 64 px, finding alone on a normal study. The thresholds are far above the pixel noise (sigma at
# most 0.035 * sqrt(intensity) ~ 0.02-0.03): a present finding changes some pixel by > 0.15 (~38 grey levels,
# > 5 sigma) and the region (which includes a 2 px margin) by > 0.02 on average, i.e. a visible blob or band,
# not a few speckles; uncertain ones are drawn at half intensity, so half the average.
@pytest.mark.parametrize("name", S.FINDINGS)
def test_each_finding_is_visible_at_64px(name):
    for certainty, mean_min, max_min in (("present", 0.02, 0.15), ("uncertain", 0.01, 0.07)):
        if name == "devices" and certainty == "uncertain":
            continue
        for case in _cases_with(name, certainty, limit=3):
            f = case.finding(name)
            alone = dataclasses.replace(case, findings=[f])
            diff = np.abs(S.render(alone, 64) - S.render(dataclasses.replace(case, findings=[]), 64))
            region = S.finding_region(alone, name, 64)
            assert diff[~region].max(initial=0.0) == 0.0
            assert diff[region].mean() > mean_min, (name, certainty, case.index, diff[region].mean())
            assert diff.max() > max_min, (name, certainty, case.index, diff.max())


def test_cardiomegaly_is_a_wider_heart_and_removing_it_restores_the_normal_ctr():
    case = _cases_with("cardiomegaly", "present", limit=1)[0]
    enlarged = heart_geometry(case)
    normal = heart_geometry(case.without("cardiomegaly"))
    width = lambda g: g[2] + g[3]  # noqa: E731
    ctr_norm = width(normal) / case.anatomy.thorax_width
    ctr_enl = width(enlarged) / case.anatomy.thorax_width
    mag = S.AP_MAGNIFICATION if case.view == "AP" else 1.0
    assert S.CTR_NORMAL[0] * mag <= ctr_norm <= S.CTR_NORMAL[1] * mag + 1e-9
    assert ctr_enl >= S.CTR_ENLARGED[0] * mag - 1e-9


def test_render_sizes_shapes_and_range_and_512_is_a_finer_64():
    case = _cases_with("effusion", "present", limit=1)[0]
    images = {s: S.render(case, s) for s in (32, 64, 256, 512)}
    for s, img in images.items():
        assert img.shape == (s, s) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert img.min() < 0.15 and img.max() > 0.6  # black air outside the body, bright bone/abdomen
    # Block-averaging the 512 render to 64 px reproduces the 64 px render up to noise.
    down = images[512].reshape(64, 8, 64, 8).mean(axis=(1, 3))
    assert np.abs(down - images[64]).mean() < 0.03
    assert np.corrcoef(down.ravel(), images[64].ravel())[0, 1] > 0.97


def test_anatomy_layout_white_is_dense():
    """Lungs darker than the mediastinum and the abdomen; black outside the body."""
    case = S.sample_case(0, 0)
    assert not case.findings
    img = S.render(case, 128)
    an = case.anatomy
    to_px = lambda x, y: tuple(int(v) for v in RenderContext(case, 128).to_pixels(x, y))  # noqa: E731
    half = an.thorax_width / 2
    c, r = to_px(an.midline - 0.55 * half, (an.apex_y + an.dome_right_y) / 2)
    lung = img[r - 2 : r + 3, c - 2 : c + 3].mean()
    c, r = to_px(an.midline, (an.apex_y + an.dome_right_y) / 2)
    mediastinum = img[r - 2 : r + 3, c - 1 : c + 2].mean()
    c, r = to_px(an.midline, 0.92)
    abdomen = img[r - 2 : r + 3, c - 2 : c + 3].mean()
    assert lung + 0.15 < mediastinum and lung + 0.15 < abdomen
    assert img[-3:, :2].mean() < 0.15 or img[:3, :3].mean() < 0.15


def test_bad_size_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="image size"):
        S.render(S.sample_case(0, 0), 4)


def test_finding_region_for_a_missing_finding_names_it():
    case = S.sample_case(0, 0)
    with pytest.raises(ValueError, match="nodule"):
        S.finding_region(case, "nodule", 64)


# ---- reports and labels ----------------------------------------------------------------------------------------


def test_labels_have_the_14_observations_and_follow_the_findings(cases):
    for c in cases:
        lab = S.case_labels(c)
        assert list(lab) == list(OBSERVATIONS)
        assert all(v in (None, 0, 1, -1) for v in lab.values())
        for name in S.FINDINGS:
            f, v = c.finding(name), lab[S.FINDING_OBSERVATION[name]]
            if f is None:
                assert v in (None, 0)
            else:
                assert v == (1 if f.certainty == "present" else -1)
        abnormal = [f for f in c.findings if f.name != "devices"]
        assert (lab["No Finding"] == 1) == (not abnormal)
        children = [lab[o] for o in ("Edema", "Consolidation", "Pneumonia", "Atelectasis", "Lung Lesion")]
        if 1 in children:
            assert lab["Lung Opacity"] == 1
        cons = c.finding("consolidation")
        assert lab["Pneumonia"] == (-1 if cons is not None and cons.params["pneumonia"] else None)


def test_report_words_match_the_labels(cases):
    for c in cases:
        findings, impression = S.write_report(c)
        assert findings and impression
        lab = S.case_labels(c)
        sentences = _sentences(findings + " " + impression)
        for name in S.FINDINGS:
            mentions = [s for s in sentences if re.search(KEYWORDS[name], s)]
            kinds = [_classify(s) for s in mentions]
            f = c.finding(name)
            obs = S.FINDING_OBSERVATION[name]
            if f is None:
                assert set(kinds) <= {"negated"}, (c.index, name, mentions)
                assert (lab[obs] == 0) == bool(mentions), (c.index, name, mentions, lab[obs])
                continue
            if f.certainty == "present":
                assert "asserted" in kinds and "negated" not in kinds, (c.index, name, mentions)
            else:
                assert kinds and set(kinds) == {"hedged"}, (c.index, name, mentions)
            for s in mentions:
                if f.side is not None and name != "edema":
                    assert re.search(SIDE_WORDS[f.side], s), (c.index, name, s)
                    for other in {"right", "left"} - set(f.sides):
                        assert not re.search(SIDE_WORDS[other], s), (c.index, name, s)
                if name in ("effusion", "pneumothorax"):
                    words = set(re.findall(r"\b(small|moderate|large)\b", s))
                    assert words == {f.size}, (c.index, name, s)
                if name == "nodule":
                    assert ("mass" in s) == (f.size == "mass"), s
                    assert f"{f.params['diameter_cm']:.1f} cm" in s
        if not [f for f in c.findings if f.name != "devices"]:
            assert re.search(r"no acute|normal chest", impression.lower())


def test_report_covers_every_section(cases):
    for c in cases[:100]:
        text = " ".join(S.write_report(c)).lower()
        assert re.search(KEYWORDS["cardiomegaly"] + "|heart", text)
        assert "mediastin" in text
        assert re.search(r"lung|consolidation|edema|atelectasis|nodule|mass", text)
        assert "effusion" in text and "pneumothorax" in text
        assert re.search(r"osseous|bony|fracture", text)


def test_reports_are_varied(cases):
    first_sentences = Counter(_sentences(S.write_report(c)[0])[0] for c in cases if not c.findings)
    assert len(first_sentences) >= 6
    assert len({S.write_report(c) for c in cases}) == len(cases)


# ---- VQA -----------------------------------------------------------------------------------------------------

QUESTION_FINDING = [
    ("devices", r"tube|line|support device"),
    ("effusion", r"pleural effusion"),
    ("pneumothorax", r"pneumothorax"),
    ("nodule", r"nodule|lesion|mass"),
    ("cardiomegaly", r"cardiomegaly"),
    ("consolidation", r"consolidation"),
    ("edema", r"edema"),
    ("atelectasis", r"atelectasis"),
]


def _question_finding(q: str) -> str:
    return next(n for n, pat in QUESTION_FINDING if re.search(pat, q.lower()))


def test_vqa_answers_are_in_their_choices_and_agree_with_labels(cases):
    types, answers = Counter(), Counter()
    for c in cases:
        items = S.case_vqa(c)
        assert 3 <= len(items) <= 6
        lab = S.case_labels(c)
        for it in items:
            assert set(it) == {"question", "answer", "type", "choices"}
            assert it["answer"] in it["choices"], it
            types[it["type"]] += 1
            if it["type"] == "presence":
                name = _question_finding(it["question"])
                assert it["choices"] == ["yes", "no"]
                assert (it["answer"] == "yes") == (lab[S.FINDING_OBSERVATION[name]] == 1), (c.index, it)
                answers[it["answer"]] += 1
            elif it["type"] == "laterality":
                f = c.finding(_question_finding(it["question"]))
                assert it["choices"] == ["left", "right", "bilateral"] and it["answer"] == f.side
                assert f.certainty == "present"
            elif it["type"] == "size":
                f = c.finding(_question_finding(it["question"]))
                assert it["answer"] == f.size and it["choices"] == S.SIZE_CHOICES[f.name]
            elif it["type"] == "abnormality":
                main = next((n for n in S.IMPORTANCE if (f := c.finding(n)) and f.certainty == "present"), None)
                assert it["answer"] == (S.PLAIN_NAMES[main] if main else "none")
                assert it["choices"] == S.ABNORMALITY_CHOICES
            else:
                raise AssertionError(f"unknown VQA type {it['type']}")
        assert len({it["question"] for it in items}) == len(items)
    assert set(types) == {"presence", "laterality", "abnormality", "size"}
    assert 0.3 < answers["yes"] / sum(answers.values()) < 0.6


# ---- prevalence ----------------------------------------------------------------------------------------------


def test_prevalence_over_1000_cases():
    counts, normal, ap, dev_ap, n = Counter(), 0, 0, 0, 1000
    for i in range(n):
        c = S.sample_case(0, i)
        counts.update(f.name for f in c.findings)
        normal += not c.findings
        ap += c.view == "AP"
        dev_ap += c.view == "AP" and c.finding("devices") is not None
    for name in S.FINDINGS:
        assert 0.08 <= counts[name] / n <= 0.30, (name, counts[name])
    assert 0.15 <= normal / n <= 0.40
    assert 0.28 <= ap / n <= 0.42
    assert dev_ap / ap > 2 * (counts["devices"] - dev_ap) / (n - ap)  # AP studies carry most devices


# ---- prepare-framework hooks ---------------------------------------------------------------------------------


def _params(**kw) -> PrepareParams:
    base = dict(source="synthetic", root=None, image_size=64, bit_depth=8, seed=3, split_fractions=[0.8, 0.1, 0.1],
                num_samples=200)
    base.update(kw)
    return PrepareParams(**base)


def test_scan_assigns_deterministic_exact_splits():
    recs = S.scan(_params()).records
    assert [r["index"] for r in recs] == list(range(200))
    assert len({r["image_id"] for r in recs}) == len({r["study_id"] for r in recs}) == 200
    assert recs[5]["study_id"] == "syn-s000005" and recs[5]["image_id"] == "syn-i000005"
    assert Counter(r["split"] for r in recs) == {"train": 160, "validate": 20, "test": 20}
    assert recs == S.scan(_params()).records
    assert [r["split"] for r in recs] != [r["split"] for r in S.scan(_params(seed=4)).records]


def test_convert_makes_schema_rows_8_and_16_bit():
    params = _params(num_samples=6)
    recs = S.scan(params).records
    rows = [S.convert(r, params) for r in recs]
    table = rows_to_table(rows)
    assert table.schema == SCHEMA and table.num_rows == 6
    for rec, row in zip(recs, rows):
        case = S.sample_case(params.seed, rec["index"])
        assert row["split"] == rec["split"] and row["view"] == case.view
        assert (row["findings"], row["impression"]) == S.write_report(case)
        img = decode_png(row["image"])
        assert img.shape == (64, 64)
        assert np.abs(img - S.render(case, 64)).max() <= 0.5 / 255 + 1e-6
    p16 = _params(num_samples=2, bit_depth=16, image_size=96)
    row = S.convert(S.scan(p16).records[1], p16)
    assert Image.open(io.BytesIO(row["image"])).mode.startswith("I;16")
    img = decode_png(row["image"])
    assert img.shape == (96, 96)
    assert np.abs(img - S.render(S.sample_case(3, 1), 96)).max() <= 0.5 / 65535 + 1e-6


def test_make_rows_matches_convert():
    rows = S.make_rows(3, seed=3, image_size=32)
    assert [r["image_id"] for r in rows] == ["syn-i000000", "syn-i000001", "syn-i000002"]
    params = _params(num_samples=3, image_size=32)
    for rec, row in zip(S.scan(params).records, rows):
        assert S.convert(rec, params) == row
