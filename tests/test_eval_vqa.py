"""VQA metrics: hand-computed accuracy per type and yes/no AUROC, and the per-type majority baseline with ties."""

from __future__ import annotations

import pytest

from mavilt.eval.vqa import majority_baseline, normalize_answer, vqa_metrics

YN = ["yes", "no"]


def item(t, answer, predicted, p_yes=None, choices=None):
    d = {"type": t, "question": f"a {t} question", "answer": answer, "predicted": predicted}
    if choices is not None:
        d["choices"] = choices
    if p_yes is not None:
        d["probabilities"] = {"yes": p_yes, "no": 1 - p_yes}
    return d


HAND = [
    item("presence", "yes", "yes", 0.9, YN),
    item("presence", "no", "yes", 0.6, YN),
    item("presence", "no", "no", 0.2, YN),
    item("presence", "yes", "no", 0.4, YN),
    item("view", "PA", "pa."),  # normalised: a match
    item("view", "AP", "PA"),
    item("view", "lateral", " Lateral "),
]


def test_accuracy_per_type_and_overall_by_hand():
    m = vqa_metrics(HAND)
    assert m["accuracy/presence"] == pytest.approx(2 / 4)
    assert m["accuracy/view"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["n"] == 7 and m["n/presence"] == 4 and m["n/view"] == 3


def test_yes_no_auroc_by_hand():
    m = vqa_metrics(HAND)
    # positives (gold yes) score 0.9, 0.4; negatives 0.6, 0.2: pairs won 3 of 4
    assert m["auroc_yes_no"] == pytest.approx(0.75)
    assert m["auroc_yes_no/presence"] == pytest.approx(0.75)
    assert m["n_yes_no_scored"] == 4
    assert "auroc_yes_no/view" not in m  # not a yes/no type
    # key case and a choice order other than yes,no do not matter
    flipped = [dict(it, probabilities={"No": 1 - it["probabilities"]["yes"], "Yes": it["probabilities"]["yes"]},
                    choices=["No", "Yes"]) for it in HAND[:4]]
    assert vqa_metrics(flipped)["auroc_yes_no"] == pytest.approx(0.75)


def test_auroc_is_none_with_one_class_or_no_probabilities():
    one_class = [item("presence", "yes", "yes", 0.9, YN), item("presence", "yes", "no", 0.3, YN)]
    m = vqa_metrics(one_class)
    assert m["auroc_yes_no"] is None and m["accuracy"] == pytest.approx(0.5)
    open_only = [item("presence", "yes", "yes"), item("presence", "no", "yes")]
    m = vqa_metrics(open_only)
    assert m["auroc_yes_no"] is None and m["n_yes_no_scored"] == 0


def test_input_errors():
    with pytest.raises(ValueError, match="no items"):
        vqa_metrics([])
    with pytest.raises(ValueError, match="item 1 has no 'predicted'"):
        vqa_metrics([HAND[0], {"type": "x", "answer": "yes"}])


def test_normalize_answer():
    assert normalize_answer("  Yes. ") == "yes" and normalize_answer(None) == "" and normalize_answer("Left lung") == "left lung"


TRAIN = [
    {"type": "presence", "answer": "yes"}, {"type": "presence", "answer": "no"},
    {"type": "presence", "answer": "Yes"}, {"type": "presence", "answer": "no."},  # 2 yes, 2 no: a tie
    {"type": "location", "answer": "left"}, {"type": "location", "answer": "left"},
    {"type": "location", "answer": "right"},
]


def test_majority_per_type_with_alphabetical_ties():
    test = [
        {"type": "presence", "answer": "yes", "choices": ["yes", "no"]},
        {"type": "presence", "answer": "no", "choices": ["yes", "no"]},
        {"type": "location", "answer": "right", "choices": ["left", "right", "bilateral"]},
        {"type": "location", "answer": "left"},  # open
        {"type": "severity", "answer": "mild"},  # unseen type: counts over all types
        {"type": "presence", "answer": "maybe", "choices": ["unsure", "maybe"]},  # no choice seen in training
    ]
    out = majority_baseline(TRAIN, test)
    assert [o["predicted"] for o in out] == ["no", "no", "left", "left", "left", "maybe"]
    assert out[0]["probabilities"] == {"yes": 0.5, "no": 0.5}
    assert out[2]["probabilities"] == pytest.approx({"left": 2 / 3, "right": 1 / 3, "bilateral": 0.0})
    assert out[3]["probabilities"] is None
    assert out[5]["probabilities"] == {"unsure": 0.5, "maybe": 0.5}
    # the test items are copied, not changed, and keep their fields
    assert "predicted" not in test[0] and out[2]["answer"] == "right" and out[2]["type"] == "location"
    m = vqa_metrics(out)
    assert m["accuracy/presence"] == pytest.approx(2 / 3)  # "no" right once, "maybe" right once
    assert m["accuracy/location"] == pytest.approx(1 / 2)
    assert m["auroc_yes_no"] == pytest.approx(0.5)  # a constant score


def test_majority_probabilities_follow_training_frequencies():
    train = [{"type": "presence", "answer": a} for a in ["yes", "yes", "yes", "no"]]
    test = [{"type": "presence", "answer": a, "choices": YN} for a in ["yes", "no"]]
    out = majority_baseline(train, test)
    assert [o["predicted"] for o in out] == ["yes", "yes"]
    assert all(o["probabilities"] == pytest.approx({"yes": 0.75, "no": 0.25}) for o in out)
    # restricted to the item's choices: the type's majority ("yes") is not offered here
    out = majority_baseline(train + [{"type": "presence", "answer": "maybe"}] * 2,
                            [{"type": "presence", "answer": "no", "choices": ["no", "maybe"]}])
    assert out[0]["predicted"] == "maybe" and out[0]["probabilities"] == pytest.approx({"no": 1 / 3, "maybe": 2 / 3})
    with pytest.raises(ValueError, match="no training items"):
        majority_baseline([], test)
