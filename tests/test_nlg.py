"""Report metrics: hand-computed values, equality with pycocoevalcap, normalisation, edge cases, Java errors.

METEOR's JVM takes a few seconds to start: all tests share the one that mavilt.eval.nlg keeps per process.
"""

from __future__ import annotations

import math
import shutil
import threading

import pytest

from mavilt.eval import nlg
from mavilt.eval.nlg import (
    EMPTY_PLACEHOLDER,
    METRICS,
    MeteorUnavailableError,
    normalize_report,
    score,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")

REFS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small bilateral pleural effusions with bibasilar atelectasis.",
    "No focal consolidation. Degenerative changes of the thoracic spine.",
    "Right PICC line with tip in the mid SVC. No pneumothorax.",
    "Heart size is within normal limits. XXXX opacity in the left lung base, likely atelectasis.",
    "Lungs are hyperinflated. No acute cardiopulmonary abnormality.",
]
HYPS = [
    "The heart size is normal. Lungs are clear. There is no pleural effusion.",
    "The heart is enlarged. Small left pleural effusion.",
    "No focal consolidation, pneumothorax or pleural effusion.",
    "",
    "Heart size is normal. Left basilar atelectasis.",
    "No acute cardiopulmonary abnormality.",
]


@needs_java
def test_identical_texts_score_one() -> None:
    texts = ["the heart is normal in size and the lungs are clear", "no pleural effusion or pneumothorax is seen"]
    s = score(texts, texts)
    assert set(s) == set(METRICS)
    for n in range(1, 5):
        assert s[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE-L"] == pytest.approx(1.0)
    assert s["METEOR"] > 0.95  # METEOR's fragmentation penalty keeps even a perfect match just under 1
    assert all(isinstance(v, float) for v in s.values())


def test_hand_computed_bleu_and_rouge() -> None:
    # ref 6 words, hyp 4 words: unigrams 3/4 match, bigrams 2/3 ("the heart", "heart is"), brevity penalty
    # exp(1 - 6/4); LCS "the heart is" = 3 -> P 3/4, R 3/6, ROUGE-L F with beta 1.2.
    s = score(["The heart is normal in size."], ["The heart is large."], include_meteor=False)
    bp = math.exp(1 - 6 / 4)
    assert s["BLEU-1"] == pytest.approx(bp * 3 / 4, abs=1e-6)
    assert s["BLEU-2"] == pytest.approx(bp * math.sqrt(3 / 4 * 2 / 3), abs=1e-6)
    p, r, beta2 = 3 / 4, 3 / 6, 1.2**2
    assert s["ROUGE-L"] == pytest.approx((1 + beta2) * p * r / (r + beta2 * p), abs=1e-9)
    assert "METEOR" not in s


@needs_java
def test_equals_pycocoevalcap_called_directly() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    ours = score(REFS, HYPS)
    gts = {i: [normalize_report(r)] for i, r in enumerate(REFS)}
    res = {i: [normalize_report(h) or EMPTY_PLACEHOLDER] for i, h in enumerate(HYPS)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        meteor_value, _ = meteor.compute_score(gts, res)
    finally:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    direct = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    direct["METEOR"] = meteor_value
    direct["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    direct["CIDEr"] = Cider().compute_score(gts, res)[0]
    assert set(ours) == set(direct) == set(METRICS)
    for k in METRICS:
        assert ours[k] == pytest.approx(float(direct[k]), abs=1e-12), k
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1


def test_normalisation() -> None:
    assert normalize_report("The Heart, is NORMAL.\n\nNo  effusion!") == "the heart is normal no effusion"
    assert normalize_report("Left-sided PICC; tip at the SVC/RA junction (XXXX).") == (
        "left sided picc tip at the svc ra junction xxxx"
    )
    assert normalize_report("one two three four five", max_words=3) == "one two three"
    assert normalize_report(None) == normalize_report("") == normalize_report(" ... ") == ""
    # Case and punctuation do not change scores; truncation applies to both sides.
    a = score(["No pleural effusion."], ["NO PLEURAL EFFUSION!!"], include_meteor=False)
    assert a["BLEU-1"] == pytest.approx(1.0, abs=1e-6) and a["ROUGE-L"] == pytest.approx(1.0)
    cut = score(["lungs are clear heart normal"], ["lungs are clear pneumothorax present"], max_words=3,
                include_meteor=False)
    assert cut["BLEU-3"] == pytest.approx(1.0, abs=1e-6)


@needs_java
def test_empty_hypotheses_count_as_wrong() -> None:
    refs = ["the heart is normal in size", "no pleural effusion or pneumothorax"]
    full = score(refs, refs)
    half = score(refs, [refs[0], ""])
    assert half["ROUGE-L"] == pytest.approx(0.5)  # per-sample mean: 1 and 0
    for k in METRICS:
        assert half[k] < full[k], k
    none = score(refs, ["", "   "])
    assert none["ROUGE-L"] == 0.0 and none["METEOR"] == 0.0 and none["CIDEr"] == 0.0
    assert none["BLEU-1"] == pytest.approx(0.0, abs=1e-6)


def test_length_mismatch_and_empty_reference_errors() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        score(["a b", "c d"], ["a b"], include_meteor=False)
    with pytest.raises(ValueError, match="empty after normalisation.*indices 1"):
        score(["a b", "..."], ["a b", "c"], include_meteor=False)
    with pytest.raises(ValueError, match="at least one"):
        score([], [], include_meteor=False)
    with pytest.raises(TypeError, match="lists"):
        score("the heart", "the heart", include_meteor=False)  # type: ignore[arg-type]


def test_missing_java_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(MeteorUnavailableError) as err:
        score(["the heart is normal"], ["the heart is normal"])
    msg = str(err.value)
    assert "METEOR needs a Java runtime" in msg
    assert "apt install default-jre-headless" in msg and "include_meteor=False" in msg
    assert isinstance(err.value, RuntimeError)
    # Everything else still works without Java.
    s = score(["the heart is normal"], ["the heart is normal"], include_meteor=False)
    assert set(s) == set(METRICS) - {"METEOR"}


@needs_java
def test_one_jvm_per_process_shared_by_threads() -> None:
    score(REFS[:2], HYPS[:2])
    pid = nlg._meteor._scorer.meteor_p.pid  # type: ignore[union-attr]
    results: list[dict[str, float]] = []

    def run() -> None:
        results.append(score(REFS, HYPS))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and results[0] == results[1] == results[2]
    assert nlg._meteor is not None and nlg._meteor._scorer.meteor_p.pid == pid


def test_bleu_from_per_report_counts_is_corpus_bleu_for_any_resample() -> None:
    """The BLEU-4 bootstrap sums per-report counts: every resample (repeats, a short corpus with the brevity
    penalty, one report) gives what pycocoevalcap computes on those reports."""
    import numpy as np

    from mavilt.eval.evaluate import bleu4_from_counts, bleu_counts

    refs = [normalize_report(r) for r in REFS]
    hyps = [normalize_report(h) or EMPTY_PLACEHOLDER for h in HYPS]
    counts = bleu_counts(refs, hyps)
    assert counts.shape == (len(REFS), 10)
    rng = np.random.default_rng(0)
    for idx in ([0, 1, 2, 3, 4, 5], [3, 3, 5], [1], list(rng.integers(0, len(REFS), 12))):
        picked_refs, picked_hyps = [refs[i] for i in idx], [hyps[i] for i in idx]
        expected = score(picked_refs, picked_hyps, include_meteor=False)["BLEU-4"]
        assert bleu4_from_counts(counts[idx]) == pytest.approx(expected, rel=1e-9, abs=1e-15), idx
